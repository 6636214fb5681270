"""The decode role (`meshserve serve --role decode --prefill-peers HOST:PORT,...`).

Clients' requests come in as usual (gRPC and HTTP share serving/core.py); this module's
router puts each on a local decode slice but hands back a `RemoteStream` instead of an
engine handle. The stream asks a prefill peer (fewest in flight, recent failures last,
round robin among equals) over the internal API, streams the first token(s) at once,
pulls the KV through engine/kv_transfer.py (layouts checked first, every wait bounded),
acknowledges, admits the request with `add_prefilled`, and streams the rest.

Failures: anything before the first streamed token (peer down, refused, slow) is retried
once on another peer; afterwards the stream ends with an error chunk, which the frontend
turns into UNAVAILABLE after the tokens already sent. Nothing is ever streamed twice: the
prefill side's tokens are streamed by us, the decode engine streams only what follows.
Pages are freed on both sides in every case: ending the call makes the prefill server
reclaim its offer and release its parked pages, and the core's close aborts ours.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Collection, Sequence

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from meshserve.engine.engine import EngineOverloadedError
from meshserve.engine.kv_handoff import PREFILLED, HandoffError
from meshserve.engine.kv_transfer import (
    KVTransport,
    LayoutMismatchError,
    TransferError,
    TransferTimeoutError,
)
from meshserve.engine.outputs import StreamChunk
from meshserve.engine.sampling_params import SamplingParams
from meshserve.serving import logs
from meshserve.serving.disagg import HandoffRecord
from meshserve.serving.disagg_metrics import DisaggMetrics
from meshserve.serving.kv_wire import (
    WireError,
    chunk_from_pb,
    handoff_from_pb,
    offer_layouts,
    params_to_request,
)
from meshserve.serving.proto import internal_pb2 as ipb
from meshserve.serving.proto import internal_pb2_grpc as ipb_grpc
from meshserve.serving.routing import RoutingConfig
from meshserve.serving.slices import NoHealthySliceError, Routed, Router, Slice

REMOTE_PREFILL = "remote_prefill"  # the routing reason of the decode role
MAX_PEER_MESSAGE_BYTES = 16 << 20  # the internal messages carry metadata, never KV
# A peer's refusals that another peer would repeat: not retried.
_FINAL_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    prefill_peers: tuple[str, ...]
    prefill_timeout_s: float = 30.0  # request sent to the peer -> its first token
    transfer_timeout_s: float = 10.0  # first token -> offer, and the pull itself
    failure_backoff_s: float = 10.0  # a failed peer is tried last for this long
    peer_auth_token: bytes | None = None
    peer_tls: bool = False
    peer_tls_ca: bytes | None = None
    peer_tls_cert: bytes | None = None  # mTLS: this server's client certificate
    peer_tls_key: bytes | None = None
    # "jax": jax.experimental.transfer (fast, unencrypted); "grpc": on the internal call,
    # so under its TLS (the KV goes through host memory and protobuf: slower).
    kv_transport: str = "jax"

    def check(self) -> None:
        if not self.prefill_peers:
            raise ValueError("--role decode needs --prefill-peers HOST:PORT[,...]")
        for peer in self.prefill_peers:
            host, _, port = peer.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--prefill-peers: {peer!r} is not HOST:PORT")
        if (self.peer_tls_cert is None) != (self.peer_tls_key is None):
            raise ValueError("the peer TLS certificate and key go together")
        if self.kv_transport not in ("jax", "grpc"):
            raise ValueError(f"--kv-transport must be jax or grpc, got {self.kv_transport!r}")
        if min(self.prefill_timeout_s, self.transfer_timeout_s) <= 0:
            raise ValueError("--prefill-timeout and --kv-transfer-timeout must be > 0")


class PeerFailed(Exception):
    def __init__(self, kind: str, message: str, retry: bool = True):
        super().__init__(message)
        self.kind, self.retry = kind, retry


def _status_failure(code: grpc.StatusCode, details: str | None) -> PeerFailed:
    kind = ("prefill_unavailable" if code in (grpc.StatusCode.UNAVAILABLE,
                                              grpc.StatusCode.RESOURCE_EXHAUSTED)
            else "prefill_timeout" if code == grpc.StatusCode.DEADLINE_EXCEEDED
            else "prefill_error")
    return PeerFailed(kind, f"{code.name}: {details}", retry=code not in _FINAL_CODES)


class PrefillPeer:
    def __init__(self, target: str, options: DecodeOptions):
        self.target = target
        self.options = options
        self.channel: grpc.aio.Channel | None = None
        self._stub: ipb_grpc.PrefillStub | None = None
        self.metadata = (() if options.peer_auth_token is None else
                         (("authorization", "Bearer " + options.peer_auth_token.decode()),))
        self.inflight = 0
        self.sent = 0
        self.failed_at = -float("inf")

    @property
    def stub(self) -> ipb_grpc.PrefillStub:
        """Made on first use: an aio channel belongs to the event loop that runs it."""
        if self._stub is None:
            o = self.options
            opts = [("grpc.max_receive_message_length", MAX_PEER_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_PEER_MESSAGE_BYTES)]
            if o.peer_tls:
                creds = grpc.ssl_channel_credentials(o.peer_tls_ca, o.peer_tls_key,
                                                     o.peer_tls_cert)
                self.channel = grpc.aio.secure_channel(self.target, creds, options=opts)
            else:
                self.channel = grpc.aio.insecure_channel(self.target, options=opts)
            self._stub = ipb_grpc.PrefillStub(self.channel)
        return self._stub


class PrefillPeers:
    def __init__(self, options: DecodeOptions):
        self.options = options
        self.peers = [PrefillPeer(t, options) for t in options.prefill_peers]

    def pick(self, exclude: set[str]) -> PrefillPeer | None:
        now = time.monotonic()
        left = [p for p in self.peers if p.target not in exclude]
        if not left:
            return None
        peer = min(left, key=lambda p: (now - p.failed_at < self.options.failure_backoff_s,
                                        p.inflight, p.sent))
        peer.sent += 1
        return peer

    async def close(self) -> None:
        await asyncio.gather(*(p.channel.close() for p in self.peers if p.channel is not None))


class RemotePrefillRouter(Router):
    """The decode role's router: decode slices chosen by load (free pages, running
    tokens), prefill done by a peer."""

    def __init__(self, slices: Sequence[Slice], config: RoutingConfig | None,
                 options: DecodeOptions, transport: KVTransport, metrics: DisaggMetrics):
        super().__init__(slices, dataclasses.replace(config or RoutingConfig(),
                                                     cache_aware=False))
        options.check()
        self.options = options
        self.peers = PrefillPeers(options)
        self.transport = transport
        self.dmetrics = metrics

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
               cost_tokens: int, priority: int = 0, cache_salt: str = "",
               avoid: Collection[int] = ()) -> Routed:
        with self._lock:
            healthy = [s for s in self.healthy() if s.index not in avoid]
            if not healthy:
                raise NoHealthySliceError("no healthy slice: every engine has stopped")
            order, _, _ = self._order(healthy, [])
            s = order[0]
            st, cfg = s.stats(), s.engine.config
            # Refuse now rather than after a remote prefill nobody can decode.
            if st.waiting + s.inflight_requests >= cfg.max_waiting_requests + cfg.max_seqs:
                raise EngineOverloadedError(f"{st.waiting} requests wait to decode and "
                                            f"{s.inflight_requests} are in flight")
            s.inflight_requests += 1
            s.inflight_tokens += cost_tokens
            s.routed += 1
        stream = RemoteStream(self, s, prompt_ids, params, request_id, priority, cache_salt)
        return Routed(s, stream, REMOTE_PREFILL, 0)


class RemoteStream:
    """In place of an engine's RequestHandle: `stream()` yields the request's chunks."""

    def __init__(self, router: RemotePrefillRouter, slice_: Slice, prompt_ids: list[int],
                 params: SamplingParams, request_id: str, priority: int, cache_salt: str):
        self.router, self.slice = router, slice_
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.request = params_to_request(request_id, self.prompt_ids, params, priority,
                                         cache_salt)
        self.kv_path = (ipb.KV_PATH_GRPC if router.options.kv_transport == "grpc"
                        else ipb.KV_PATH_JAX_TRANSFER)
        self.created = time.perf_counter()
        self.first_at: float | None = None
        self.streamed_ids: list[int] = []
        self.streamed_text = False
        self.attempts: list[str] = []
        # The final response's per-stage timings (Generation.fill_timings); the prefill
        # slice is the peer's, not one of ours (-1).
        self.handoff = HandoffRecord(-1, None, None, None)

    @property
    def streamed(self) -> bool:
        return bool(self.streamed_ids) or self.streamed_text

    async def stream(self) -> AsyncIterator[StreamChunk]:
        r, error = self.router, "no prefill peer to try"
        tried: set[str] = set()
        for attempt in range(2):
            peer = r.peers.pick(tried)
            if peer is None:
                break
            tried.add(peer.target)
            self.attempts.append(peer.target)
            try:
                async for chunk in self._attempt(peer):
                    yield chunk
                return
            except PeerFailed as e:
                r.dmetrics.failure(e.kind)
                peer.failed_at = time.monotonic()
                error = f"prefill peer {peer.target}: {e}"
                logs.event("prefill_peer_failed", logging.WARNING, request_id=self.request_id,
                           peer=peer.target, kind=e.kind, error=str(e),
                           streamed_tokens=len(self.streamed_ids), attempt=attempt)
                if self.streamed or not e.retry:
                    break
                if attempt == 0 and len(r.peers.peers) > 1:
                    r.dmetrics.retries.inc()
        yield StreamChunk(self.request_id, (), "", finish_reason="abort", error=error)

    def _emit(self, chunk: StreamChunk) -> StreamChunk:
        if chunk.token_ids or chunk.text:
            if self.first_at is None:
                self.first_at = time.perf_counter()
            self.streamed_ids.extend(chunk.token_ids)
            self.streamed_text = self.streamed_text or bool(chunk.text)
        if chunk.finished and chunk.finish_reason != "abort":
            # The client's TTFT is from our arrival, not the decode engine's.
            ttft = None if self.first_at is None else (self.first_at - self.created) * 1e3
            self.handoff.ttft_ms = ttft
            if self.handoff.decode_started is None:  # done by its first token
                self.handoff.prefill_queue_ms = chunk.queue_ms
                chunk = dataclasses.replace(chunk, ttft_ms=ttft)
        return chunk

    async def _read(self, call, timeout: float, kind: str, what: str):
        try:
            m = await asyncio.wait_for(call.read(), timeout)
        except TimeoutError:
            raise PeerFailed(kind, f"no {what} within {timeout} s") from None
        except grpc.aio.AioRpcError as e:
            raise _status_failure(e.code(), e.details()) from None
        if m is grpc.aio.EOF:
            code = await asyncio.wait_for(call.code(), timeout)
            if code != grpc.StatusCode.OK:  # a refusal can come as the end of the stream
                raise _status_failure(code, await call.details())
            raise PeerFailed("prefill_error", f"the peer ended the call before the {what}")
        return m

    async def _fetch(self, call, offer: ipb.KVOffer, layouts, dest: jax.ShapeDtypeStruct):
        """The offered array sent on the call itself (KV_PATH_GRPC), reassembled from its
        chunks (contiguous, never past the offered size) and placed on `dest`."""
        timeout = self.router.options.transfer_timeout_s
        (lay,) = layouts if len(layouts) == 1 else (None,)
        if lay is None or lay.shape != tuple(dest.shape) or lay.dtype != jnp.dtype(
                dest.dtype).name:
            raise LayoutMismatchError(f"offered {[x.describe() for x in layouts]}, the "
                                      f"destination is {dest.dtype}{list(dest.shape)}")
        deadline = time.monotonic() + timeout
        await asyncio.wait_for(call.write(ipb.PrefillClientMessage(
            fetch=ipb.Fetch(uuid=offer.uuid))), timeout)
        buf, got = bytearray(lay.nbytes), 0
        while got < len(buf):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferTimeoutError(f"the KV did not arrive in {timeout} s")
            msg = await self._read(call, left, "transfer_timeout", "KV chunk")
            piece = msg.kv_chunk if msg.WhichOneof("kind") == "kv_chunk" else None
            if (piece is None or piece.uuid != offer.uuid or piece.offset != got
                    or got + len(piece.data) > len(buf) or not piece.data):
                raise TransferError("the KV chunks do not add up to the offered array")
            buf[got:got + len(piece.data)] = piece.data
            got += len(piece.data)
        host = np.frombuffer(buf, dtype=jnp.dtype(lay.dtype)).reshape(lay.shape)
        return await asyncio.to_thread(
            lambda: jax.block_until_ready(jax.device_put(host, dest.sharding)))

    async def _attempt(self, peer: PrefillPeer) -> AsyncIterator[StreamChunk]:
        r, o, m = self.router, self.router.options, self.router.dmetrics
        rid = self.request_id
        call = peer.stub.Prefill(metadata=peer.metadata)
        peer.inflight += 1
        stage: str | None = "remote_prefill"
        acked = False
        m.enter(stage)
        began = time.perf_counter()
        try:
            try:
                await asyncio.wait_for(call.write(ipb.PrefillClientMessage(
                    start=ipb.PrefillStart(request=self.request, kv_path=self.kv_path))),
                    o.prefill_timeout_s)
            except TimeoutError:
                raise PeerFailed("prefill_timeout", "could not send the request in "
                                 f"{o.prefill_timeout_s} s") from None
            except Exception:  # noqa: BLE001 - the call ended: its status says why
                code = await asyncio.wait_for(call.code(), o.prefill_timeout_s)
                raise _status_failure(code, await call.details()) from None
            while True:
                msg = await self._read(call, o.prefill_timeout_s, "prefill_timeout",
                                       "first token")
                if msg.WhichOneof("kind") != "chunk":
                    raise PeerFailed("bad_offer", "an offer came before the first token",
                                     retry=False)
                reason = msg.chunk.finish_reason
                final = reason not in ("", PREFILLED)
                try:
                    chunk = chunk_from_pb(msg.chunk, rid, final)
                except WireError as e:
                    raise PeerFailed("bad_offer", str(e), retry=False) from None
                if final and reason == "abort":
                    raise PeerFailed("prefill_error", "the peer aborted the request")
                yield self._emit(chunk)
                if final:
                    return
                if reason == PREFILLED:
                    break
            m.leave(stage, time.perf_counter() - began)
            stage = "transfer"
            m.enter(stage)
            began = self.handoff.started = time.perf_counter()
            msg = await self._read(call, o.transfer_timeout_s, "transfer_timeout", "KV offer")
            if msg.WhichOneof("kind") != "offer":
                raise PeerFailed("bad_offer", "expected the KV offer")
            offer = msg.offer
            try:
                layouts = offer_layouts(offer)
                handoff = handoff_from_pb(offer.handoff, self.params)
                if handoff.request_id != rid or list(handoff.prompt_ids) != self.prompt_ids:
                    raise WireError("the offer is for another request or prompt")
                if list(handoff.output_ids) != self.streamed_ids:
                    raise WireError(f"the offer's output {list(handoff.output_ids)} is not "
                                    f"what was streamed {self.streamed_ids}")
            except (WireError, HandoffError) as e:
                raise PeerFailed("bad_offer", str(e)) from None
            engine = self.slice.engine
            lay = handoff.layout
            try:  # before anything is allocated for it: the pool's layout, bounded rows
                lay.check_pool(engine.handoff_layout())
                if lay.rows > 2 * engine.pages_per_seq or lay.pages > engine.pages_per_seq:
                    raise HandoffError(f"{lay.rows} rows / {lay.pages} pages exceed a "
                                       f"sequence's {engine.pages_per_seq} pages")
            except HandoffError as e:
                raise PeerFailed("bad_offer", str(e)) from None
            dest = [jax.ShapeDtypeStruct(lay.shape, jnp.dtype(lay.dtype),
                                         sharding=engine.handoff_sharding(lay))]
            pull_began = time.perf_counter()
            try:
                if self.kv_path == ipb.KV_PATH_GRPC:
                    kv = [await self._fetch(call, offer, layouts, dest[0])]
                else:
                    kv = await asyncio.to_thread(r.transport.pull, offer.transfer_address,
                                                 offer.uuid, layouts, dest,
                                                 o.transfer_timeout_s)
            except LayoutMismatchError as e:
                raise PeerFailed("layout", str(e)) from None
            except TransferTimeoutError as e:
                raise PeerFailed("transfer_timeout", str(e)) from None
            except TransferError as e:
                raise PeerFailed("transfer_error", str(e)) from None
            now = time.perf_counter()
            m.transfer(offer.nbytes, now - began)
            m.timed("pull", now - pull_began)
            m.leave(stage, now - began)
            stage = None
            rec = self.handoff
            rec.transfer_s, rec.copy_s, rec.nbytes = now - began, now - pull_began, offer.nbytes
            rec.prefill_queue_ms, rec.prefill_ms = handoff.queue_ms, handoff.prefill_ms
            try:  # the pages are ours now: the peer may free its copy
                await asyncio.wait_for(call.write(ipb.PrefillClientMessage(
                    pulled=ipb.Pulled(uuid=offer.uuid, ok=True))), o.transfer_timeout_s)
                await call.done_writing()
                acked = True
            except (TimeoutError, grpc.aio.AioRpcError):
                pass  # the peer reclaims on its TTL or when the call ends
            rec.decode_started = time.perf_counter()
            admit = asyncio.ensure_future(asyncio.to_thread(engine.add_prefilled,
                                                            handoff.with_kv(kv[0])))
            try:
                handle = await asyncio.shield(admit)
            except asyncio.CancelledError:
                # Cancelled meanwhile: once admitted, stop it there (the core's close has
                # already aborted an id the engine did not know yet).
                admit.add_done_callback(lambda t: t.cancelled() or t.exception() is not None
                                        or engine.abort(rid))
                raise
            except (HandoffError, EngineOverloadedError) as e:
                raise PeerFailed("admit", f"the decode engine refused the handoff: {e}",
                                 retry=False) from None
            async for chunk in handle.stream():
                yield self._emit(chunk)
                if chunk.finished:
                    return
        finally:
            if stage is not None:
                m.leave(stage)
            peer.inflight -= 1
            if not acked:  # the peer frees its side (cancelling after Pulled could race it)
                call.cancel()
