"""The step channel: an authenticated TCP link from the multi-host leader to each follower.

Why a TCP connection of our own rather than JAX's distributed key-value store: a dead
peer shows at once as a closed connection (the kernel closes a killed process's socket),
and a hung one as silence past the heartbeat timeout, detected by a reader thread that
no collective can block; the store has no notion of a peer going away (its blocking
gets wait out their timeout; liveness there is JAX's own heartbeat, which aborts the
process instead of telling us). Each step is one write per follower instead of a round
trip through the coordinator, and nothing accumulates in the store.

Wire format: every frame is a 4-byte big-endian length, a msgpack map (at most
`max_message_bytes`, checked before anything is read) and, after the handshake, a
32-byte HMAC-SHA256 over (sequence number, payload) with a per-direction session key,
so frames cannot be forged, altered, replayed or reordered without the shared secret.
Arrays travel as {dtype, shape, data} and are rebuilt with `np.frombuffer` after their
dtype (from an allow-list) and byte count are checked; nothing is unpickled or
evaluated. With TLS (engine/step_tls.py) frames are encrypted; without, they are in clear.

Handshake (follower → leader), after TLS's if on: hello {process_id, num_processes,
nonce} → challenge {nonce} → both derive the session keys from the secret, both nonces
and (TLS) the leader's certificate → join {config} (authenticated) → welcome, or reject
{reason} when the process count, id or configuration differs from the leader's.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgpack
import numpy as np

from meshserve.engine.step_tls import LeaderTls, TlsSocket, certificate_binding, follower_context

PROTOCOL = b"meshserve-step-channel-v1"
MAX_MESSAGE_BYTES = 64 << 20
MAX_HELLO_BYTES = 4096
_HEADER = struct.Struct(">I")
_MAC_BYTES = 32
_NONCE_BYTES = 32

Message = dict[str, Any]


class ChannelError(RuntimeError):
    """The channel could not be set up, or a peer broke the protocol."""


class ChannelClosed(ConnectionError):
    """The peer closed the connection, fell silent past the timeout, or failed."""


class GroupMismatchError(ChannelError):
    """A follower's process count, id or configuration differs from the leader's."""


# -- arrays ---------------------------------------------------------------------------


def pack_array(x: Any) -> Message:
    a = np.asarray(x)  # not ascontiguousarray: it turns scalars into 1-d arrays
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes(order="C")}


def unpack_array(obj: Any, dtypes: Iterable[str]) -> np.ndarray:
    """Rebuild an array from pack_array's map, checking dtype, shape and size."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise ChannelError("an array must be a map of dtype, shape and data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    # Plain numbers only, whatever the caller allows: never objects or structures.
    if not isinstance(dtype, str) or dtype not in set(dtypes) or np.dtype(dtype).kind not in (
            "biuf"):
        raise ChannelError(f"array dtype {dtype!r} is not one of {sorted(set(dtypes))}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape
    ) or len(shape) > 8:
        raise ChannelError(f"bad array shape {shape!r}")
    if not isinstance(data, bytes):
        raise ChannelError("array data must be bytes")
    want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(data) != want:
        raise ChannelError(f"array of {dtype}{shape} needs {want} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# -- framing --------------------------------------------------------------------------


def _session_keys(secret: bytes, leader_nonce: bytes, follower_nonce: bytes,
                  binding: bytes = b""):
    """`binding`: with TLS, what names the leader's certificate (step_tls)."""
    master = hmac.new(secret, PROTOCOL + leader_nonce + follower_nonce + binding,
                      hashlib.sha256).digest()
    to_follower = hmac.new(master, b"leader->follower", hashlib.sha256).digest()
    to_leader = hmac.new(master, b"follower->leader", hashlib.sha256).digest()
    return to_follower, to_leader


class Connection:
    """One framed connection; `send` is thread-safe, `recv` belongs to one thread.

    The socket timeout bounds every blocking call: a peer silent (or not draining) for
    longer than `timeout` seconds raises ChannelClosed.
    """

    def __init__(self, sock: socket.socket, timeout: float,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.sock = sock
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        sock.settimeout(timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._send_lock = threading.Lock()
        self._send_key: bytes | None = None
        self._recv_key: bytes | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self.binding = b""  # with TLS: the leader certificate's binding

    def start_tls(self, context: ssl.SSLContext, server_side: bool) -> None:
        """TLS before anything else; ChannelError when the peer fails the handshake."""
        tls = TlsSocket(self.sock, context, server_side)
        try:
            tls.handshake()
        except (OSError, ssl.SSLError) as e:  # TimeoutError is an OSError
            raise ChannelError(f"TLS handshake failed: {e}") from None
        self.sock = tls
        if not server_side:
            self.binding = certificate_binding(tls.peer_certificate())

    def authenticate(self, send_key: bytes, recv_key: bytes) -> None:
        self._send_key, self._recv_key = send_key, recv_key

    def send(self, message: Message) -> None:
        payload = msgpack.packb(message, use_bin_type=True)
        if len(payload) > self.max_message_bytes:
            raise ChannelError(
                f"message of {len(payload)} bytes exceeds the limit {self.max_message_bytes}")
        with self._send_lock:
            mac = b""
            if self._send_key is not None:
                seq = self._send_seq.to_bytes(8, "big")
                mac = hmac.new(self._send_key, seq + payload, hashlib.sha256).digest()
                self._send_seq += 1
            try:
                self.sock.sendall(_HEADER.pack(len(payload)) + payload + mac)
            except TimeoutError:
                raise ChannelClosed(f"the peer took in nothing for {self.timeout:g}s") from None
            except OSError as e:
                raise ChannelClosed(f"send failed: {e}") from None

    def recv(self, max_bytes: int | None = None) -> Message:
        limit = min(max_bytes or self.max_message_bytes, self.max_message_bytes)
        (size,) = _HEADER.unpack(self._read(_HEADER.size))
        if size > limit:
            raise ChannelError(f"peer sent a message of {size} bytes; the limit is {limit}")
        authenticated = self._recv_key is not None
        body = self._read(size + (_MAC_BYTES if authenticated else 0))
        payload = body[:size]
        if authenticated:
            seq = self._recv_seq.to_bytes(8, "big")
            want = hmac.new(self._recv_key, seq + payload, hashlib.sha256).digest()
            if not hmac.compare_digest(want, body[size:]):
                raise ChannelError("a message failed authentication (wrong shared secret?)")
            self._recv_seq += 1
        try:
            message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException) as e:
            raise ChannelError(f"undecodable message: {e}") from None
        if not isinstance(message, dict) or not isinstance(message.get("t"), str):
            raise ChannelError("a message must be a map with a string type 't'")
        return message

    def _read(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise ChannelClosed(f"the peer sent nothing for {self.timeout:g}s") from None
            except OSError as e:
                raise ChannelClosed(f"receive failed: {e}") from None
            if k == 0:
                raise ChannelClosed("the peer closed the connection")
            got += k
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def config_differences(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two flat-ish configuration maps."""
    out = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{key}.{d}" for d in config_differences(a, b)]
        elif a != b:
            out.append(f"{key} {b!r} (leader: {a!r})")
    return out


# -- the two ends ---------------------------------------------------------------------

Failure = Callable[[str], None]


def _heartbeat(conns: Callable[[], list[Connection]], interval: float,
               stopped: threading.Event) -> None:
    while not stopped.wait(interval):
        for c in conns():
            try:
                c.send({"t": "hb"})
            except (ChannelClosed, ChannelError):
                pass  # the reader thread reports it


def _listen(host: str, port: int) -> socket.socket:
    """Bind host:port; host "" means every interface (IPv6 too where available)."""
    if not host and socket.has_dualstack_ipv6():
        return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


class LeaderLink:
    """The leader's end: accepts every follower, broadcasts steps, watches for failures."""

    def __init__(self, host: str, port: int, secret: bytes, num_processes: int,
                 config: Mapping[str, Any], heartbeat_timeout: float,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 log: Callable[..., None] | None = None, tls: LeaderTls | None = None):
        self.num_processes = num_processes
        self.tls = tls
        self.config = dict(config)
        self.heartbeat_timeout = heartbeat_timeout
        self.max_message_bytes = max_message_bytes
        self._secret = secret
        self._log = log or (lambda *a, **k: None)
        self._server = _listen(host, port)
        self.port = self._server.getsockname()[1]
        self.followers: dict[int, Connection] = {}
        self._stopped = threading.Event()
        self._on_failure: Failure | None = None
        self._readers: list[threading.Thread] = []
        self._done: dict[int, int] = {}  # follower → last step it reported finished

    def accept_all(self, timeout: float) -> None:
        """Handshake with followers until all num_processes - 1 have joined; raises
        ChannelError (naming the missing processes, or what differs) otherwise."""
        deadline = time.monotonic() + timeout
        want = set(range(1, self.num_processes))
        # Those who joined hear from us while the others are awaited.
        threading.Thread(target=_heartbeat, daemon=True, name="meshserve-link-hb",
                         args=(lambda: list(self.followers.copy().values()),
                               self.heartbeat_timeout / 5, self._stopped)).start()
        while set(self.followers) != want:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(want - set(self.followers))
                raise ChannelError(
                    f"processes {missing} did not join the step channel on port {self.port} "
                    f"within {timeout:.0f}s (are they running, with the same secret?)")
            self._server.settimeout(left)
            try:
                sock, peer = self._server.accept()
            except TimeoutError:
                continue
            conn = Connection(sock, min(10.0, self.heartbeat_timeout * 2),
                              self.max_message_bytes)
            try:
                if self.tls is not None:
                    conn.start_tls(self.tls.context, server_side=True)
                    conn.binding = self.tls.binding
                pid = self._handshake(conn)
            except GroupMismatchError:
                conn.close()
                raise  # a misconfigured group cannot start
            except (ChannelClosed, ChannelError) as e:
                conn.close()
                self._log("step_channel_refused", peer=str(peer[0]), reason=str(e))
                continue
            conn.sock.settimeout(self.heartbeat_timeout)
            conn.timeout = self.heartbeat_timeout
            self.followers[pid] = conn
            self._log("step_channel_joined", process_id=pid, peer=str(peer[0]))

    def _handshake(self, conn: Connection) -> int:
        hello = conn.recv(MAX_HELLO_BYTES)
        pid, n, nonce = hello.get("process_id"), hello.get("num_processes"), hello.get("nonce")
        if hello["t"] != "hello" or not isinstance(pid, int) or not isinstance(n, int) or not (
                isinstance(nonce, bytes) and len(nonce) == _NONCE_BYTES):
            raise ChannelError("not a meshserve follower's hello")
        mine = os.urandom(_NONCE_BYTES)
        conn.send({"t": "challenge", "nonce": mine})
        to_follower, to_leader = _session_keys(self._secret, mine, nonce, conn.binding)
        conn.authenticate(to_follower, to_leader)
        join = conn.recv()  # fails authentication with a wrong secret: dropped
        problems = []
        if n != self.num_processes:
            problems.append(f"process {pid} was started with --num-processes {n} but the "
                            f"leader with {self.num_processes}; give every process the same")
        elif not 1 <= pid < self.num_processes or pid in self.followers:
            problems.append(f"process id {pid} is out of range or already taken")
        config = join.get("config")
        diffs = config_differences(self.config, config) if isinstance(config, dict) else [
            "no configuration"]
        if diffs:
            problems.append(f"process {pid} is configured differently from the leader: "
                            + "; ".join(diffs))
        if join["t"] != "join" or problems:
            reason = "; ".join(problems) or "expected a join message"
            conn.send({"t": "reject", "reason": reason})
            raise GroupMismatchError(reason)
        conn.send({"t": "welcome"})
        return pid

    def start(self, on_failure: Failure) -> None:
        """Watch every follower from now on (heartbeats go out since accept_all)."""
        self._on_failure = on_failure
        for pid, conn in self.followers.items():
            reader = threading.Thread(target=self._read, args=(pid, conn), daemon=True,
                                      name=f"meshserve-link-{pid}")
            reader.start()
            self._readers.append(reader)

    def _read(self, pid: int, conn: Connection) -> None:
        """Until the follower's end closes: after stop() that is expected, before it a
        failure."""
        while True:
            try:
                message = conn.recv()
            except (ChannelClosed, ChannelError) as e:
                if not self._stopped.is_set():
                    self._fail(f"process {pid}: {e} (it died, hung or was cut off)")
                return
            if message["t"] == "done" and isinstance(message.get("n"), int):
                self._done[pid] = message["n"]
            elif message["t"] == "error" and not self._stopped.is_set():
                self._fail(f"process {pid} failed: {message.get('message')}")

    def finished(self, index: int) -> bool:
        """Whether every follower has reported step `index` done."""
        return all(self._done.get(pid, -1) >= index for pid in self.followers)

    def _fail(self, reason: str) -> None:
        if self._on_failure is not None:
            self._on_failure(reason)

    def broadcast(self, message: Message) -> None:
        """Send to every follower; a failed send reports the failure and raises."""
        for pid, conn in self.followers.items():
            try:
                conn.send(message)
            except (ChannelClosed, ChannelError) as e:
                self._fail(f"process {pid}: {e}")
                raise ChannelClosed(f"process {pid}: {e}") from None

    def stop(self, reason: str, failed: bool = False, linger: float = 5.0) -> None:
        """Tell the followers to exit (non-zero when failed); wait up to `linger` s for
        them to close their end; close ours."""
        self._stopped.set()
        for conn in self.followers.values():
            try:
                conn.send({"t": "stop", "reason": reason, "failed": failed})
            except (ChannelClosed, ChannelError):
                pass
        deadline = time.monotonic() + linger
        for reader in self._readers:
            if reader is not threading.current_thread():
                reader.join(max(0.0, deadline - time.monotonic()))
        for conn in self.followers.values():
            conn.close()
        self._server.close()


class FollowerLink:
    """A follower's end: joins the leader, queues its messages, sends heartbeats."""

    def __init__(self, host: str, port: int, secret: bytes, process_id: int,
                 num_processes: int, config: Mapping[str, Any], heartbeat_timeout: float,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, tls: bool = False):
        self.address = (host, port)
        self.tls = tls
        self.process_id = process_id
        self.num_processes = num_processes
        self.config = dict(config)
        self.heartbeat_timeout = heartbeat_timeout
        self.max_message_bytes = max_message_bytes
        self._secret = secret
        self.conn: Connection | None = None
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._stopped = threading.Event()

    def connect(self, timeout: float) -> None:
        """Connect (retrying while the leader is not listening yet) and join; raises
        ChannelError with the leader's reason when it refuses us."""
        host, port = self.address
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection(self.address, timeout=1.0)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise ChannelError(
                        f"cannot reach the leader's step channel at {host}:{port} within "
                        f"{timeout:.0f}s: {e}") from None
                time.sleep(0.2)
        conn = Connection(sock, min(10.0, self.heartbeat_timeout * 2), self.max_message_bytes)
        mine = os.urandom(_NONCE_BYTES)
        try:
            if self.tls:
                conn.start_tls(follower_context(), server_side=False)
            conn.send({"t": "hello", "v": 1, "process_id": self.process_id,
                       "num_processes": self.num_processes, "nonce": mine})
            challenge = conn.recv(MAX_HELLO_BYTES)
            nonce = challenge.get("nonce")
            if challenge["t"] != "challenge" or not (
                    isinstance(nonce, bytes) and len(nonce) == _NONCE_BYTES):
                raise ChannelError("the peer is not a meshserve leader")
            to_follower, to_leader = _session_keys(self._secret, nonce, mine, conn.binding)
            conn.authenticate(to_leader, to_follower)
            conn.send({"t": "join", "config": self.config})
            reply = conn.recv()
        except ChannelClosed as e:
            conn.close()
            raise ChannelError(
                f"the leader at {host}:{port} ended the handshake ({e}): check that every "
                "process has the same multi-host secret, and TLS (--tls-cert) on every "
                "process or on none") from None
        except ChannelError:
            conn.close()
            raise
        if reply["t"] != "welcome":
            conn.close()
            raise ChannelError(f"the leader refused this process: {reply.get('reason')}")
        conn.sock.settimeout(self.heartbeat_timeout)
        conn.timeout = self.heartbeat_timeout
        self.conn = conn

    def start(self, on_failure: Failure) -> None:
        """Read the leader's messages into the inbox; `on_failure` when it goes away."""
        def read() -> None:
            while not self._stopped.is_set():
                try:
                    message = self.conn.recv()
                except (ChannelClosed, ChannelError) as e:
                    if not self._stopped.is_set():
                        on_failure(f"lost the leader: {e}")
                    return
                if message["t"] != "hb":
                    self._inbox.put(message)
                    if message["t"] == "stop":
                        return

        threading.Thread(target=read, daemon=True, name="meshserve-link-reader").start()
        threading.Thread(target=_heartbeat, daemon=True, name="meshserve-link-hb",
                         args=(lambda: [self.conn], self.heartbeat_timeout / 5,
                               self._stopped)).start()

    def next_message(self, timeout: float) -> Message | None:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def report_done(self, index: int) -> None:
        try:
            self.conn.send({"t": "done", "n": index})
        except (ChannelClosed, ChannelError):
            pass  # the reader thread reports a lost leader

    def report_error(self, message: str) -> None:
        try:
            self.conn.send({"t": "error", "message": message[:2000]})
        except (ChannelClosed, ChannelError):
            pass

    def close(self) -> None:
        self._stopped.set()
        if self.conn is not None:
            self.conn.close()
