"""`meshserve serve` as a user runs it: a subprocess on a loopback port, driven by
`meshserve generate --target`, `meshserve bench-serving`, and SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.serving.proto import meshserve_pb2 as pb
from tests.serving_fixtures import (  # noqa: F401
    REPO,
    SERVING_FLAGS,
    ServeProcess,
    demo_ckpt,
    error_of,
    request,
    stub_for,
    subprocess_env,
    tokens_of,
)

READY = health_pb2.HealthCheckRequest(service="meshserve.v1.MeshServe")


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshserve.tools.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_target_and_bench_serving_against_a_served_process(demo_ckpt, tmp_path):  # noqa: F811
    token = tmp_path / "token"
    token.write_text("tok-0123456789abcdef\n")
    server = ServeProcess("--checkpoint", demo_ckpt, "--warmup=false", *SERVING_FLAGS,
                          "--auth-token-file", str(token), env=subprocess_env())
    try:
        as_json = _cli("generate", "--target", server.target, "--auth-token-file", str(token),
                       "--prompt", "Hello mesh", "--max-tokens", "8", "--ignore-eos", "--json")
        assert as_json.returncode == 0, as_json.stderr
        out = json.loads(as_json.stdout.strip().splitlines()[-1])
        assert len(out["token_ids"]) == 8 and len(out["logprobs"]) == 8
        assert out["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 8
        assert all(lp <= 0 for lp in out["logprobs"])
        streamed = _cli("generate", "--target", server.target, "--auth-token-file", str(token),
                        "--prompt", "Hello mesh", "--max-tokens", "8", "--ignore-eos")
        assert streamed.returncode == 0, streamed.stderr
        assert streamed.stdout.rstrip("\n") == out["text"]  # greedy: the same text
        denied = _cli("generate", "--target", server.target, "--prompt", "Hello mesh")
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr

        bench = _cli("bench-serving", "--target", server.target, "--auth-token-file", str(token),
                     "--num-prompts", "12", "--request-rate", "40", "--input-len", "24",
                     "--output-len", "8", "--range-ratio", "0.5", "--slo",
                     "ttft_ms=60000,tpot_ms=60000", "--out", str(tmp_path / "bench.json"),
                     "--max-duration", "120")
        assert bench.returncode == 0, bench.stderr
        result = json.loads((tmp_path / "bench.json").read_text())
        assert result["completed"] == 12 and result["failed"] == 0
        assert 12 * 4 <= result["total_output_tokens"] <= 12 * 12
        assert result["goodput"] == result["request_throughput"] > 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            stats = result[key]
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], key
        assert result["ttft_ms"]["p99"] <= result["e2e_ms"]["p99"]
        assert "ttft_ms" in bench.stdout and "goodput" in bench.stdout
        assert result["requests_per_slice"] == {"0": 12}

        # Shared-prefix workload: 34 of each prompt's 40 tokens are one of 2 prefixes.
        shared = _cli("bench-serving", "--target", server.target, "--auth-token-file",
                      str(token), "--num-prompts", "10", "--request-rate", "20", "--input-len",
                      "40", "--output-len", "4", "--prefix-len", "34", "--num-prefixes", "2",
                      "--out", str(tmp_path / "shared.json"), "--max-duration", "120")
        assert shared.returncode == 0, shared.stderr
        result = json.loads((tmp_path / "shared.json").read_text())
        assert result["completed"] == 10 and result["num_prefixes"] == 2
        # At most the 2 full pages of a prefix (32 tokens) are reused per request.
        assert 0 < result["cached_tokens"] <= 10 * 32
        assert result["cache_hit_rate"] == result["cached_tokens"] / (10 * 40)
        assert "prompt tokens cached" in shared.stdout
        too_long = _cli("bench-serving", "--target", server.target, "--auth-token-file",
                        str(token), "--input-len", "40", "--prefix-len", "40")
        assert too_long.returncode == 2 and "must be shorter" in too_long.stderr
        assert '"event": "request_finished"' in server.log  # structured, with request ids
        assert '"request_id": "' in server.log
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log[-3000:]


def test_sigterm_drains_in_flight_streams_then_exits_0(demo_ckpt):  # noqa: F811
    """24 streams of 200 tokens in flight (8 running, 16 waiting) when SIGTERM arrives:
    all finish, new work is refused meanwhile, and the process exits 0."""
    server = ServeProcess("--checkpoint", demo_ckpt, "--warmup=false", *SERVING_FLAGS,
                          "--grace-period", "120", env=subprocess_env())
    try:
        channel, stub = stub_for(server.target)
        health = health_pb2_grpc.HealthStub(channel)
        results: dict[int, list | Exception] = {}

        def one(i: int) -> None:
            try:
                results[i] = list(stub.Generate(request(token_ids=[1, 4, 5 + i], max_tokens=200,
                                                        ignore_eos=True)))
            except grpc.RpcError as e:
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(24)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while True:  # every stream admitted by the engine
            s = stub.GetServerInfo(pb.GetServerInfoRequest()).slices[0]
            if s.running + s.waiting == 24:
                break
            assert time.monotonic() < deadline, s
            time.sleep(0.01)
        assert health.Check(READY).status == health_pb2.HealthCheckResponse.SERVING
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while health.Check(READY).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "readiness never turned NOT_SERVING"
            time.sleep(0.02)
        e = error_of(stub.Generate, request(token_ids=[1, 2], max_tokens=2))
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.details()
        live = health.Check(health_pb2.HealthCheckRequest(service="")).status
        assert live == health_pb2.HealthCheckResponse.SERVING
        assert len(results) < 24, "the streams ended before the checks: make them longer"
        for t in threads:
            t.join(120)
        for i in range(24):
            assert not isinstance(results[i], Exception), results[i]
            assert len(tokens_of(results[i])) == 200 and results[i][-1].finish_reason == "length"
        assert server.proc.wait(60) == 0, server.log[-3000:]
        channel.close()
        assert '"event": "server_stopped", "aborted_on_shutdown": 0' in server.log
    finally:
        server.kill()
