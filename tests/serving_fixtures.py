"""Fixtures and helpers for the serving tests: the real engine on the demo checkpoint and
real gRPC servers on loopback ports (each in a thread with its own event loop).

Import the fixtures into a test module by name (`from tests.serving_fixtures import
demo_ckpt, demo_model  # noqa: F401`). One warmed-up engine per test process is shared
by every in-process server: compiling a fresh engine costs ~30 s on two CPU cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from meshserve.engine.engine import EngineConfig
from meshserve.serving.proto import meshserve_pb2 as pb
from meshserve.serving.proto import meshserve_pb2_grpc as pb_grpc
from meshserve.tools import server_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One token bucket (64) and seq buckets 1-8: 8 compiled shapes in all.
SERVING_CONFIG = EngineConfig(
    page_size=16, num_pages=64, max_seqs=8, max_step_tokens=64, min_token_bucket=64,
    max_model_len=256, decode_steps=4, max_logprobs=4, max_waiting_requests=64,
    max_waiting_tokens=2048,
)
# The same engine as flags, for `meshserve serve` subprocesses: identical programs, so
# they load from the run's persistent compilation cache instead of compiling again.
SERVING_FLAGS = (
    "--cpu-devices", "8", "--page-size", "16", "--num-pages", "64", "--max-seqs", "8",
    "--max-step-tokens", "64", "--min-token-bucket", "64", "--max-model-len", "256",
    "--decode-steps", "4", "--max-logprobs", "4", "--max-waiting-requests", "64",
    "--max-waiting-tokens", "2048",
)


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory) -> str:
    from meshserve.models.demo import ensure_demo_checkpoint

    return ensure_demo_checkpoint(str(tmp_path_factory.mktemp("serving") / "demo-v1"))


@pytest.fixture(scope="session")
def demo_model(demo_ckpt):
    """One slice on device 0 with every shape compiled (timing tests need no compiles)."""
    from meshserve.serving import launch

    model = launch.load(demo_ckpt, "", 1, "float32", SERVING_CONFIG, warmup=True)
    launch.warm_up(model)  # what `serve` does once the port is open
    yield model
    for s in model.slices:
        s.engine.shutdown(timeout=10.0)


class ServerThread:
    """A MeshServeServer on 127.0.0.1:<free port>, its event loop in a daemon thread."""

    def __init__(self, model, **options):
        from meshserve.serving.server import MeshServeServer, ServerOptions

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        options.setdefault("port", 0)
        self.server = MeshServeServer(model.slices, model.tokenizer, model.info,
                                      ServerOptions(**options))
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        if self.loop.is_closed():
            return
        self.call(self.server.stop(grace, shutdown_engines=False))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def running_server(model, **options) -> Iterator[ServerThread]:
    server = ServerThread(model, **options)
    try:
        yield server
    finally:
        server.stop()


def stub_for(target: str, channel_credentials=None, **channel_options):
    options = list(channel_options.items())
    if channel_credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, channel_credentials, options=options)
    return channel, pb_grpc.MeshServeStub(channel)


def request(prompt: str | None = None, token_ids=None, **fields) -> pb.GenerateRequest:
    from meshserve.serving.client import build_request

    return build_request(prompt=prompt, token_ids=token_ids, **fields)


def tokens_of(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def error_of(fn, *args, **kwargs) -> grpc.RpcError:
    """The RpcError a call raises (responses of a stream are drained)."""
    try:
        result = fn(*args, **kwargs)
        if not isinstance(result, pb.ServerInfo | pb.TokenizeResponse | pb.DetokenizeResponse):
            list(result)
    except grpc.RpcError as e:
        return e
    raise AssertionError("the call succeeded")


def wait_idle(engine, timeout: float = 10.0) -> None:
    """Wait until nothing runs or waits and every KV page is free again."""
    deadline = time.monotonic() + timeout
    while True:
        st = engine.stats()
        if st.running == 0 and st.waiting == 0 and st.free_pages == st.total_pages:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout}s: {st}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """Environment for `meshserve` subprocesses: this run's compilation cache, so they
    load the programs the tests already compiled."""
    import jax

    cache = jax.config.jax_compilation_cache_dir
    return {"JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"} if cache else {}


class ServeProcess(server_process.ServeProcess):
    """`meshserve serve` in a subprocess started from the repository root (see
    meshserve.tools.server_process)."""

    def __init__(self, *args: str, **kwargs):
        super().__init__(*args, cwd=REPO, **kwargs)
