"""Prefill/decode across processes on loopback: `meshserve serve --role prefill`
subprocesses, and a `--role decode` server (in this process, on the shared demo engine)
that prefills on them, pulls the KV through jax.experimental.transfer and decodes.

Greedy outputs equal the colocated server's (KV through jax.experimental.transfer, and
on the internal call under mutual TLS); a prefill peer killed after the first token ends
the stream with UNAVAILABLE at once and nothing repeated; a dead peer before the first
token is retried on the other one; an offer nobody pulls is reclaimed; the internal API
needs the bearer token; pages end free on both sides.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from meshserve.serving.disagg_roles import DisaggOptions
from meshserve.serving.proto import internal_pb2 as ipb
from meshserve.serving.proto import internal_pb2_grpc as ipb_grpc
from meshserve.serving.remote_prefill import DecodeOptions
from tests.serving_fixtures import (  # noqa: F401
    REPO,
    SERVING_FLAGS,
    ServeProcess,
    ServerThread,
    demo_ckpt,
    demo_model,
    request,
    running_server,
    stub_for,
    tokens_of,
    wait_idle,
)
from tests.test_serving_security import certs  # noqa: F401

PREFILL_FLAGS = ("--warmup=false", *SERVING_FLAGS, "--role", "prefill", "--kv-offer-ttl", "20")
TOKEN = b"peer-token-0123456789"
AUTH = (("authorization", "Bearer " + TOKEN.decode()),)
# Mixed prompt lengths (1 to 5 pages of 16) and output lengths.
CASES = [(list(range(3, 3 + n)), m) for n, m in ((5, 6), (17, 9), (40, 4), (70, 12), (1, 7),
                                                  (33, 1))]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("disagg") / "token"
    path.write_bytes(TOKEN + b"\n")
    return str(path)


def _prefill_server(ckpt: str, token_file: str) -> ServeProcess:
    from tests.serving_fixtures import subprocess_env

    return ServeProcess("--checkpoint", ckpt, *PREFILL_FLAGS, "--auth-token-file", token_file,
                        env=subprocess_env())


@pytest.fixture(scope="module")
def prefill_peer(demo_ckpt, token_file):  # noqa: F811
    with _prefill_server(demo_ckpt, token_file) as p:
        yield p


def _decode(model, *peers: str, **kw) -> ServerThread:
    options = DecodeOptions(**kw.pop("tls", {}), prefill_peers=peers,
                            prefill_timeout_s=kw.pop("prefill_timeout", 20.0),
                            transfer_timeout_s=kw.pop("transfer_timeout", 30.0),
                            failure_backoff_s=kw.pop("backoff", 0.0),
                            peer_auth_token=kw.pop("token", TOKEN),
                            kv_transport=kw.pop("kv_transport", "jax"))
    return ServerThread(model, disagg=DisaggOptions(role="decode", decode=options), **kw)


def _run(target: str, cases, metadata=()) -> list[tuple[list[int], str, object]]:
    channel, stub = stub_for(target)

    def one(i: int):
        ids, n = cases[i]
        out = list(stub.Generate(request(token_ids=ids, max_tokens=n, ignore_eos=True,
                                         request_id=f"r{i}-{os.getpid()}-{time.monotonic_ns()}"),
                                 timeout=120, metadata=metadata))
        return tokens_of(out), "".join(r.text for r in out), out[-1]

    with channel, concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        return list(pool.map(one, range(len(cases))))


def _sample(server: ServerThread, name: str, **labels) -> float:
    return server.server.metrics.registry.get_sample_value(name, labels) or 0.0


def _peer_idle(target: str, timeout: float = 10.0) -> ipb.Load:
    with grpc.insecure_channel(target) as channel:
        stub = ipb_grpc.PrefillStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            load = stub.GetLoad(ipb.LoadRequest(), timeout=5, metadata=AUTH)
            if (load.pending_offers == 0 and load.running == 0 and load.waiting == 0
                    and load.free_pages == load.total_pages):
                return load
            assert time.monotonic() < deadline, f"prefill peer not idle: {load}"
            time.sleep(0.05)


def test_remote_prefill_outputs_equal_colocated(demo_model, prefill_peer):  # noqa: F811
    with running_server(demo_model) as colocated:
        want = _run(colocated.target, CASES)
    decode = _decode(demo_model, prefill_peer.target)
    try:
        got = _run(decode.target, CASES)
        for (ids, text, final), (wids, wtext, wfinal), (_, n) in zip(got, want, CASES,
                                                                    strict=True):
            assert ids == wids and len(ids) == n  # nothing repeated, nothing lost
            assert text == wtext
            assert final.finish_reason == wfinal.finish_reason == "length"
            assert final.usage.completion_tokens == n
            t = final.timings  # per stage, the prefill side's and ours
            assert t.ttft_ms > 0 and t.e2e_ms >= t.ttft_ms
            if n > 1:
                assert t.prefill_ms > 0 and t.transfer_ms > 0 and t.decode_ms > 0
                assert t.kv_transfer_bytes > 0
        # Every request but the one done by its first token moved its KV here.
        moved = sum(1 for _, n in CASES if n > 1)
        assert _sample(decode, "meshserve_kv_transfer_bytes_count") == moved
        nbytes = _sample(decode, "meshserve_kv_transfer_bytes_sum")
        seconds = _sample(decode, "meshserve_kv_transfer_seconds_sum")
        pull = _sample(decode, "meshserve_disagg_stage_seconds_sum", role="decode",
                       stage="pull")
        print(f"\nKV moved: {moved} requests, {nbytes / moved / 1024:.1f} KiB, "
              f"{seconds / moved * 1e3:.2f} ms first token -> KV here, of which the pull "
              f"{pull / moved * 1e3:.2f} ms, per request (loopback)")
        assert nbytes > 0 and _sample(decode, "meshserve_prefill_retries_total") == 0
        wait_idle(demo_model.slices[0].engine)
        _peer_idle(prefill_peer.target)
    finally:
        decode.stop()
    # The KV on the internal call itself (under its TLS when it has one): same outputs.
    decode = _decode(demo_model, prefill_peer.target, kv_transport="grpc", http_port=0)
    try:
        got = _run(decode.target, CASES[:4])
        assert [g[0] for g in got] == [w[0] for w in want[:4]]
        assert [g[1] for g in got] == [w[1] for w in want[:4]]
        assert _sample(decode, "meshserve_kv_transfer_bytes_count") == 4
        # The HTTP API shares the request path: the same completion.
        ids, n = CASES[3]
        body = json.dumps({"model": decode.server.model_name, "prompt": ids, "max_tokens": n,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{decode.server.http_port}/v1/completions", body,
            {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.load(r)["choices"][0]["text"] == want[3][1]
        assert _sample(decode, "meshserve_kv_transfer_bytes_count") == 5
        wait_idle(demo_model.slices[0].engine)
        _peer_idle(prefill_peer.target)
    finally:
        decode.stop()


def test_mutual_tls_peer_with_the_kv_on_the_call(demo_ckpt, demo_model, certs,  # noqa: F811
                                                 token_file, tmp_path):
    """Encrypted end to end: the prefill server demands client certificates, the KV
    comes on the TLS call (--kv-transport grpc), and plaintext to the peer fails."""
    from tests.serving_fixtures import subprocess_env

    for name in ("server.pem", "server.key", "ca.pem"):
        (tmp_path / name).write_bytes(certs[name])
    peer = ServeProcess("--checkpoint", demo_ckpt, *PREFILL_FLAGS, "--auth-token-file",
                        token_file, "--tls-cert", str(tmp_path / "server.pem"), "--tls-key",
                        str(tmp_path / "server.key"), "--tls-client-ca",
                        str(tmp_path / "ca.pem"), env=subprocess_env())
    tls = dict(peer_tls=True, peer_tls_ca=certs["ca.pem"], peer_tls_cert=certs["client.pem"],
               peer_tls_key=certs["client.key"])
    target = f"localhost:{peer.port}"  # the name the server certificate is issued for
    try:
        with running_server(demo_model) as colocated:
            want = _run(colocated.target, CASES[1:3])
        decode = _decode(demo_model, target, tls=tls, kv_transport="grpc")
        try:
            got = _run(decode.target, CASES[1:3])
            assert [g[0] for g in got] == [w[0] for w in want]
            assert _sample(decode, "meshserve_kv_transfer_bytes_count") == 2
        finally:
            decode.stop()
        decode = _decode(demo_model, target)  # no TLS: refused, no retry target left
        try:
            channel, stub = stub_for(decode.target)
            with channel, pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request(token_ids=[1, 2, 3], max_tokens=4), timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            decode.stop()
        wait_idle(demo_model.slices[0].engine)
    finally:
        peer.kill()


def test_prefill_on_another_layout(demo_ckpt, demo_model, token_file):  # noqa: F811
    """A tensor=2 prefill server, a one-device decode server: the offer's layout differs
    from the destination's, so the pull is staged in the offer's layout and resharded."""
    from tests.serving_fixtures import subprocess_env

    peer = ServeProcess("--checkpoint", demo_ckpt, *PREFILL_FLAGS, "--mesh", "tensor=2",
                        "--auth-token-file", token_file, env=subprocess_env())
    try:
        with running_server(demo_model) as colocated:
            want = _run(colocated.target, CASES[:3])
        decode = _decode(demo_model, peer.target)
        try:
            got = _run(decode.target, CASES[:3])
            assert [g[0] for g in got] == [w[0] for w in want]
            assert decode.server.role.transport.stats.resharded == 3
            wait_idle(demo_model.slices[0].engine)
            _peer_idle(peer.target)
        finally:
            decode.stop()
    finally:
        peer.kill()


def test_internal_api_needs_the_token(demo_model, prefill_peer):  # noqa: F811
    with grpc.insecure_channel(prefill_peer.target) as channel:
        stub = ipb_grpc.PrefillStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetLoad(ipb.LoadRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        start = ipb.PrefillClientMessage(start=ipb.PrefillStart(request=request(
            token_ids=[1, 2, 3], max_tokens=4, request_id="no-token")))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Prefill(iter([start]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A decode server with the wrong token fails the request at once, without a retry.
    decode = _decode(demo_model, prefill_peer.target, token=b"wrong-token-0123456789")
    try:
        channel, stub = stub_for(decode.target)
        with channel, pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request(token_ids=[1, 2, 3], max_tokens=4), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # grpc-core reports the peer's refusal as UNAUTHENTICATED, or, when the refusal
        # lands while the request is still being written, as its own INTERNAL.
        assert ("UNAUTHENTICATED" in err.value.details()
                or "INTERNAL: Internal error from Core" in err.value.details()), err.value
        assert _sample(decode, "meshserve_prefill_retries_total") == 0
    finally:
        decode.stop()


def test_offer_left_unpulled_is_reclaimed(prefill_peer):
    """A decode server that goes away after the offer (here: a raw client that cancels)
    leaves no pages held on the prefill server."""
    with grpc.insecure_channel(prefill_peer.target) as channel:
        stub = ipb_grpc.PrefillStub(channel)
        start = ipb.PrefillClientMessage(start=ipb.PrefillStart(request=request(
            token_ids=list(range(5, 45)), max_tokens=6, ignore_eos=True,
            request_id="walks-away")))
        gate = threading.Event()

        def messages():
            yield start
            gate.wait(30)  # keep the call open until the offer is in

        call = stub.Prefill(messages(), metadata=AUTH, timeout=60)
        first = next(call)
        assert first.chunk.finish_reason == "prefilled" and len(first.chunk.token_ids) == 1
        offer = next(call).offer
        assert offer.uuid and offer.nbytes > 0 and offer.handoff.request_id == "walks-away"
        (layout,) = offer.layouts
        assert layout.shape[1] == offer.handoff.layout.rows and layout.dtype == "float32"
        before = stub.GetLoad(ipb.LoadRequest(), timeout=5, metadata=AUTH).offers_reclaimed
        call.cancel()
        gate.set()
        load = _peer_idle(prefill_peer.target)
        assert load.offers_reclaimed == before + 1 and load.abandoned_pulls == 0


def test_prefill_peer_stalled_killed_and_dead(demo_ckpt, demo_model, prefill_peer,  # noqa: F811
                                              token_file):
    doomed = _prefill_server(demo_ckpt, token_file)
    # Colocated on the peer itself: a prefill server answers public Generate too.
    want = [w[0] for w in _run(prefill_peer.target, CASES, AUTH)]
    try:
        # 1. Stalled before the first token: past --prefill-timeout the other peer serves
        # it (both idle: the first listed is asked first).
        os.kill(doomed.proc.pid, signal.SIGSTOP)
        decode = _decode(demo_model, doomed.target, prefill_peer.target, prefill_timeout=2.0)
        try:
            began = time.monotonic()
            assert _run(decode.target, [CASES[3]])[0][0] == want[3]
            assert 2.0 <= time.monotonic() - began < 2.0 + 20.0
            assert _sample(decode, "meshserve_prefill_retries_total") == 1
            assert _sample(decode, "meshserve_kv_transfer_failures_total",
                           kind="prefill_timeout") == 1
        finally:
            decode.stop()
            os.kill(doomed.proc.pid, signal.SIGCONT)
        # 2. Killed while prefilling a burst, as soon as the first token reaches a client:
        # with no other peer, each request either finished whole or ended UNAVAILABLE
        # after at most that first token; none hangs, none repeats a token.
        decode = _decode(demo_model, doomed.target)
        channel, stub = stub_for(decode.target)
        try:
            streams = [stub.Generate(request(token_ids=ids, max_tokens=n, ignore_eos=True),
                                     timeout=60) for ids, n in CASES]
            first = threading.Event()

            def drain(i: int):
                got = []
                try:
                    for r in streams[i]:
                        got.extend(r.token_ids)
                        first.set()
                    return got, None
                except grpc.RpcError as e:
                    return got, e.code()

            with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
                futures = [pool.submit(drain, i) for i in range(len(CASES))]
                assert first.wait(60)
                os.kill(doomed.proc.pid, signal.SIGKILL)
                began = time.monotonic()
                results = [f.result(timeout=60) for f in futures]
            assert time.monotonic() - began < 10.0  # broken calls: no timeout waited for
            failed = 0
            for (got, code), w in zip(results, want, strict=True):
                if code is None:
                    assert got == w
                else:
                    failed += 1
                    assert code == grpc.StatusCode.UNAVAILABLE and got == w[:len(got)]
                    assert len(got) <= 1
            print(f"\nprefill peer killed mid-burst: {failed} of {len(CASES)} requests ended "
                  f"UNAVAILABLE ({sum(len(g) for g, c in results if c)} tokens streamed "
                  f"before), the rest finished whole")
            assert failed >= 1
            wait_idle(demo_model.slices[0].engine)
        finally:
            channel.close()
            decode.stop()
    finally:
        doomed.kill()
    # 3. Dead before the request: tried first (both idle), refused at once, retried on the
    # live peer; the output is whole.
    decode = _decode(demo_model, doomed.target, prefill_peer.target)
    try:
        assert _run(decode.target, [CASES[3]])[0][0] == want[3]
        assert _sample(decode, "meshserve_prefill_retries_total") == 1
        assert _sample(decode, "meshserve_kv_transfer_failures_total",
                       kind="prefill_unavailable") == 1
        wait_idle(demo_model.slices[0].engine)
        _peer_idle(prefill_peer.target)
    finally:
        decode.stop()


def test_role_flags_are_checked():
    with pytest.raises(ValueError, match="HOST:PORT"):
        DisaggOptions(role="decode", decode=DecodeOptions(prefill_peers=("nope",))).check()
    with pytest.raises(ValueError, match="--kv-transfer-insecure"):
        DisaggOptions(role="prefill", kv_transfer_address="10.0.0.5:7000").check()
    DisaggOptions(role="prefill", kv_transfer_address="10.0.0.5:7000",
                  kv_transfer_insecure=True).check()
    with pytest.raises(ValueError, match="needs --role decode"):
        DisaggOptions(role="prefill", decode=DecodeOptions(prefill_peers=("h:1",))).check()
    # The CLI refuses before loading anything.
    done = subprocess.run([sys.executable, "-m", "meshserve.tools.cli", "serve", "--checkpoint",
                           "/nonexistent", "--role", "prefill", "--kv-transfer-address",
                           "10.0.0.5:7000"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--kv-transfer-insecure" in done.stderr
