"""The step channel over TLS on loopback: steps arrive intact, the wire shows no token
ids, a plaintext follower is refused, and a relay with a certificate of its own cannot
join (the leader's certificate is bound into the HMAC keys)."""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading

import jax
import numpy as np
import pytest

from meshserve.engine.multihost import decode_step, encode_step
from meshserve.engine.step_channel import ChannelError, FollowerLink, LeaderLink
from meshserve.engine.step_tls import LeaderTls, TlsSocket, follower_context, server_context
from tests.serving_fixtures import demo_ckpt  # noqa: F401
from tests.test_serving_security import certs  # noqa: F401
from tests.test_step_channel import CONFIG, SECRET, _step_inputs


class Relay:
    """A TCP relay in front of the leader recording every byte it forwards; with
    `terminate` it ends TLS itself (its own certificate) towards both sides."""

    def __init__(self, port: int, terminate: tuple[bytes, bytes] | None = None):
        self.upstream = port
        self.terminate = terminate
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.captured = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            down, _ = self.server.accept()
        except OSError:
            return
        up = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
        down.settimeout(10)
        if self.terminate:
            down = TlsSocket(down, server_context(*self.terminate), server_side=True)
            up = TlsSocket(up, follower_context(), server_side=False)
            try:
                down.handshake()
                up.handshake()
            except OSError:
                return
        for src, dst in ((down, up), (up, down)):
            threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        buf = memoryview(bytearray(1 << 16))
        try:
            while n := src.recv_into(buf):
                with self.lock:
                    self.captured += buf[:n]
                dst.sendall(bytes(buf[:n]))
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


def _connect(port: int, tls: bool, out: dict) -> threading.Thread:
    def follow() -> None:
        link = FollowerLink("127.0.0.1", port, SECRET, 1, 2, CONFIG, 5.0, tls=tls)
        try:
            link.connect(5.0)
            out["follower"] = link
        except ChannelError as e:
            out["follower"] = e

    thread = threading.Thread(target=follow)
    thread.start()
    return thread


def _leader(certs, log=None) -> LeaderLink:  # noqa: F811
    tls = LeaderTls.from_pem(certs["server.pem"], certs["server.key"])
    return LeaderLink("127.0.0.1", 0, SECRET, 2, CONFIG, 5.0, tls=tls,
                      log=None if log is None else (lambda name, **kw: log.append((name, kw))))


@pytest.mark.parametrize("tls", [True, False])
def test_steps_cross_tls_intact_and_the_wire_shows_no_token_ids(certs, tls):  # noqa: F811
    leader = _leader(certs) if tls else LeaderLink("127.0.0.1", 0, SECRET, 2, CONFIG, 5.0)
    relay = Relay(leader.port)
    out: dict = {}
    thread = _connect(relay.port, tls, out)
    template, inputs = _step_inputs(0)
    # Token ids no random filler produces: 4-byte values 70001, 70002, ...
    tokens = np.arange(70001, 70001 + inputs.tokens.size, dtype=np.int32).reshape(
        inputs.tokens.shape)
    inputs = dataclasses.replace(inputs, tokens=tokens)
    try:
        leader.accept_all(10.0)
        thread.join(10)
        follower = out["follower"]
        assert isinstance(follower, FollowerLink), follower
        leader.start(lambda reason: None)
        follower.start(lambda reason: None)
        for index in range(3):
            leader.broadcast(encode_step(index, inputs, decode=False))
        for index in range(3):
            got_index, got, _ = decode_step(follower.next_message(5.0), template)
            assert got_index == index
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(inputs), strict=True):
                assert np.array_equal(a, b)
        with relay.lock:
            wire = bytes(relay.captured)
        assert len(wire) > 3 * tokens.nbytes
        # In clear the ids are on the wire (so the capture is meaningful); with TLS none
        # of them, nor any 8-byte run of them, is.
        runs = [tokens.tobytes()[i:i + 8] for i in range(0, tokens.nbytes - 8, 4)]
        assert any(r in wire for r in runs) == (not tls)
        assert (b"hello" in wire and b"process_id" in wire) == (not tls)
    finally:
        if isinstance(out.get("follower"), FollowerLink):
            out["follower"].close()
        leader.stop("test over", linger=0.0)
        relay.close()


def test_a_plaintext_follower_is_refused_and_a_tls_one_then_joins(certs):  # noqa: F811
    log: list = []
    leader = _leader(certs, log)
    plain: dict = {}
    joined: dict = {}
    try:
        first = _connect(leader.port, False, plain)
        accept = threading.Thread(target=leader.accept_all, args=(15.0,))
        accept.start()
        first.join(10)
        assert isinstance(plain["follower"], ChannelError), plain
        _connect(leader.port, True, joined).join(10)
        accept.join(15)
        assert isinstance(joined["follower"], FollowerLink), joined
        assert set(leader.followers) == {1}
        refused = [kw["reason"] for name, kw in log if name == "step_channel_refused"]
        assert len(refused) == 1 and "TLS handshake failed" in refused[0]
    finally:
        if isinstance(joined.get("follower"), FollowerLink):
            joined["follower"].close()
        leader.stop("test over", linger=0.0)


def test_a_relay_presenting_its_own_certificate_cannot_join(certs):  # noqa: F811
    log: list = []
    leader = _leader(certs, log)
    relay = Relay(leader.port, terminate=(certs["rogue.pem"], certs["rogue.key"]))
    out: dict = {}
    try:
        thread = _connect(relay.port, True, out)
        with pytest.raises(ChannelError, match="did not join"):
            leader.accept_all(3.0)
        thread.join(10)
        assert isinstance(out["follower"], ChannelError), out
        refused = [kw["reason"] for name, kw in log if name == "step_channel_refused"]
        assert refused and "failed authentication" in refused[0]
        assert not leader.followers
    finally:
        leader.stop("test over", linger=0.0)
        relay.close()


def test_a_group_with_tls_certificates_serves_over_an_encrypted_step_channel(
        demo_ckpt, certs, tmp_path):  # noqa: F811
    """`meshserve serve --tls-cert/--tls-key` on 2 processes: the step channel is TLS
    (the leader says so, the follower joined over it) and requests stream as usual."""
    import grpc

    from meshserve.serving.proto import meshserve_pb2_grpc as pb_grpc
    from tests.serving_fixtures import request, tokens_of
    from tests.test_multihost import ENGINE_FLAGS, GROUP_FLAGS, start_group

    for name in ("server.pem", "server.key"):
        (tmp_path / name).write_bytes(certs[name])
    group = start_group("--checkpoint", demo_ckpt, "--mesh", "tensor=8", *GROUP_FLAGS,
                        *ENGINE_FLAGS, "--tls-cert", str(tmp_path / "server.pem"),
                        "--tls-key", str(tmp_path / "server.key"))
    leader, follower = group
    try:
        leader.wait_for(r'"step_channel_listening".*"tls": true', 150)
        follower.wait_for('"follower_started"', 150)
        port = int(leader.wait_for(r'"server_started".*?"port": (\d+)', 150).group(1))
        creds = grpc.ssl_channel_credentials(root_certificates=certs["ca.pem"])
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            stub = pb_grpc.MeshServeStub(channel)
            chunks = list(stub.Generate(request(token_ids=[1, 5, 9, 3], max_tokens=6,
                                                ignore_eos=True), timeout=120))
        assert len(tokens_of(chunks)) == 6 and chunks[-1].finish_reason == "length"
        leader.proc.send_signal(signal.SIGTERM)
        assert leader.proc.wait(60) == 0, leader.log[-3000:] + follower.log[-2000:]
        assert follower.proc.wait(30) == 0, follower.log[-3000:]
    finally:
        for p in group:
            p.kill()
