"""Two slices behind one server: load spreading, per-slice metrics (Prometheus and
TensorBoard), and slices whose engine stopped being taken out of rotation."""

from __future__ import annotations

import concurrent.futures
import re
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.serving.proto import meshserve_pb2 as pb
from tests.serving_fixtures import (  # noqa: F401
    SERVING_CONFIG,
    demo_ckpt,
    error_of,
    free_port,
    request,
    running_server,
    stub_for,
    tokens_of,
    wait_idle,
)


@pytest.fixture(scope="module")
def two_slices(demo_ckpt):  # noqa: F811
    """Slices on devices 0 and 1 (of the 8 simulated ones); compiled lazily."""
    from meshserve.serving import launch

    model = launch.load(demo_ckpt, "", 2, "float32", SERVING_CONFIG)
    launch.warm_up(model)
    yield model
    for s in model.slices:
        s.engine.shutdown(timeout=10.0)


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z0-9_:]+(?:\{[^}]*\})?) ([0-9.e+-]+|NaN)", line)
        if m:
            samples[m.group(1)] = float(m.group(2))
    return samples


def test_two_slices_share_the_load_and_export_per_slice_metrics(two_slices, tmp_path):
    s0, s1 = two_slices.slices
    assert s0.devices != s1.devices and len(s0.devices) == len(s1.devices) == 1
    metrics_port = free_port()
    with running_server(two_slices, metrics_port=metrics_port,
                        tensorboard_dir=str(tmp_path / "tb"), tensorboard_interval=0.2) as server:
        channel, stub = stub_for(server.target)
        with channel:
            prompts = [[1, 100 + i, 200 + i, 300 + i] for i in range(16)]

            def one(ids):
                rs = list(stub.Generate(request(token_ids=ids, max_tokens=12, ignore_eos=True)))
                return tokens_of(rs), rs[-1].slice

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                results = list(pool.map(one, prompts))
            # Both slices hold the same weights: the slice does not change the output.
            for ids, (tokens, _) in zip(prompts, results, strict=True):
                assert tokens == [t for c in s0.engine.add_request(
                    ids, _params(12)) for t in c.token_ids]
            used = [slice_ for _, slice_ in results]
            assert used.count(0) >= 4 and used.count(1) >= 4, used
            info = stub.GetServerInfo(pb.GetServerInfoRequest())
            assert info.slice_count == 2
            assert [s.routed_requests for s in info.slices] == [used.count(0), used.count(1)]
            assert all(s.healthy and s.free_pages == s.total_pages == 64 for s in info.slices)

            m = _scrape(metrics_port)
            for i in (0, 1):
                label = f'{{slice="{i}"}}'
                assert m[f"meshserve_routed_requests_total{label}"] == used.count(i)
                assert m[f'meshserve_requests_finished_total{{reason="length",slice="{i}"}}'] \
                    == used.count(i)
                assert m[f"meshserve_generation_tokens_total{label}"] == 12 * used.count(i)
                assert m[f"meshserve_time_to_first_token_seconds_count{label}"] == used.count(i)
                assert m[f"meshserve_e2e_request_latency_seconds_count{label}"] == used.count(i)
                assert m[f"meshserve_queue_time_seconds_count{label}"] == used.count(i)
                # 11 gaps per request after the first token.
                assert m[f"meshserve_inter_token_latency_seconds_count{label}"] == \
                    11 * used.count(i)
                assert m[f"meshserve_kv_cache_usage_ratio{label}"] == 0.0
                assert m[f"meshserve_running_requests{label}"] == 0
                assert m[f"meshserve_slice_healthy{label}"] == 1
                assert f"meshserve_preemptions_total{label}" in m
            assert m['meshserve_requests_rejected_total{reason="overloaded"}'] == 0
    # TensorBoard event files written with tensorboard's own writer (no TensorFlow).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {"server/finished", "server/generation_tokens", "slice0/running",
            "slice1/kv_cache_usage", "slice1/preemptions", "latency/ttft_ms",
            "latency/itl_ms", "latency/e2e_ms", "latency/queue_ms"} <= tags, tags
    finished = acc.Tensors("server/finished")[-1]
    from tensorboard.util import tensor_util

    assert tensor_util.make_ndarray(finished.tensor_proto) == 16


def _params(n):
    from meshserve.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=n, ignore_eos=True)


def test_stopped_slice_leaves_rotation_and_none_left_is_unavailable(two_slices):
    s0, s1 = two_slices.slices
    with running_server(two_slices) as server:
        channel, stub = stub_for(server.target)
        health = health_pb2_grpc.HealthStub(channel)
        ready = health_pb2.HealthCheckRequest(service="meshserve.v1.MeshServe")
        with channel:
            long = stub.Generate(request(token_ids=[1, 9, 9], max_tokens=240, ignore_eos=True))
            first = next(long)
            assert first.token_ids
            busy = s0 if s0.stats().running else s1
            other = s1 if busy is s0 else s0
            busy.engine.shutdown(timeout=10.0)
            # The stream on the stopped slice fails fast with UNAVAILABLE, never hangs.
            e = error_of(lambda: long)
            assert e.code() == grpc.StatusCode.UNAVAILABLE
            assert f"slice {busy.index} failed" in e.details()
            for _ in range(4):
                rs = list(stub.Generate(request(token_ids=[1, 2, 3], max_tokens=4,
                                                ignore_eos=True), timeout=60))
                assert rs[-1].slice == other.index and len(tokens_of(rs)) == 4
            info = stub.GetServerInfo(pb.GetServerInfoRequest())
            assert [s.healthy for s in info.slices] == [s is other for s in (s0, s1)]
            assert health.Check(ready).status == health_pb2.HealthCheckResponse.SERVING
            other.engine.shutdown(timeout=10.0)
            e = error_of(stub.Generate, request(token_ids=[1, 2, 3], max_tokens=4))
            assert e.code() == grpc.StatusCode.UNAVAILABLE and "no healthy slice" in e.details()
            for _ in range(50):  # readiness follows within the monitor's period
                if health.Check(ready).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.1)
            assert health.Check(ready).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
