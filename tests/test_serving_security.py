"""Bearer-token auth, TLS and mutual TLS, health checks and server reflection.

Test certificates come from the `openssl` CLI (the `cryptography` package is not a
dependency): a throwaway CA, a server certificate for localhost/127.0.0.1 and a client
certificate, all signed by it.
"""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meshserve.serving.proto import meshserve_pb2 as pb
from tests.serving_fixtures import (  # noqa: F401
    demo_ckpt,
    demo_model,
    error_of,
    request,
    running_server,
    stub_for,
    tokens_of,
)

TOKEN = "s3cret-token-for-tests-0123456789"
GOOD = dict(token_ids=[1, 5, 6], max_tokens=3, ignore_eos=True)
SERVICE = "meshserve.v1.MeshServe"


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, bytes]:
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl CLI (apt-get install openssl)")
    d = tmp_path_factory.mktemp("certs")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=meshserve test CA", cwd=d)
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                      ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=meshserve test {name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)
    # A second, unrelated CA: its client certificate must be refused under mTLS.
    _openssl("req", "-x509", *ec, "-keyout", "rogue.key", "-out", "rogue.pem", "-days", "2",
             "-subj", "/CN=rogue", cwd=d)
    return {p.name: p.read_bytes() for p in d.iterdir() if p.suffix in (".pem", ".key")}


def _health(target: str, service: str, credentials=None) -> int:
    channel = (grpc.insecure_channel(target) if credentials is None
               else grpc.secure_channel(target, credentials))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_bearer_token(demo_model):  # noqa: F811
    with running_server(demo_model, auth_token=TOKEN.encode()) as server:
        channel, stub = stub_for(server.target)
        with channel:
            ok = tokens_of(stub.Generate(request(**GOOD),
                                         metadata=[("authorization", f"Bearer {TOKEN}")]))
            assert len(ok) == 3
            for metadata in ([], [("authorization", f"Bearer {TOKEN}x")],
                             [("authorization", TOKEN)], [("authorization", "Bearer ")],
                             [("authorization", f"Bearer {TOKEN[:-1]}")]):
                e = error_of(stub.Generate, request(**GOOD), metadata=metadata)
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
                assert "bearer token" in e.details()
            e = error_of(stub.GetServerInfo, pb.GetServerInfoRequest())
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED
            info = stub.GetServerInfo(pb.GetServerInfoRequest(),
                                      metadata=[("authorization", f"Bearer {TOKEN}")])
            assert info.slice_count == 1
            # Health checks need no token, so probes work without credentials.
            assert _health(server.target, "") == health_pb2.HealthCheckResponse.SERVING
            assert _health(server.target, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        rejected = server.server.metrics.registry.get_sample_value(
            "meshserve_requests_rejected_total", {"reason": "unauthenticated"})
        assert rejected == 6


def test_tls_and_mutual_tls(demo_model, certs):  # noqa: F811
    trust = grpc.ssl_channel_credentials(certs["ca.pem"])
    with running_server(demo_model, tls_cert=certs["server.pem"],
                        tls_key=certs["server.key"]) as server:
        channel, stub = stub_for(server.target, trust)
        with channel:
            assert len(tokens_of(stub.Generate(request(**GOOD)))) == 3
        # Plaintext against a TLS port fails.
        channel, stub = stub_for(server.target)
        with channel:
            assert error_of(stub.Generate, request(**GOOD),
                            timeout=5).code() == grpc.StatusCode.UNAVAILABLE

    with running_server(demo_model, tls_cert=certs["server.pem"], tls_key=certs["server.key"],
                        tls_client_ca=certs["ca.pem"]) as server:
        mutual = grpc.ssl_channel_credentials(certs["ca.pem"], certs["client.key"],
                                              certs["client.pem"])
        channel, stub = stub_for(server.target, mutual)
        with channel:
            assert len(tokens_of(stub.Generate(request(**GOOD)))) == 3
        for creds in (trust, grpc.ssl_channel_credentials(certs["ca.pem"], certs["rogue.key"],
                                                          certs["rogue.pem"])):
            channel, stub = stub_for(server.target, creds)
            with channel:
                e = error_of(stub.Generate, request(**GOOD), timeout=5)
                assert e.code() == grpc.StatusCode.UNAVAILABLE


def test_health_and_reflection(demo_model):  # noqa: F811
    with running_server(demo_model) as server:
        assert _health(server.target, "") == health_pb2.HealthCheckResponse.SERVING
        assert _health(server.target, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(server.target) as channel:
            e = error_of(health_pb2_grpc.HealthStub(channel).Check,
                         health_pb2.HealthCheckRequest(service="nope"))
            assert e.code() == grpc.StatusCode.NOT_FOUND
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = list(reflect.ServerReflectionInfo(iter([
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
            ])))
        services = {s.name for s in replies[0].list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= services
        protos = replies[1].file_descriptor_response.file_descriptor_proto
        assert protos and b"GenerateRequest" in protos[0]
        # Draining: readiness goes NOT_SERVING while liveness stays SERVING.
        server.call(server.server.drain())
        assert _health(server.target, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(server.target, "") == health_pb2.HealthCheckResponse.SERVING
        channel, stub = stub_for(server.target)
        with channel:
            e = error_of(stub.Generate, request(**GOOD))
            assert e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.details()
