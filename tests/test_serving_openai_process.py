"""The HTTP API as users run it: `meshserve serve --http-port` in a subprocess, driven by
the `openai` client and `meshserve bench-serving --backend openai`; HTTPS with the gRPC
server's certificates (TLS and mutual TLS); on-demand profiling over HTTP and gRPC; the
runtime topology in GetServerInfo."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import jax
import openai
import pytest

from meshserve.serving.proto import meshserve_pb2 as pb
from tests.serving_fixtures import (  # noqa: F401
    REPO,
    SERVING_FLAGS,
    ServeProcess,
    demo_ckpt,
    demo_model,
    request,
    running_server,
    stub_for,
    subprocess_env,
    tokens_of,
)
from tests.test_serving_security import certs  # noqa: F401

TOKEN = "tok-http-0123456789abcdef"


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshserve.tools.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _metrics(base: str) -> str:
    req = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    return urllib.request.urlopen(req, timeout=10).read().decode()


def test_serve_http_port_with_openai_client_and_bench_serving(demo_ckpt, tmp_path):  # noqa: F811
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    server = ServeProcess("--checkpoint", demo_ckpt, "--warmup=false", *SERVING_FLAGS,
                          "--auth-token-file", str(token), "--http-port", "0",
                          "--served-model-name", "demo", "--slo",
                          "ttft_ms=600000,tpot_ms=600000", env=subprocess_env())
    try:
        assert server.http_port, server.tail()
        base = f"http://127.0.0.1:{server.http_port}"
        with openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0) as client:
            assert [m.id for m in client.models.list().data] == ["demo"]
            r = client.completions.create(model="demo", prompt="Hello mesh", max_tokens=8,
                                          extra_body={"ignore_eos": True,
                                                      "return_token_ids": True})
        channel, stub = stub_for(server.target)
        with channel:
            served = tokens_of(stub.Generate(
                request("Hello mesh", max_tokens=8, ignore_eos=True),
                metadata=[("authorization", f"Bearer {TOKEN}")]))
        assert r.model_dump()["choices"][0]["token_ids"] == served

        out = tmp_path / "bench.json"
        bench = _cli("bench-serving", "--backend", "openai", "--base-url", base + "/v1",
                     "--auth-token-file", str(token), "--vocab-size", "512",
                     "--num-prompts", "8", "--request-rate", "40", "--input-len", "24",
                     "--output-len", "8", "--slo", "ttft_ms=60000,tpot_ms=60000",
                     "--out", str(out), "--max-duration", "120")
        assert bench.returncode == 0, bench.stderr
        result = json.loads(out.read_text())
        assert result["completed"] == 8 and result["failed"] == 0, result["errors"]
        assert result["total_output_tokens"] == 64 and result["model"] == "demo"
        assert result["backend"] == "openai"
        assert result["goodput"] == result["request_throughput"] > 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert 0 < result[key]["p50"] <= result[key]["p99"], key
        text = _metrics(base)
        assert 'meshserve_requests_within_slo_total{slice="0"} 10.0' in text  # 2 + 8 requests
        assert 'vllm:request_success_total{engine="0",finished_reason="length",' \
               'model_name="demo"} 10.0' in text
        assert "vllm:request_time_per_output_token_seconds_count" in text
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log[-3000:]


def test_https_and_mutual_tls(demo_model, certs, tmp_path):  # noqa: F811
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_bytes(certs[name])
    trust = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with running_server(demo_model, http_port=0, tls_cert=certs["server.pem"],
                        tls_key=certs["server.key"]) as s:
        base = f"https://localhost:{s.server.http_port}/v1"
        http = openai.DefaultHttpxClient(verify=trust)
        with openai.OpenAI(base_url=base, api_key="x", max_retries=0, http_client=http) as c:
            r = c.completions.create(model=s.server.model_name, prompt=[1, 5, 6], max_tokens=3,
                                     extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 3
        with pytest.raises(Exception):  # noqa: B017 - plaintext against a TLS port fails
            urllib.request.urlopen(f"http://127.0.0.1:{s.server.http_port}/health", timeout=5)
    with running_server(demo_model, http_port=0, tls_cert=certs["server.pem"],
                        tls_key=certs["server.key"], tls_client_ca=certs["ca.pem"]) as s:
        base = f"https://localhost:{s.server.http_port}/v1"
        with openai.OpenAI(base_url=base, api_key="x", max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=trust)) as c:
            with pytest.raises(openai.APIConnectionError):  # no client certificate
                c.models.list()
        mutual = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        mutual.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
        with openai.OpenAI(base_url=base, api_key="x", max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=mutual)) as c:
            assert [m.id for m in c.models.list().data] == [s.server.model_name]


def test_profiling_on_demand_over_http_and_grpc(demo_model, tmp_path):  # noqa: F811
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    metadata = [("authorization", f"Bearer {TOKEN}")]
    with running_server(demo_model, http_port=0, auth_token=TOKEN.encode(),
                        profile_dir=str(tmp_path / "profiles")) as s:
        base = f"http://127.0.0.1:{s.server.http_port}"

        def post(path: str, headers=None) -> tuple[int, dict]:
            req = urllib.request.Request(base + path, data=b"", method="POST",
                                         headers=headers or {})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        assert post("/start_profile")[0] == 401  # writes files: the token is required
        status, body = post("/start_profile", bearer)
        assert status == 200 and body["profile_dir"] == str(tmp_path / "profiles")
        assert post("/start_profile", bearer)[0] == 409
        with openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0) as c:
            r = c.completions.create(model=s.server.model_name, prompt=[1, 5, 6], max_tokens=8,
                                     extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 8
        status, body = post("/stop_profile", bearer)
        assert status == 200 and body["seconds"] > 0
        assert any(f.endswith(".xplane.pb") for f in body["files"]), body
        assert all(os.path.getsize(f) > 0 for f in body["files"])
        assert post("/stop_profile", bearer)[0] == 409

        channel, stub = stub_for(s.target)
        with channel:
            started = stub.StartProfile(pb.StartProfileRequest(), metadata=metadata)
            assert started.profile_dir == str(tmp_path / "profiles")
            assert len(tokens_of(stub.Generate(request(token_ids=[1, 5, 6], max_tokens=4,
                                                       ignore_eos=True),
                                               metadata=metadata))) == 4
            stopped = stub.StopProfile(pb.StopProfileRequest(), metadata=metadata)
            assert any(f.endswith(".xplane.pb") for f in stopped.files)
            assert not set(stopped.files) & set(body["files"])  # a run of its own
            with pytest.raises(grpc.RpcError) as info:
                stub.StopProfile(pb.StopProfileRequest(), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.RpcError) as info:
                stub.StartProfile(pb.StartProfileRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with running_server(demo_model) as s:  # no --profile-dir: off
        channel, stub = stub_for(s.target)
        with channel:
            with pytest.raises(grpc.RpcError) as info:
                stub.StartProfile(pb.StartProfileRequest())
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--profile-dir" in info.value.details()
            server_info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert server_info.platform == "cpu" and server_info.process_count == 1
    assert server_info.jax_version == jax.__version__ and server_info.jaxlib_version
    assert "XLA:CPU" in server_info.collective_implementation
    (devices,) = [list(sl.device_info) for sl in server_info.slices]
    assert [d.kind for d in devices] == ["cpu"] and devices[0].platform == "cpu"
    assert devices[0].id == 0 and devices[0].process_index == 0  # the slice on device 0
    assert not devices[0].coords  # only TPUs have physical coordinates
