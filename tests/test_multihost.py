"""Multi-host serving: `meshserve serve` as 2 processes × 4 simulated CPU devices on
loopback (gloo collectives), one mesh over both, against the single-process engine.

Each process group is started the way an operator would (the same command, differing in
--process-id), and every subprocess is killed in a finally block.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time

import grpc
import jax
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.engine.engine import Engine, EngineConfig
from meshserve.engine.sampling_params import SamplingParams
from meshserve.meshes import make_mesh, parse_layout
from meshserve.meshes.distributed import EXIT_GROUP_FAILED, EXIT_STARTUP
from meshserve.models.loading import load_checkpoint
from meshserve.serving.proto import meshserve_pb2 as pb
from tests.serving_fixtures import (  # noqa: F401
    REPO,
    demo_ckpt,
    free_port,
    request,
    stub_for,
    tokens_of,
)

# One token bucket and one sequence bucket: few programs to compile in each process.
CONFIG = EngineConfig(page_size=16, num_pages=48, max_seqs=8, max_step_tokens=64,
                      min_token_bucket=64, min_seq_bucket=8, max_model_len=256,
                      decode_steps=4, max_logprobs=4)
ENGINE_FLAGS = ("--page-size", "16", "--num-pages", "48", "--max-seqs", "8",
                "--max-step-tokens", "64", "--min-token-bucket", "64", "--min-seq-bucket", "8",
                "--max-model-len", "256", "--decode-steps", "4", "--max-logprobs", "4")
HEARTBEAT_S, STEP_TIMEOUT_S, EXIT_DELAY_S = 2.0, 5.0, 3.0
GROUP_FLAGS = ("--cpu-devices", "4", "--num-processes", "2", "--port", "0",
               "--heartbeat-timeout", str(HEARTBEAT_S), "--step-timeout", str(STEP_TIMEOUT_S),
               "--failure-exit-delay", str(EXIT_DELAY_S))
READY = health_pb2.HealthCheckRequest(service="meshserve.v1.MeshServe")
PROMPTS = [[1, 5, 9, 3], [1, 7], [1, 20, 30, 40, 50, 60, 70, 80, 90], [1, 3, 3, 3, 3],
           [1] + list(range(100, 140)), [1, 11, 12]]


def _without_stacks(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if not line.lstrip().startswith("@"))


class Process:
    """One `meshserve serve` subprocess; its stderr is collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshserve.tools.cli", "serve", *args], cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log)
            if m:
                return m
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the reader may still hold the last lines
                m = re.search(pattern, self.log)
                if m:
                    return m
                raise AssertionError(f"exited {self.proc.returncode}:\n{self.log[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.log[-4000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _env(secret: str | None = None) -> dict[str, str]:
    env = {**os.environ, "MESHSERVE_MULTIHOST_SECRET": secret or secrets.token_hex(16)}
    cache = jax.config.jax_compilation_cache_dir
    if cache:  # both processes compile the same programs in every test: share them
        env.update(JAX_COMPILATION_CACHE_DIR=cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return env


def start_group(*args: str, num: int = 2, ids=None, **kwargs) -> list[Process]:
    coordinator = f"127.0.0.1:{free_port()}"
    common = ["--coordinator", coordinator, "--step-channel-port", str(free_port()), *args]
    env = _env()
    procs = []
    for pid in ids if ids is not None else range(num):
        procs.append(Process([*common, "--process-id", str(pid)], env))
    return procs


def reference(ckpt: str, layout: str, prompts, max_tokens: int):
    """The same checkpoint, layout and config in this process (8 simulated devices)."""
    engine = Engine(load_checkpoint(ckpt, make_mesh(parse_layout(layout))), CONFIG)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    return engine.generate(prompts, params)


def stream_all(target: str, prompts, max_tokens: int) -> dict[int, list]:
    """Generate every prompt concurrently (greedy, logprobs); responses per prompt."""
    channel, stub = stub_for(target)
    results: dict[int, list] = {}

    def one(i: int) -> None:
        results[i] = list(stub.Generate(
            request(token_ids=PROMPTS[i] if prompts is None else prompts[i],
                    max_tokens=max_tokens, ignore_eos=True, logprobs=1), timeout=120))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    channel.close()
    return results


def assert_same(results: dict[int, list], ref) -> None:
    for i, chunks in enumerate(ref):
        got = results[i]
        assert tokens_of(got) == [t for c in chunks for t in c.token_ids], f"prompt {i}"
        assert got[-1].finish_reason == "length"
        want_lp = [lp.logprob for c in chunks for lp in c.logprobs]
        got_lp = [lp.logprob for r in got for lp in r.logprobs]
        assert got_lp == pytest.approx(want_lp, abs=2e-4), f"prompt {i}"


def health_status(target: str, service: str = "meshserve.v1.MeshServe") -> int:
    channel = grpc.insecure_channel(target)
    try:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status
    finally:
        channel.close()


def _signal_mid_stream(stub, follower: Process, signum: int):
    """Stream a long greedy generation and send `signum` to the follower after 4 tokens;
    returns (tokens streamed, the UNAVAILABLE error, when the signal was sent)."""
    streamed: list[int] = []
    sent_at = None
    with pytest.raises(grpc.RpcError) as failed:
        for r in stub.Generate(request(token_ids=PROMPTS[2], max_tokens=200, ignore_eos=True),
                               timeout=60):
            streamed += r.token_ids
            if sent_at is None and len(streamed) >= 4:
                follower.proc.send_signal(signum)
                sent_at = time.monotonic()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
    return streamed, failed.value, sent_at


class _FakeLink:
    """Stands in for the leader's step channel: records broadcasts; followers report
    steps done up to `done`."""

    def __init__(self):
        self.sent: list[dict] = []
        self.done = -1

    def broadcast(self, message: dict) -> None:
        self.sent.append(message)

    def finished(self, index: int) -> bool:
        return self.done >= index


def test_step_watchdog_fails_the_engine_when_a_step_never_finishes(checkpoint_dir,
                                                                    monkeypatch):
    """A follower whose channel is alive but whose step never ends (no 'done'): the
    watchdog reports it after the step timeout; fail() ends every stream with the
    reason and the engine refuses further steps."""
    import jax.numpy as jnp

    from meshserve.engine.engine import EngineDeadError
    from meshserve.engine.multihost import MultiHostEngine, empty_step
    from meshserve.engine.step import StepOutputs

    model = load_checkpoint(checkpoint_dir("llama"), make_mesh(parse_layout("")))
    link, failures = _FakeLink(), []
    engine = MultiHostEngine(model, CONFIG, link=link, step_timeout=0.3, compile_timeout=0.3,
                             on_failure=failures.append)
    zeros = StepOutputs(jnp.zeros((1, 1, 8), jnp.int32), jnp.zeros((1, 1, 8)),
                        jnp.zeros((1, 1, 8, 4), jnp.int32), jnp.zeros((1, 1, 8, 4)),
                        jnp.int32(1), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool))
    monkeypatch.setattr(Engine, "launch", lambda self, inputs, decode: zeros)
    inputs = empty_step(engine)
    engine.launch(inputs, False)
    link.done = 0  # step 0 reported done by every follower; step 1 never is
    engine.launch(inputs, True)
    t0 = time.monotonic()
    deadline = t0 + 5.0
    while not failures:
        assert time.monotonic() < deadline, "the watchdog never fired"
        time.sleep(0.01)
    assert 0.2 < time.monotonic() - t0 < 1.5
    assert failures == ["step 1 did not finish within 0.3s (a process hung, or a collective "
                        "waits on a dead peer)"]
    assert [(m["t"], m["n"], m["decode"]) for m in link.sent] == [("step", 0, False),
                                                                  ("step", 1, True)]
    handle = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4))
    engine.fail("the process group failed: test")
    last = list(handle)[-1]
    assert last.finish_reason == "abort" and last.error == "the process group failed: test"
    assert not engine.healthy
    with pytest.raises(EngineDeadError):
        engine.launch(inputs, False)
    engine.shutdown(timeout=1.0)


def test_data2_tensor4_across_processes_then_follower_killed(checkpoint_dir, hf_model_dir):
    """Both processes given `--hf` (one conversion, shared through the cache of converted
    checkpoints: the other waits for it). Greedy streams over gRPC equal the
    single-process engine's; then SIGKILL of the follower mid-stream: UNAVAILABLE within
    the timeouts, no token repeated, NOT_SERVING, and the leader exits with
    EXIT_GROUP_FAILED."""
    ckpt = checkpoint_dir("llama")  # the same HF model, converted in this process
    group = start_group("--hf", hf_model_dir("llama"), "--mesh", "data=2,tensor=4",
                        *GROUP_FLAGS, *ENGINE_FLAGS)
    leader, follower = group
    try:
        ref = reference(ckpt, "data=2,tensor=4", PROMPTS, 12)
        long_ref = reference(ckpt, "data=2,tensor=4", [PROMPTS[2]], 40)[0]
        port = int(leader.wait_for(r'"server_started".*?"port": (\d+)', 150).group(1))
        target = f"127.0.0.1:{port}"
        converted = [p for p in group if "converting " in p.log]
        assert len(converted) <= 1, "both processes converted the model"
        health_port = follower.wait_for(r'"follower_started".*?"health_port": (\d+)', 30)
        assert health_status(f"127.0.0.1:{health_port.group(1)}", "") == 1  # SERVING

        assert_same(stream_all(target, PROMPTS, 12), ref)
        channel, stub = stub_for(target)
        info = stub.GetServerInfo(pb.GetServerInfoRequest())
        assert len(info.slices) == 1 and len(info.slices[0].devices) == 8
        assert info.slices[0].mesh_layout.startswith("data=2,tensor=4")

        streamed, failed, killed_at = _signal_mid_stream(stub, follower, signal.SIGKILL)
        detected = time.monotonic() - killed_at
        print(f"SIGKILL of the follower -> UNAVAILABLE in {detected:.3f}s")
        # Our channel usually notices first; sometimes gloo's broken connection fails
        # the step itself. Either way the stream ends UNAVAILABLE, saying why.
        assert re.search("process group failed|Gloo", failed.details()), failed
        assert detected < STEP_TIMEOUT_S + 2.0, detected
        # What was streamed is the greedy sequence, each token once.
        assert 4 <= len(streamed) <= len(tokens_of(long_ref))
        assert streamed == tokens_of(long_ref)[:len(streamed)]

        deadline = time.monotonic() + 2.0  # readiness is polled every 0.5 s
        while health_status(target) != 2:  # NOT_SERVING
            assert time.monotonic() < deadline, "readiness stayed SERVING"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request(token_ids=[1, 2], max_tokens=2), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
        assert leader.proc.wait(EXIT_DELAY_S + 10) == EXIT_GROUP_FAILED, leader.log[-3000:]
        exited = time.monotonic() - killed_at
        print(f"leader exited {EXIT_GROUP_FAILED} {exited:.2f}s after the kill")
        assert EXIT_DELAY_S - 0.5 < exited < EXIT_DELAY_S + 8, exited
        assert follower.proc.wait(10) == -signal.SIGKILL
        assert '"event": "process_group_failed"' in leader.log
    finally:
        for p in group:
            p.kill()
    assert all(p.proc.poll() is not None for p in group)


def test_a_hung_follower_is_detected_by_the_heartbeat(checkpoint_dir):
    """SIGSTOP (a hang: the socket stays open) fails the group after the heartbeat
    timeout, before the step watchdog would."""
    group = start_group("--checkpoint", checkpoint_dir("llama"), "--mesh", "data=2,tensor=4",
                        *GROUP_FLAGS, *ENGINE_FLAGS)
    leader, follower = group
    try:
        port = int(leader.wait_for(r'"server_started".*?"port": (\d+)', 150).group(1))
        channel, stub = stub_for(f"127.0.0.1:{port}")
        streamed, failed, stopped_at = _signal_mid_stream(stub, follower, signal.SIGSTOP)
        detected = time.monotonic() - stopped_at
        print(f"SIGSTOP of the follower -> UNAVAILABLE in {detected:.3f}s")
        assert "process 1: the peer sent nothing for 2s" in failed.details(), failed
        assert HEARTBEAT_S - 0.5 < detected < HEARTBEAT_S + 1.5, detected
        assert len(streamed) >= 4
        channel.close()
        assert leader.proc.wait(EXIT_DELAY_S + 10) == EXIT_GROUP_FAILED, leader.log[-3000:]
        # Woken up, the follower finds its leader gone and exits non-zero at once
        # (our exit code, or JAX's abort if its coordination client notices first).
        follower.proc.send_signal(signal.SIGCONT)
        woken = time.monotonic()
        assert follower.proc.wait(15) in (EXIT_GROUP_FAILED, -signal.SIGABRT)
        assert time.monotonic() - woken < 5
    finally:
        for p in group:
            p.kill()


def test_tensor8_across_processes_then_clean_stop(demo_ckpt):  # noqa: F811
    """8 heads over 8 devices of two processes; SIGTERM on the leader stops both with 0."""
    group = start_group("--checkpoint", demo_ckpt, "--mesh", "tensor=8", *GROUP_FLAGS,
                        *ENGINE_FLAGS)
    leader, follower = group
    try:
        prompts = PROMPTS[:4]
        ref = reference(demo_ckpt, "tensor=8", prompts, 10)
        port = int(leader.wait_for(r'"server_started".*?"port": (\d+)', 150).group(1))
        assert_same(stream_all(f"127.0.0.1:{port}", prompts, 10), ref)
        follower.wait_for('"follower_started"', 10)
        follower.proc.send_signal(signal.SIGTERM)  # ignored: followers go with the leader
        time.sleep(0.5)
        assert follower.proc.poll() is None
        leader.proc.send_signal(signal.SIGTERM)
        assert leader.proc.wait(60) == 0, leader.log[-3000:] + follower.log[-2000:]
        assert follower.proc.wait(30) == 0, follower.log[-3000:]
        assert '"event": "follower_stopped"' in follower.log
    finally:
        for p in group:
            p.kill()



def test_startup_failures_are_clear_and_bounded(checkpoint_dir):
    """A follower started with another --num-processes, a leader whose follower never
    comes, and a follower whose coordinator is not there: each exits EXIT_STARTUP
    with a message naming the problem, within the start-up timeout."""
    ckpt = checkpoint_dir("llama")
    timeout = 8  # for the two that must wait it out; generous for the mismatched pair
    env = _env()

    def serve(pid: str, n: str, init_timeout: int, *extra: str) -> Process:
        return Process(["--checkpoint", ckpt, "--mesh", "data=2,tensor=4", "--cpu-devices",
                        "4", "--port", "0", "--distributed-init-timeout", str(init_timeout),
                        "--num-processes", n, "--process-id", pid, *extra, *ENGINE_FLAGS],
                       env)

    coordinator = ("--coordinator", f"127.0.0.1:{free_port()}",
                   "--step-channel-port", str(free_port()))
    mismatched = [serve("0", "2", 60, *coordinator), serve("1", "3", 60, *coordinator)]
    alone = serve("0", "2", timeout, "--coordinator", f"127.0.0.1:{free_port()}")
    orphan = serve("1", "2", timeout, "--coordinator", f"127.0.0.1:{free_port()}")
    everyone = [*mismatched, alone, orphan]
    t0 = time.monotonic()
    exited: dict[int, float] = {}
    try:
        while len(exited) < len(everyone):
            assert time.monotonic() - t0 < 90, [p.log[-2000:] for p in everyone]
            for i, p in enumerate(everyone):
                if i not in exited and p.proc.poll() is not None:
                    exited[i] = time.monotonic() - t0
            time.sleep(0.05)
        print("start-up failures exited after", {i: round(t, 1) for i, t in exited.items()})
        assert [p.proc.returncode for p in everyone] == [EXIT_STARTUP] * 4, "\n\n".join(
            _without_stacks(p.log)[-2000:] for p in everyone)
        for p in mismatched:
            assert "started with --num-processes 3 but the leader with 2" in p.log, p.log
        assert "did not assemble 2 processes" in alone.log, alone.log[-2000:]
        assert "cannot reach the coordinator" in orphan.log, orphan.log[-2000:]
        # The two that waited did so for the timeout (plus start-up), not for ever.
        assert timeout <= exited[2] < timeout + 40 and timeout <= exited[3] < timeout + 40
        for p in everyone:
            assert "Traceback" not in p.log and "Check failure" not in p.log, p.log[-3000:]
    finally:
        for p in everyone:
            p.kill()
