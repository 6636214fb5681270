"""The prefill role (`meshserve serve --role prefill`): the internal Prefill service
(serving/proto/internal.proto) on the server's gRPC port, with its TLS and token.

One call per request: the decode server sends the validated request; this server runs a
prefill-only request on its least loaded slice (engine/handoff.py), streams the first
token at once, exports the parked KV, offers it through engine/kv_transfer.py and waits
(at most the offer TTL) for the decode server's Pulled. Whatever happens (pulled, gave up,
cancelled, disconnected, TTL), the `finally` frees the pages: the offer is consumed or
reclaimed, and the parked request released.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import jax
import numpy as np

from meshserve.engine.engine import EngineDeadError, EngineOverloadedError
from meshserve.engine.kv_handoff import PREFILLED, NotParkedError
from meshserve.engine.kv_transfer import KVTransport, TransferError, array_layout
from meshserve.engine.sampling_params import InvalidRequestError
from meshserve.serving import logs
from meshserve.serving.kv_wire import chunk_to_pb, handoff_to_pb, layout_to_pb
from meshserve.serving.proto import internal_pb2 as ipb
from meshserve.serving.proto import internal_pb2_grpc as ipb_grpc
from meshserve.serving.requests import ModelLimits, prepare
from meshserve.serving.slices import Slice

INTERNAL_SERVICE = ipb.DESCRIPTOR.services_by_name["Prefill"].full_name
KV_CHUNK_BYTES = 1 << 20  # KV sent on the call (KV_PATH_GRPC) goes in pieces this big


def _host_bytes(kv) -> bytes:
    """The array's bytes in C order, gathered from its shards."""
    return np.ascontiguousarray(jax.device_get(kv)).tobytes()


@dataclasses.dataclass(frozen=True)
class PrefillOptions:
    offer_ttl_s: float = 30.0  # an offer nobody acknowledged is reclaimed after this
    start_timeout_s: float = 10.0  # the first message must come within this
    reclaim_timeout_s: float = 10.0  # pulling an unacknowledged offer back from ourselves


class PrefillServicer(ipb_grpc.PrefillServicer):
    def __init__(self, slices: Sequence[Slice], tokenizer, limits: ModelLimits,
                 transport: KVTransport, metrics, options: PrefillOptions):
        self.slices = list(slices)
        self.tokenizer = tokenizer
        self.limits = limits
        self.transport = transport
        self.metrics = metrics
        self.options = options
        self.inflight: dict[int, int] = {s.index: 0 for s in self.slices}
        self.offers = 0  # offered and not yet acknowledged or reclaimed
        self.draining = False

    def _pick(self) -> Slice:
        healthy = [s for s in self.slices if s.healthy]
        if not healthy:
            raise EngineDeadError("no healthy slice: every engine has stopped")

        def load(s: Slice):
            st = s.stats()
            return (st.waiting_tokens + st.running_tokens, self.inflight[s.index],
                    -st.free_pages)

        return min(healthy, key=load)

    async def GetLoad(self, request: ipb.LoadRequest, context) -> ipb.Load:
        stats = [s.stats() for s in self.slices if s.healthy]
        return ipb.Load(waiting=sum(s.waiting for s in stats),
                        running=sum(s.running for s in stats),
                        free_pages=sum(s.free_pages for s in stats),
                        total_pages=sum(s.total_pages for s in stats),
                        pending_offers=self.transport.pending_count(),
                        offers_reclaimed=self.transport.stats.reclaimed,
                        abandoned_pulls=self.transport.stats.abandoned_pulls)

    async def Prefill(self, request_iterator, context) -> AsyncIterator[ipb.PrefillServerMessage]:
        it = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(it.__anext__(), self.options.start_timeout_s)
        except (TimeoutError, StopAsyncIteration):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no PrefillStart came")
        if first.WhichOneof("kind") != "start" or not first.start.request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message must be a PrefillStart with a request_id")
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        req = first.start.request
        rid = req.request_id
        try:
            prepared = prepare(req, self.tokenizer, self.limits, rid)
            s = self._pick()
            handle = s.engine.add_request(prepared.prompt_ids, prepared.params, request_id=rid,
                                          priority=prepared.priority,
                                          cache_salt=prepared.cache_salt, prefill_only=True)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineOverloadedError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill overloaded: {e}")
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        self.inflight[s.index] += 1
        m = self.metrics
        stage: str | None = "prefilling"
        m.enter(stage)
        began = time.perf_counter()
        offer = None
        by_grpc = first.start.kv_path == ipb.KV_PATH_GRPC
        offered = False
        finished = False
        how = "cancelled"
        try:
            async for chunk in handle.stream():
                if chunk.finish_reason == PREFILLED:
                    yield ipb.PrefillServerMessage(chunk=chunk_to_pb(chunk))
                    break
                if chunk.finished:
                    finished = True
                    if chunk.finish_reason == "abort" and chunk.error:
                        await context.abort(grpc.StatusCode.UNAVAILABLE,
                                            f"prefill failed: {chunk.error}")
                    how = chunk.finish_reason
                    yield ipb.PrefillServerMessage(chunk=chunk_to_pb(chunk))
                    return  # finished with its first token: nothing to hand off
                if chunk.token_ids or chunk.text:
                    yield ipb.PrefillServerMessage(chunk=chunk_to_pb(chunk))
            else:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "the prefill engine ended the stream early")
            finished = True
            m.leave(stage, time.perf_counter() - began)
            stage = None
            began = time.perf_counter()
            try:
                handoff = s.engine.export_kv(rid)  # gathered as it parked: no wait
            except NotParkedError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill lost the KV: {e}")
            if by_grpc:
                uid, layouts = secrets.randbits(63) | 1, (array_layout(handoff.kv),)
            else:
                try:
                    offer = self.transport.offer([handoff.kv])
                except TransferError as e:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
                uid, layouts = offer.uuid, offer.layouts
            offered = True
            self.offers += 1
            m.timed("export", time.perf_counter() - began)
            stage = "offered"
            m.enter(stage)
            began = time.perf_counter()
            yield ipb.PrefillServerMessage(offer=ipb.KVOffer(
                transfer_address="" if by_grpc else self.transport.address, uuid=uid,
                layouts=[layout_to_pb(x) for x in layouts], ttl_s=self.options.offer_ttl_s,
                nbytes=sum(x.nbytes for x in layouts), handoff=handoff_to_pb(handoff)))
            how = "expired"
            deadline = time.monotonic() + self.options.offer_ttl_s
            ack, fetched = None, False
            while True:
                try:
                    ack = await asyncio.wait_for(it.__anext__(),
                                                 max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no Pulled within "
                                        f"the offer's {self.options.offer_ttl_s} s")
                except StopAsyncIteration:
                    ack = None
                if (ack is None or ack.WhichOneof("kind") != "fetch" or not by_grpc
                        or fetched or ack.fetch.uuid != uid):
                    break
                fetched = True  # the KV on this call, under its TLS, in bounded chunks
                data = await asyncio.to_thread(_host_bytes, handoff.kv)
                for at in range(0, len(data), KV_CHUNK_BYTES):
                    yield ipb.PrefillServerMessage(kv_chunk=ipb.KVChunk(
                        uuid=uid, offset=at, data=data[at:at + KV_CHUNK_BYTES]))
                del data
            if ack is not None and ack.WhichOneof("kind") == "pulled" \
                    and ack.pulled.uuid == uid and ack.pulled.ok:
                if offer is not None:
                    self.transport.consumed(offer.uuid)
                how = "pulled"
            else:
                how = "abandoned"
        finally:
            if stage is not None:
                m.leave(stage, time.perf_counter() - began if stage == "offered" else None)
            if how in ("expired", "abandoned", "cancelled") and offered:
                m.failure("reclaimed")
            self.inflight[s.index] -= 1
            if offered:
                self.offers -= 1
            # The pages first (the offer is a gathered copy of them), then the offer.
            if not finished:
                s.engine.abort(rid)
            else:
                s.engine.release_parked(rid)
            if offer is not None and self.transport.pending(offer.uuid):
                # Reclaiming pulls from ourselves: bounded, but off the event loop.
                await asyncio.shield(asyncio.to_thread(self.transport.withdraw, offer.uuid,
                                                       how))
            logs.event("prefill_handoff", logging.INFO if how in ("pulled", "stop", "length")
                       else logging.WARNING, request_id=rid, slice=s.index, outcome=how,
                       kv_path="grpc" if by_grpc else "jax_transfer",
                       kv_bytes=offer.nbytes if offer is not None else 0, peer=context.peer())
