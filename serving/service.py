"""The MeshServe gRPC service (grpc.aio): validation, routing, streaming, cancellation.

Status codes: bad input → INVALID_ARGUMENT; full waiting queue → RESOURCE_EXHAUSTED;
no healthy slice, a slice dying mid-stream, or a draining server → UNAVAILABLE; a text
prompt without a tokenizer, or chat messages without a chat template →
FAILED_PRECONDITION; a request id already in flight →
ALREADY_EXISTS. A stream that ends for any other reason than its last chunk (client
cancel, expired deadline, server error) is aborted in its engine, which frees its pages.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from meshserve.engine.engine import EngineOverloadedError
from meshserve.engine.outputs import StreamChunk
from meshserve.engine.sampling_params import InvalidRequestError
from meshserve.models.chat import NoChatTemplateError
from meshserve.serving import logs
from meshserve.serving.metrics import ServingMetrics
from meshserve.serving.proto import meshserve_pb2 as pb
from meshserve.serving.proto import meshserve_pb2_grpc as pb_grpc
from meshserve.serving.requests import (
    ModelLimits,
    NoTokenizerError,
    PreparedRequest,
    prepare,
    to_response,
)
from meshserve.serving.slices import ModelInfo, NoHealthySliceError, Routed, Router, Slice

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MeshServe"].full_name
# How often a waiting stream re-checks that its slice is alive: a dead engine must fail
# its streams with UNAVAILABLE even if it never delivers their final chunk.
HEALTH_POLL_S = 0.5
VERSION = "meshserve.v1"
OFFLOAD_PROMPT_CHARS = 4096


class SliceFailedError(Exception):
    pass


class _Stream:
    """Book-keeping for one in-flight Generate call; `close` runs exactly once."""

    def __init__(self, service: MeshServeService, prepared: PreparedRequest, routed: Routed,
                 arrival: float, peer: str):
        self.service = service
        self.prepared = prepared
        self.routed = routed
        self.slice = routed.slice
        self.arrival = arrival
        self.peer = peer
        self.final: StreamChunk | None = None
        self.generated = 0
        self.closed = False
        self.failure: str | None = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        svc, rid = self.service, self.prepared.request_id
        if self.final is None:
            # Cancelled, past its deadline, or failed: stop it in the engine now so its
            # pages are free by the next step instead of when max_tokens runs out.
            try:
                self.slice.engine.abort(rid)
            except Exception:  # noqa: BLE001 - a dead engine has nothing left to free
                pass
        svc.router.release(self.slice, self.prepared.cost_tokens)
        svc.inflight.pop(rid, None)
        reason = self.final.finish_reason if self.final is not None else "cancelled"
        if self.failure is not None:
            reason = "error"
        e2e = time.perf_counter() - self.arrival
        queue_ms = self.final.queue_ms if self.final is not None else None
        usage = self.final.usage if self.final is not None else None
        svc.metrics.finish(self.slice.index, reason, e2e, queue_ms,
                           len(self.prepared.prompt_ids), self.generated)
        if usage is not None:
            svc.metrics.cache_outcome(self.slice.index, self.routed.matched_tokens,
                                      usage.cached_tokens)
        logs.event(
            "request_finished", logging.INFO if self.failure is None else logging.WARNING,
            request_id=rid, slice=self.slice.index, peer=self.peer, finish_reason=reason,
            prompt_tokens=len(self.prepared.prompt_ids), completion_tokens=self.generated,
            cached_tokens=usage.cached_tokens if usage else None,
            routing=self.routed.reason, matched_tokens=self.routed.matched_tokens,
            queue_ms=queue_ms, ttft_ms=self.final.ttft_ms if self.final else None,
            e2e_ms=round(e2e * 1e3, 3), error=self.failure,
        )


class MeshServeService(pb_grpc.MeshServeServicer):
    def __init__(self, router: Router, tokenizer, limits: ModelLimits, model: ModelInfo,
                 metrics: ServingMetrics):
        self.router = router
        self.tokenizer = tokenizer
        self.limits = limits
        self.model = model
        self.metrics = metrics
        self.inflight: dict[str, _Stream] = {}
        self.draining = False
        self.warming = False  # set while the engines compile their programs
        self.startup = pb.StartupInfo()

    async def _reject(self, context, code: grpc.StatusCode, reason: str, message: str,
                      request_id: str) -> None:
        self.metrics.reject(reason)
        logs.event("request_rejected", request_id=request_id, reason=reason,
                   code=code.name, message=message, peer=context.peer())
        await context.abort(code, message)

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[
            pb.GenerateResponse]:
        arrival = time.perf_counter()
        rid = request.request_id or f"req-{uuid.uuid4().hex[:20]}"
        if self.draining:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, "draining",
                               "the server is shutting down", rid)
        if self.warming:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, "warming_up",
                               "the server is warming up (readiness is NOT_SERVING)", rid)
        try:
            text_chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
            if text_chars > OFFLOAD_PROMPT_CHARS:
                # Tokenizing a long prompt (or rendering a long chat) takes milliseconds:
                # keep the loop (health checks, other streams) responsive meanwhile.
                prepared = await asyncio.to_thread(prepare, request, self.tokenizer,
                                                   self.limits, rid)
            else:
                prepared = prepare(request, self.tokenizer, self.limits, rid)
        except InvalidRequestError as e:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(e), rid)
        except NoTokenizerError as e:
            await self._reject(context, grpc.StatusCode.FAILED_PRECONDITION, "no_tokenizer",
                               str(e), rid)
        except NoChatTemplateError as e:
            await self._reject(context, grpc.StatusCode.FAILED_PRECONDITION,
                               "no_chat_template", str(e), rid)
        if rid in self.inflight:
            await self._reject(context, grpc.StatusCode.ALREADY_EXISTS, "duplicate_id",
                               f"request_id {rid!r} is already in flight", rid)
        try:
            routed = self.router.submit(prepared.prompt_ids, prepared.params, rid,
                                        prepared.cost_tokens, prepared.priority,
                                        prepared.cache_salt)
        except InvalidRequestError as e:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(e), rid)
        except EngineOverloadedError as e:
            await self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded",
                               f"server overloaded, retry later: {e}", rid)
        except NoHealthySliceError as e:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, "unavailable", str(e), rid)

        slice_, handle = routed.slice, routed.handle
        self.metrics.routed(slice_.index, routed.reason, routed.matched_tokens)
        stream = _Stream(self, prepared, routed, arrival, context.peer())
        self.inflight[rid] = stream
        # Runs when the RPC ends however it ends, even if grpc never resumes this
        # generator after a cancellation.
        context.add_done_callback(lambda _ctx: stream.close())
        logs.event("request_started", logging.DEBUG, request_id=rid, slice=slice_.index,
                   prompt_tokens=len(prepared.prompt_ids), max_tokens=prepared.params.max_tokens)
        last = None
        try:
            async for chunk in self._chunks(slice_, handle, rid):
                now = time.perf_counter()
                n = len(chunk.token_ids)
                if n:
                    if last is None:
                        self.metrics.first_token(slice_.index, now - arrival)
                    else:
                        self.metrics.tokens(slice_.index, now - last, n)
                    last = now
                    stream.generated += n
                if chunk.finished:
                    if chunk.finish_reason == "abort" and chunk.error:
                        raise SliceFailedError(chunk.error)
                    stream.final = chunk
                    response = to_response(chunk, prepared)
                    response.timings.e2e_ms = (now - arrival) * 1e3
                    response.slice = slice_.index
                    yield response
                    return
                if n or chunk.text:
                    yield to_response(chunk, prepared)
            raise SliceFailedError("the engine ended the stream without a final chunk")
        except SliceFailedError as e:
            stream.failure = str(e)
            self.metrics.reject("unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"slice {slice_.index} failed while generating: {e}")
        finally:
            stream.close()

    async def _chunks(self, slice_: Slice, handle, rid: str) -> AsyncIterator[StreamChunk]:
        """The engine's chunks, failing with SliceFailedError if the engine dies meanwhile."""
        it = handle.stream().__aiter__()
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            try:
                while True:
                    done, _ = await asyncio.wait({nxt}, timeout=HEALTH_POLL_S)
                    if done:
                        break
                    if not slice_.healthy:
                        nxt.cancel()
                        error = getattr(slice_.engine, "error", None)
                        raise SliceFailedError(f"engine stopped: {error}")
            except asyncio.CancelledError:
                nxt.cancel()
                raise
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                return
            yield chunk

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the model has no tokenizer")
        if len(request.text.encode()) > self.limits.max_request_bytes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"text is longer than {self.limits.max_request_bytes} bytes")
        special = request.add_bos if request.HasField("add_bos") else True
        return pb.TokenizeResponse(
            token_ids=self.tokenizer.encode(request.text, add_special_tokens=special))

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the model has no tokenizer")
        bad = [t for t in request.token_ids if not 0 <= t < self.limits.vocab_size]
        if bad:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token_ids {bad[:8]} are outside the vocabulary [0, {self.limits.vocab_size})",
            )
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = self.tokenizer.decode(list(request.token_ids), skip_special=skip)
        return pb.DetokenizeResponse(text=text)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        m, lim = self.model, self.limits
        info = pb.ServerInfo(
            model_name=m.name, architecture=m.architecture, dtype=m.dtype,
            slice_count=len(self.router.slices), max_model_len=lim.max_model_len,
            vocab_size=lim.vocab_size, page_size=self.router.slices[0].engine.config.page_size,
            demo=m.demo, has_tokenizer=self.tokenizer is not None,
            eos_token_ids=m.eos_token_ids, max_logprobs=lim.max_logprobs,
            max_request_bytes=lim.max_request_bytes, version=VERSION,
            has_chat_template=self.tokenizer is not None and self.tokenizer.can_chat,
        )
        info.startup.CopyFrom(self.startup)
        info.startup.compiles_after_ready = sum(
            s.engine.stats().compiles_after_warmup for s in self.router.slices)
        if m.bos_token_id is not None:
            info.bos_token_id = m.bos_token_id
        for s in self.router.slices:
            st = s.stats()
            info.slices.add(
                index=s.index, mesh_layout=s.layout, devices=s.devices, healthy=s.healthy,
                running=st.running, waiting=st.waiting, free_pages=st.free_pages,
                total_pages=st.total_pages, preemptions=st.preemptions, routed_requests=s.routed,
            )
        return info
