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
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from meshserve.engine.engine import EngineDeadError, EngineOverloadedError
from meshserve.engine.handoff import PREFILLED
from meshserve.engine.kv_transfer import KVTransport, TransferError
from meshserve.engine.sampling_params import InvalidRequestError
from meshserve.serving import logs
from meshserve.serving.kv_wire import chunk_to_pb, handoff_to_pb, layout_to_pb
from meshserve.serving.proto import internal_pb2 as ipb
from meshserve.serving.proto import internal_pb2_grpc as ipb_grpc
from meshserve.serving.requests import ModelLimits, prepare
from meshserve.serving.slices import Slice

INTERNAL_SERVICE = ipb.DESCRIPTOR.services_by_name["Prefill"].full_name


@dataclasses.dataclass(frozen=True)
class PrefillOptions:
    offer_ttl_s: float = 30.0  # an offer nobody acknowledged is reclaimed after this
    start_timeout_s: float = 10.0  # the first message must come within this
    export_timeout_s: float = 30.0  # the engine gathering the parked pages


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
            handoff = await asyncio.to_thread(s.engine.export_kv, rid,
                                              self.options.export_timeout_s)
            try:
                offer = self.transport.offer([handoff.kv])
            except TransferError as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            self.offers += 1
            m.timed("export", time.perf_counter() - began)
            stage = "offered"
            m.enter(stage)
            began = time.perf_counter()
            yield ipb.PrefillServerMessage(offer=ipb.KVOffer(
                transfer_address=self.transport.address, uuid=offer.uuid,
                layouts=[layout_to_pb(x) for x in offer.layouts],
                ttl_s=self.options.offer_ttl_s, nbytes=offer.nbytes,
                handoff=handoff_to_pb(handoff)))
            how = "expired"
            try:
                ack = await asyncio.wait_for(it.__anext__(), self.options.offer_ttl_s)
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"no Pulled within the offer's {self.options.offer_ttl_s} s")
            except StopAsyncIteration:
                ack = None
            if ack is not None and ack.WhichOneof("kind") == "pulled" \
                    and ack.pulled.uuid == offer.uuid and ack.pulled.ok:
                self.transport.consumed(offer.uuid)
                how = "pulled"
            else:
                how = "abandoned"
        finally:
            if stage is not None:
                m.leave(stage, time.perf_counter() - began if stage == "offered" else None)
            if how in ("expired", "abandoned", "cancelled") and offer is not None:
                m.failure("reclaimed")
            self.inflight[s.index] -= 1
            if offer is not None:
                self.offers -= 1
                if self.transport.pending(offer.uuid):
                    # Reclaiming pulls from ourselves: bounded, but off the event loop.
                    await asyncio.shield(asyncio.to_thread(self.transport.withdraw, offer.uuid,
                                                           how))
            if not finished:
                s.engine.abort(rid)
            else:
                s.engine.release_parked(rid)
            logs.event("prefill_handoff", logging.INFO if how in ("pulled", "stop", "length")
                       else logging.WARNING, request_id=rid, slice=s.index, outcome=how,
                       kv_bytes=offer.nbytes if offer is not None else 0, peer=context.peer())
