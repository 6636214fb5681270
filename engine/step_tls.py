"""TLS for the step channel (engine/step_channel.py): steps carry users' token ids.

The leader is the TLS server, with the certificate and key the gRPC server uses
(--tls-cert / --tls-key); followers are clients. Followers do not check the leader's
certificate against a CA: the certificate the leader presented is bound into the HMAC
session keys instead (a SHA-256 of it, the "tls-server-end-point" idea of RFC 5929), so
a follower completes the handshake only with a peer that both holds the shared secret
and presented the certificate it saw. A relay that terminates TLS with a certificate of
its own (even one a CA signed) derives other keys and is refused; one that forwards the
leader's certificate cannot decrypt. Certificates may thus differ per host, be
self-signed or issued for any name. Followers are authenticated by the secret, as
without TLS, so no client certificates are needed (mutual TLS would add nothing the HMAC
does not already prove, and would require the serving certificates to be client ones).

Why memory BIOs rather than ssl.SSLSocket: a connection is read by one thread while
others write (heartbeats, steps), and OpenSSL must not be entered by two threads at once
on one connection (concurrent SSLSocket.recv/send corrupt TLS state). Here every OpenSSL
call is made under one lock and the socket I/O outside it; bytes OpenSSL produces are
sent under a second lock, in the order produced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import ssl
import tempfile
import threading

_READ = 1 << 16


def server_context(cert: bytes, key: bytes, client_ca: bytes | None = None) -> ssl.SSLContext:
    """A TLS server context from PEM bytes (with client_ca: clients must present a
    certificate it signed). TLS 1.2 at least, no renegotiation."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    # ssl reads a certificate chain only from files: a private folder, removed at once.
    with tempfile.TemporaryDirectory(prefix="meshserve-tls-") as folder:
        os.chmod(folder, 0o700)
        paths = []
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            path = os.path.join(folder, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(path)
        ctx.load_cert_chain(*paths)
    if client_ca is not None:
        ctx.load_verify_locations(cadata=client_ca.decode("ascii"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def follower_context() -> ssl.SSLContext:
    """The client side: no CA check (the certificate is bound to the secret instead)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def certificate_binding(der: bytes) -> bytes:
    return hashlib.sha256(b"meshserve-step-channel-cert" + der).digest()


@dataclasses.dataclass(frozen=True)
class LeaderTls:
    """The leader's TLS: its server context and the binding of the certificate it presents."""
    context: ssl.SSLContext
    binding: bytes

    @classmethod
    def from_pem(cls, cert: bytes, key: bytes) -> LeaderTls:
        """From the gRPC server's --tls-cert (a chain, leaf first) and --tls-key."""
        text = cert.decode("ascii")
        end = "-----END CERTIFICATE-----"
        if "-----BEGIN CERTIFICATE-----" not in text or end not in text:
            raise ValueError("--tls-cert holds no PEM certificate")
        leaf = text[text.index("-----BEGIN CERTIFICATE-----"):text.index(end) + len(end)]
        return cls(server_context(cert, key), certificate_binding(ssl.PEM_cert_to_DER_cert(leaf)))


class TlsSocket:
    """A TLS connection over `sock` with the socket methods step_channel.Connection uses
    (sendall, recv_into, settimeout, shutdown, close); safe for one reader and any number
    of writers at once. Socket timeouts bound every wait, as on a plain socket."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool):
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=server_side)
        self._state = threading.Lock()  # the SSLObject and its BIOs
        self._wire = threading.Lock()  # raw sends, in the order OpenSSL produced the bytes

    def handshake(self) -> None:
        """Raises ssl.SSLError (a plaintext peer, say), TimeoutError or OSError."""
        while True:
            try:
                with self._state:
                    self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("the peer closed the connection during the TLS "
                                          "handshake") from None
        self._flush()

    def peer_certificate(self) -> bytes:
        return self._tls.getpeercert(binary_form=True) or b""

    def _flush(self) -> None:
        with self._wire:
            with self._state:
                data = self._out.read()
            if data:
                self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(_READ)
        with self._state:
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()
        return bool(data)

    def sendall(self, data: bytes) -> None:
        with self._wire:
            with self._state:
                self._tls.write(data)  # a memory BIO takes everything at once
                out = self._out.read()
            self.sock.sendall(out)

    def recv_into(self, view: memoryview) -> int:
        while True:
            with self._state:
                try:
                    chunk = self._tls.read(len(view))
                except ssl.SSLWantReadError:
                    chunk = None
                except ssl.SSLZeroReturnError:  # the peer's close_notify
                    return 0
                produced = self._out.pending  # e.g. a TLS 1.3 key update's answer
            if produced:
                self._flush()
            if chunk is not None:
                view[:len(chunk)] = chunk
                return len(chunk)
            if not self._fill():
                return 0

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()
