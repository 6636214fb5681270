"""The multi-host step channel on loopback: handshake, authentication, limits, liveness."""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import threading
import time

import msgpack
import numpy as np
import pytest

from meshserve.engine.batching import build_inputs
from meshserve.engine.config import EngineConfig
from meshserve.engine.multihost import decode_step, encode_step
from meshserve.engine.scheduler import StepPlan
from meshserve.engine.step_channel import (
    ChannelError,
    Connection,
    FollowerLink,
    GroupMismatchError,
    LeaderLink,
    pack_array,
    unpack_array,
)

SECRET = b"0123456789abcdef-test-secret"
CONFIG = {"mesh": "data=2,tensor=4", "engine": {"max_seqs": 8, "page_size": 16}}


def _join(leader_secret=SECRET, follower_secret=SECRET, leader_n=2, follower_n=2,
          follower_config=None, heartbeat=5.0, accept_timeout=5.0):
    """A leader and one follower (process 1); returns (leader, follower or error,
    leader error)."""
    leader = LeaderLink("127.0.0.1", 0, leader_secret, leader_n, CONFIG, heartbeat)
    out: dict[str, object] = {}

    def follow() -> None:
        link = FollowerLink("127.0.0.1", leader.port, follower_secret, 1, follower_n,
                            follower_config or CONFIG, heartbeat)
        try:
            link.connect(5.0)
            out["follower"] = link
        except ChannelError as e:
            out["follower"] = e

    thread = threading.Thread(target=follow)
    thread.start()
    leader_error = None
    try:
        leader.accept_all(accept_timeout)
    except ChannelError as e:
        leader_error = e
    thread.join(10)
    return leader, out["follower"], leader_error


def _wait(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _step_inputs(seed: int):
    cfg = EngineConfig(page_size=16, num_pages=8, max_seqs=4, max_step_tokens=16)
    template = build_inputs(StepPlan(decode=False, shards=[[], []]), cfg, 4, 0)
    rng = np.random.default_rng(seed)

    def fill(x):
        x = np.asarray(x)
        if x.dtype == bool:
            return rng.random(x.shape) < 0.5
        return (rng.random(x.shape) * 100).astype(x.dtype)

    import jax

    return template, jax.tree.map(fill, template)


def test_steps_cross_the_channel_intact_and_followers_report_them_done():
    leader, follower, error = _join()
    assert error is None and isinstance(follower, FollowerLink), follower
    failures: list[str] = []
    try:
        leader.start(failures.append)
        follower.start(failures.append)
        template, inputs = _step_inputs(0)
        for index in range(3):
            leader.broadcast(encode_step(index, inputs, decode=index % 2 == 1))
        import jax

        for index in range(3):
            message = follower.next_message(5.0)
            got_index, got, decode = decode_step(message, template)
            assert (got_index, decode) == (index, index % 2 == 1)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(inputs), strict=True):
                assert a.dtype == np.asarray(b).dtype and np.array_equal(a, b)
        assert not leader.finished(2)
        follower.report_done(2)
        _wait(lambda: leader.finished(2))
        leader.stop("done", linger=2.0)
        assert follower.next_message(5.0) == {"t": "stop", "reason": "done", "failed": False}
        assert failures == []
    finally:
        follower.close()
        leader.stop("test over", linger=0.0)


def test_a_wrong_secret_is_refused_and_the_leader_keeps_waiting():
    leader, follower, error = _join(follower_secret=b"another-secret-of-16+bytes",
                                    accept_timeout=2.0)
    try:
        assert isinstance(follower, ChannelError)
        assert "same multi-host secret" in str(follower)
        assert isinstance(error, ChannelError) and "processes [1] did not join" in str(error)
    finally:
        leader.stop("test over", linger=0.0)


@pytest.mark.parametrize("case", ["count", "config"])
def test_a_misconfigured_follower_is_rejected_with_the_reason(case):
    kwargs = {"follower_n": 3} if case == "count" else {
        "follower_config": {**CONFIG, "engine": {"max_seqs": 16, "page_size": 16}}}
    leader, follower, error = _join(**kwargs)
    try:
        assert isinstance(error, GroupMismatchError)
        assert isinstance(follower, ChannelError) and str(error) in str(follower)
        if case == "count":
            assert "started with --num-processes 3 but the leader with 2" in str(error)
        else:
            assert "engine.max_seqs 16 (leader: 8)" in str(error)
    finally:
        leader.stop("test over", linger=0.0)


def test_forged_replayed_and_oversized_frames_are_rejected():
    a, b = socket.socketpair()
    sender, receiver = Connection(a, 5.0), Connection(b, 5.0, max_message_bytes=1024)
    key = b"k" * 32
    sender.authenticate(key, key)
    receiver.authenticate(key, key)
    sender.send({"t": "hb"})
    assert receiver.recv() == {"t": "hb"}

    payload = msgpack.packb({"t": "step"})
    frame = struct.pack(">I", len(payload)) + payload
    a.sendall(frame + b"\0" * 32)  # no valid MAC
    with pytest.raises(ChannelError, match="failed authentication"):
        receiver.recv()

    receiver = Connection(b, 5.0, max_message_bytes=1024)
    receiver.authenticate(key, key)
    good = hmac.new(key, (0).to_bytes(8, "big") + payload, hashlib.sha256).digest()
    a.sendall(frame + good)
    assert receiver.recv() == {"t": "step"}
    a.sendall(frame + good)  # the same frame again: its sequence number is used up
    with pytest.raises(ChannelError, match="failed authentication"):
        receiver.recv()

    receiver = Connection(b, 5.0, max_message_bytes=1024)
    a.sendall(struct.pack(">I", 1 << 30))
    with pytest.raises(ChannelError, match="limit is 1024"):
        receiver.recv()
    with pytest.raises(ChannelError, match="exceeds the limit"):
        Connection(a, 5.0, max_message_bytes=64).send({"t": "x", "pad": "y" * 100})
    a.close()
    b.close()


def test_arrays_are_rebuilt_only_from_checked_fields():
    for x in (np.arange(6, dtype=np.int32).reshape(2, 3), np.bool_(True), np.float32(1.5)):
        packed = pack_array(x)
        back = unpack_array(packed, ("int32", "bool", "float32"))
        assert back.shape == np.shape(x) and back.dtype == np.asarray(x).dtype
        assert np.array_equal(back, x)
    ok = pack_array(np.zeros((2, 2), np.int32))
    with pytest.raises(ChannelError, match="dtype"):
        unpack_array({**ok, "dtype": "object"}, ("int32", "object"))
    with pytest.raises(ChannelError, match="dtype"):
        unpack_array(ok, ("float32",))
    with pytest.raises(ChannelError, match="needs 16 bytes"):
        unpack_array({**ok, "data": b"\0" * 15}, ("int32",))
    with pytest.raises(ChannelError, match="shape"):
        unpack_array({**ok, "shape": [-1, 2]}, ("int32",))
    with pytest.raises(ChannelError, match="map of dtype"):
        unpack_array({**ok, "extra": 1}, ("int32",))


def test_a_dead_follower_and_a_silent_leader_are_detected():
    leader, follower, _ = _join(heartbeat=0.5)
    failures: list[str] = []
    lost: list[str] = []
    try:
        leader.start(failures.append)
        follower.start(lost.append)
        time.sleep(1.0)  # heartbeats keep both sides quiet
        assert failures == [] and lost == []
        t0 = time.monotonic()
        follower.conn.sock.close()  # as the kernel does for a killed process
        _wait(lambda: failures, timeout=2.0)
        assert time.monotonic() - t0 < 0.5
        assert failures[0].startswith("process 1:")
    finally:
        leader.stop("test over", linger=0.0)
        follower.close()

    leader, follower, _ = _join(heartbeat=0.5)
    lost = []
    try:
        leader._stopped.set()  # the leader falls silent (as if hung) but stays connected
        follower.start(lost.append)
        t0 = time.monotonic()
        _wait(lambda: lost, timeout=3.0)
        assert 0.4 < time.monotonic() - t0 < 1.5
        assert "lost the leader" in lost[0] and "sent nothing for 0.5s" in lost[0]
    finally:
        leader.stop("test over", linger=0.0)
        follower.close()
