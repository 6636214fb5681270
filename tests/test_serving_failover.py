"""The single-host step watchdog and slice failover, on two real slices over real gRPC and
HTTP: a slice whose device step is made to hang (the watchdog's fault-injection hook)
leaves rotation within the step timeout, its streams that sent tokens end UNAVAILABLE
after them (never a token twice), the ones that sent nothing fail over to the other
slice and complete with the right tokens, the retried metric counts them, and readiness
turns NOT_SERVING once no slice is left. Engine level: a step that compiles a new shape
gets the compile bound, not the step bound."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.engine.engine import EngineDeadError
from meshserve.engine.sampling_params import SamplingParams
from meshserve.serving.proto import meshserve_pb2 as pb
from tests.serving_fixtures import (  # noqa: F401
    SERVING_CONFIG,
    demo_ckpt,
    error_of,
    request,
    running_server,
    stub_for,
    tokens_of,
)

STEP_TIMEOUT_S = 1.0
WATCHED = dataclasses.replace(SERVING_CONFIG, step_timeout=STEP_TIMEOUT_S, compile_timeout=60.0)
READY = health_pb2.HealthCheckRequest(service="meshserve.v1.MeshServe")


class Faults:
    """The engine's test hook: every launch is slowed by `delay`, and once `hang` is set
    the next launch blocks until `release` (a hung device call)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.hang = threading.Event()
        self.release = threading.Event()
        self.hung_at: float | None = None

    def __call__(self, key) -> None:
        if self.hang.is_set() and not self.release.is_set():
            self.hung_at = time.monotonic()
            self.release.wait(60)
        time.sleep(self.delay)


@pytest.fixture(scope="module")
def two_slices(demo_ckpt):  # noqa: F811
    """Two watched slices (devices 0 and 1), warmed up: every shape seen, so a step that
    hangs gets the step bound. The tests fail them: nothing else shares them."""
    from meshserve.serving import launch

    model = launch.load(demo_ckpt, "", 2, "float32", WATCHED, warmup=True)
    launch.warm_up(model)
    faults = [Faults(delay=0.03) for _ in model.slices]
    for s, f in zip(model.slices, faults, strict=True):
        s.engine.watchdog.fault = f
    yield model, faults
    for f in faults:
        f.release.set()
    for s in model.slices:
        s.engine.shutdown(timeout=10.0)


def _greedy(engine, ids: list[int], n: int) -> list[int]:
    return [t for c in engine.add_request(ids, SamplingParams(max_tokens=n, ignore_eos=True))
            for t in c.token_ids]


def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _completion(port: int, ids: list[int]) -> dict:
    body = json.dumps({"prompt": ids, "max_tokens": 8, "ignore_eos": True,
                       "return_token_ids": True}).encode()
    r = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                               {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(r, timeout=30).read())


def _http_health(port: int) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code


def test_hung_slice_fails_streams_over_and_leaves_rotation(two_slices):
    model, faults = two_slices
    long_ids = [1] + [40 + i for i in range(99)]
    streamed_ids, queued = [1, 5, 6], [[1, 7, 8, 9], [1, 11, 12]]
    expect = {tuple(ids): _greedy(model.slices[0].engine, ids, 8) for ids in queued}
    expect_streamed = _greedy(model.slices[0].engine, streamed_ids, 100)
    with running_server(model, http_port=0) as server:
        channel, stub = stub_for(server.target)
        health = health_pb2_grpc.HealthStub(channel)
        with channel, concurrent.futures.ThreadPoolExecutor(4) as pool:
            # The busy slice Y: a long prompt keeps its load above the other's, so the
            # requests below are all routed to X.
            busy = stub.Generate(request(token_ids=long_ids, max_tokens=150, ignore_eos=True))
            assert next(busy).token_ids
            y = next(s for s in model.slices if s.inflight_requests)
            x = next(s for s in model.slices if s is not y)
            # On X: one request streams tokens, then X's next launch hangs.
            streamed = stub.Generate(request(token_ids=streamed_ids, max_tokens=100,
                                             ignore_eos=True))
            got = list(next(streamed).token_ids)
            assert got and x.inflight_requests == 1
            faults[x.index].hang.set()
            _until(lambda: faults[x.index].hung_at is not None)
            # Two requests routed to the hung slice, by gRPC and by HTTP: they stream
            # nothing before it fails.
            by_grpc = pool.submit(lambda: list(stub.Generate(request(
                token_ids=queued[0], max_tokens=8, ignore_eos=True), timeout=30)))
            by_http = pool.submit(_completion, server.server.http_port, queued[1])
            _until(lambda: x.inflight_requests == 3)
            try:
                for r in streamed:
                    got += r.token_ids
                raise AssertionError("the stream on the hung slice did not fail")
            except grpc.RpcError as e:
                unavailable_after = time.monotonic() - faults[x.index].hung_at
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                assert f"slice {x.index} failed" in e.details()
                assert "did not finish within 1s" in e.details()
            print(f"\nUNAVAILABLE {unavailable_after:.3f}s after the step hung "
                  f"(--step-timeout {STEP_TIMEOUT_S:g}s)")
            assert unavailable_after < STEP_TIMEOUT_S + 2.0
            # What streamed before the failure, once each and in order.
            assert got == expect_streamed[:len(got)]
            # The unstarted requests completed on Y with the same tokens as on any slice.
            rs = by_grpc.result(timeout=30)
            assert tokens_of(rs) == expect[tuple(queued[0])]
            assert rs[-1].slice == y.index and rs[-1].finish_reason == "length"
            choice = by_http.result(timeout=30)["choices"][0]
            assert choice["token_ids"] == expect[tuple(queued[1])]
            assert choice["finish_reason"] == "length"
            assert len(tokens_of(busy)) == 149  # Y untouched
            registry = server.server.metrics.registry
            assert registry.get_sample_value("meshserve_requests_retried_total",
                                             {"slice": str(x.index)}) == 2
            assert registry.get_sample_value("meshserve_requests_retried_total",
                                             {"slice": str(y.index)}) == 0
            info = stub.GetServerInfo(pb.GetServerInfoRequest())
            assert [s.healthy for s in info.slices] == [s is y for s in model.slices]
            assert health.Check(READY).status == health_pb2.HealthCheckResponse.SERVING
            assert _http_health(server.server.http_port) == 200
            # New requests go to Y only.
            rs = list(stub.Generate(request(token_ids=queued[0], max_tokens=8,
                                            ignore_eos=True), timeout=30))
            assert rs[-1].slice == y.index and tokens_of(rs) == expect[tuple(queued[0])]

            # Y hangs too: its request fails (no slice left to fail over to), readiness
            # turns NOT_SERVING on gRPC and HTTP, liveness stays SERVING.
            faults[y.index].hang.set()
            e = error_of(stub.Generate, request(token_ids=[1, 2, 3], max_tokens=8,
                                                ignore_eos=True), timeout=30)
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert "did not finish within" in e.details()
            _until(lambda: health.Check(READY).status
                   == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=5)
            assert _http_health(server.server.http_port) == 503
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
            e = error_of(stub.Generate, request(token_ids=[1, 2, 3], max_tokens=4))
            assert e.code() == grpc.StatusCode.UNAVAILABLE and "no healthy slice" in e.details()
    for f in faults:  # the blocked engine threads wake, see the failure and stop
        f.release.set()
    for s in model.slices:
        _until(lambda s=s: not s.engine._thread.is_alive())
        with pytest.raises(EngineDeadError):
            s.engine.add_request([1, 2], SamplingParams(max_tokens=2))


def test_a_compiling_step_gets_the_compile_bound(demo_ckpt):  # noqa: F811
    """No warm-up: each shape's first launch compiles. A fault that stalls first-seen
    shapes past the step bound leaves the engine healthy (the compile bound applies);
    the same stall on a shape seen before fails it."""
    from tests.engine_fixtures import make_engine

    cfg = dataclasses.replace(SERVING_CONFIG, step_timeout=0.5, compile_timeout=120.0)
    engine = make_engine(demo_ckpt, config=cfg)
    seen, stall = set(), threading.Event()

    def fault(key) -> None:
        if key not in seen or stall.is_set():
            seen.add(key)
            time.sleep(0.9)

    engine.watchdog.fault = fault
    engine.start()
    try:
        chunks = list(engine.add_request([1, 2, 3], SamplingParams(max_tokens=6,
                                                                   ignore_eos=True)))
        assert engine.healthy and chunks[-1].finish_reason == "length"
        assert len([t for c in chunks for t in c.token_ids]) == 6
        stall.set()
        chunks = list(engine.add_request([1, 2, 3], SamplingParams(max_tokens=6,
                                                                   ignore_eos=True)))
        assert chunks[-1].finish_reason == "abort"
        assert "did not finish within 0.5s" in chunks[-1].error
        assert not engine.healthy
    finally:
        engine.shutdown(timeout=10.0)
