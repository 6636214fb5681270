"""The request path that every frontend shares: readiness gates, validation
(`requests.prepare`), routing, the engine's stream with slice-health checks, and the
per-request bookkeeping (metrics, logs, abort when a stream ends early).

gRPC (`service.py`) and the OpenAI-compatible HTTP API (`http_api.py`) only translate
their wire formats: both build a `GenerateRequest`, call `GenerationCore.start`, and map
a `Rejected` status to their own codes. So there is one copy of validation, sampling
semantics, routing and accounting, whichever protocol a request came in by.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator

from meshserve.engine.engine import EngineOverloadedError
from meshserve.engine.handoff import PREFILLED
from meshserve.engine.outputs import StreamChunk
from meshserve.engine.sampling_params import InvalidRequestError
from meshserve.models.chat import NoChatTemplateError
from meshserve.serving import logs
from meshserve.serving.compat_metrics import CompatMetrics
from meshserve.serving.disagg import HandoffFailed, HandoffRecord, hand_off
from meshserve.serving.metrics import ServingMetrics
from meshserve.serving.proto import meshserve_pb2 as pb
from meshserve.serving.requests import ModelLimits, NoTokenizerError, PreparedRequest, prepare
from meshserve.serving.slices import NoHealthySliceError, Routed, Router

# How often a waiting stream re-checks that its slice is alive: a dead engine must fail
# its streams with UNAVAILABLE even if it never delivers their final chunk.
HEALTH_POLL_S = 0.5
OFFLOAD_PROMPT_CHARS = 4096

# Frontend-neutral refusals (gRPC status names); each frontend maps them to its codes.
INVALID = "INVALID_ARGUMENT"
PRECONDITION = "FAILED_PRECONDITION"
OVERLOADED = "RESOURCE_EXHAUSTED"
UNAVAILABLE = "UNAVAILABLE"
EXISTS = "ALREADY_EXISTS"


class Rejected(Exception):
    """A request refused before it reached an engine. `status` is one of the constants
    above, `reason` the label of meshserve_requests_rejected, `message` for the client."""

    def __init__(self, status: str, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class SliceFailedError(Exception):
    """The slice's engine died (or ended the stream without a final chunk) mid-request."""


class Generation:
    """One request in flight, from routing to its last chunk; `close` runs exactly once,
    however the request ends (finished, cancelled, disconnected, failed)."""

    def __init__(self, core: GenerationCore, prepared: PreparedRequest, routed: Routed,
                 arrival: float, peer: str):
        self.core = core
        self.prepared = prepared
        self.routed = routed
        self.slice = routed.slice
        self.handle = routed.handle
        self.arrival = arrival
        self.peer = peer
        self.final: StreamChunk | None = None
        self.generated = 0
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.closed = False
        self.failure: str | None = None
        self.failed_slices: set[int] = set()  # slices this request failed over from
        # Prefill/decode slices (serving/disagg.py): the slice that prefilled, once the
        # request moved on; what the move cost; and the guard that keeps a cancelled
        # request from starting on a decode slice.
        self.prefill_slice = None
        # (A remote prefill's stream carries its own: serving/remote_prefill.py.)
        self.handoff: HandoffRecord | None = getattr(routed.handle, "handoff", None)
        self.stage_lock = threading.Lock()
        self.cancelled = False

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """The engine's chunks up to and including the final one, timed into the metrics.

        Failover: if the slice fails before this request streamed a token, the request
        is sent again (same id) to another healthy slice and its chunks come from there;
        once tokens went out, a failure raises SliceFailedError (the frontend ends the
        stream with UNAVAILABLE after those tokens: a retry would send them twice).
        A prefill slice's last chunk is handed on as an ordinary one: the stream goes on
        from the decode slice the request moves to (serving/disagg.py)."""
        while True:
            try:
                async for chunk in self._slice_chunks():
                    yield chunk
                return
            except SliceFailedError as e:
                if self.generated or not self._fail_over(str(e)):
                    raise

    def _fail_over(self, error: str) -> bool:
        """Route the request again, avoiding every slice it failed on; False when no
        other slice takes it (the caller reports the original failure)."""
        core, p, old = self.core, self.prepared, self.slice
        if core.draining:
            return False
        self.failed_slices.add(old.index)
        try:
            routed = core.router.submit(p.prompt_ids, p.params, p.request_id, p.cost_tokens,
                                        p.priority, p.cache_salt, avoid=self.failed_slices)
        except Exception:  # noqa: BLE001 - overloaded, no slice left, ...: fail as before
            return False
        try:
            old.engine.abort(p.request_id)
        except Exception:  # noqa: BLE001 - a dead engine has nothing left to free
            pass
        core.router.release(old, p.cost_tokens)
        self.routed, self.slice, self.handle = routed, routed.slice, routed.handle
        core.metrics.retried(old.index)
        core.metrics.routed(routed.slice.index, routed.reason, routed.matched_tokens)
        logs.event("request_retried", logging.WARNING, request_id=p.request_id,
                   failed_slice=old.index, slice=routed.slice.index, error=error)
        return True

    async def _slice_chunks(self) -> AsyncIterator[StreamChunk]:
        last = None
        moved = True
        while moved:
            moved = False
            async for chunk in self._engine_chunks():
                last = self._account(chunk, last)
                if chunk.finish_reason == PREFILLED:
                    if chunk.token_ids or chunk.text:
                        yield dataclasses.replace(chunk, finish_reason=None, usage=None)
                    try:
                        await hand_off(self, chunk)
                    except HandoffFailed as e:
                        raise SliceFailedError(str(e)) from None
                    if self.cancelled:
                        return
                    moved = True
                    break
                if chunk.finished:
                    if chunk.finish_reason == "abort" and chunk.error:
                        if chunk.token_ids:  # generated before the failure: sent first
                            yield StreamChunk(chunk.request_id, chunk.token_ids, chunk.text,
                                              chunk.logprobs)
                        raise SliceFailedError(chunk.error)
                    self.final, self.finished_at = chunk, time.perf_counter()
                    yield chunk
                    return
                yield chunk
        raise SliceFailedError("the engine ended the stream without a final chunk")

    def _account(self, chunk: StreamChunk, last: float | None) -> float | None:
        """Time a chunk's tokens into the metrics; returns when the last tokens came."""
        core, index = self.core, self.slice.index
        now = time.perf_counter()
        n = len(chunk.token_ids)
        if n:
            if last is None:
                self.first_token_at = now
                core.metrics.first_token(index, now - self.arrival)
                core.compat.first_token(index, now - self.arrival,
                                        len(self.prepared.prompt_ids))
            else:
                core.metrics.tokens(index, now - last, n)
                core.compat.tokens(index, now - last, n)
            core.compat.generated(index, n)
            self.generated += n
            return now
        return last

    async def _engine_chunks(self) -> AsyncIterator[StreamChunk]:
        it = self.handle.stream().__aiter__()
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            try:
                while True:
                    done, _ = await asyncio.wait({nxt}, timeout=HEALTH_POLL_S)
                    if done:
                        break
                    if not self.slice.healthy:
                        nxt.cancel()
                        error = getattr(self.slice.engine, "error", None)
                        raise SliceFailedError(f"engine stopped: {error}")
            except asyncio.CancelledError:
                nxt.cancel()
                raise
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                return
            yield chunk

    def fail(self, message: str) -> None:
        """The slice failed under this request (the frontend tells its client)."""
        self.failure = message
        self.core.metrics.reject("unavailable")

    def abort(self) -> None:
        """Stop the request in the engine holding it (a parked one's pages are freed),
        and keep a handoff under way from starting it on a decode slice."""
        with self.stage_lock:
            self.cancelled = True
            holder = self.slice
        try:
            holder.engine.abort(self.request_id)
        except Exception:  # noqa: BLE001 - a dead engine has nothing left to free
            pass

    def fill_timings(self, timings: pb.Timings) -> None:
        """The final response's per-stage timings of a request that changed slices."""
        if self.handoff is not None and self.final is not None:
            self.handoff.fill(timings, self.final.queue_ms,
                              self.finished_at or time.perf_counter())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        core, rid = self.core, self.request_id
        if self.final is None:
            # Cancelled, disconnected, past its deadline, or failed: stop it in the engine
            # now so its pages are free by the next step instead of when max_tokens runs out.
            self.abort()
        core.router.release(self.slice, self.prepared.cost_tokens)
        core.inflight.pop(rid, None)
        reason = self.final.finish_reason if self.final is not None else "cancelled"
        if self.failure is not None:
            reason = "error"
        end = self.finished_at or time.perf_counter()
        e2e = end - self.arrival
        queue_ms = self.final.queue_ms if self.final is not None else None
        usage = self.final.usage if self.final is not None else None
        core.metrics.finish(self.slice.index, reason, e2e, queue_ms,
                            len(self.prepared.prompt_ids), self.generated)
        if queue_ms is not None:
            core.metrics.role_queue(self.slice.role, queue_ms / 1e3)
        ttft = None if self.first_token_at is None else self.first_token_at - self.arrival
        tpot = ((end - self.first_token_at) / (self.generated - 1)
                if self.first_token_at is not None and self.generated > 1 else None)
        core.compat.finish(self.slice.index, reason, e2e, queue_ms, ttft, tpot,
                           completed=self.final is not None and self.failure is None)
        if usage is not None:
            core.metrics.cache_outcome(self.slice.index, self.routed.matched_tokens,
                                       usage.cached_tokens)
        logs.event(
            "request_finished", logging.INFO if self.failure is None else logging.WARNING,
            request_id=rid, slice=self.slice.index, peer=self.peer, finish_reason=reason,
            prefill_slice=self.prefill_slice.index if self.prefill_slice else None,
            transfer_ms=round(self.handoff.transfer_s * 1e3, 3) if self.handoff else None,
            prompt_tokens=len(self.prepared.prompt_ids), completion_tokens=self.generated,
            cached_tokens=usage.cached_tokens if usage else None,
            routing=self.routed.reason, matched_tokens=self.routed.matched_tokens,
            queue_ms=queue_ms, ttft_ms=self.final.ttft_ms if self.final else None,
            e2e_ms=round(e2e * 1e3, 3), error=self.failure,
        )


class GenerationCore:
    """Admission for every frontend: `start` gates, validates, routes and returns the
    request's Generation, or raises Rejected."""

    def __init__(self, router: Router, tokenizer, limits: ModelLimits,
                 metrics: ServingMetrics, compat: CompatMetrics):
        self.router = router
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics
        self.compat = compat
        self.inflight: dict[str, Generation] = {}
        self.draining = False
        self.warming = False  # set while the engines compile their programs

    @property
    def ready(self) -> bool:
        return not self.draining and not self.warming and self.router.serving()

    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "the server is shutting down"
        if self.warming:
            return "the server is warming up (readiness is NOT_SERVING)"
        if not self.router.serving():
            return "no healthy slice: every engine has stopped"
        return None

    def reject(self, status: str, reason: str, message: str, request_id: str, peer: str,
               frontend: str) -> Rejected:
        """Count and log a refusal; returns the exception for the caller to raise."""
        self.metrics.reject(reason)
        logs.event("request_rejected", request_id=request_id, reason=reason, code=status,
                   message=message, peer=peer, frontend=frontend)
        return Rejected(status, reason, message)

    async def start(self, request: pb.GenerateRequest, request_id: str, peer: str,
                    arrival: float, frontend: str = "grpc") -> Generation:
        def refuse(status: str, reason: str, message: str) -> Rejected:
            return self.reject(status, reason, message, request_id, peer, frontend)

        if self.draining:
            raise refuse(UNAVAILABLE, "draining", "the server is shutting down")
        if self.warming:
            raise refuse(UNAVAILABLE, "warming_up",
                         "the server is warming up (readiness is NOT_SERVING)")
        try:
            text_chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
            if text_chars > OFFLOAD_PROMPT_CHARS:
                # Tokenizing a long prompt (or rendering a long chat) takes milliseconds:
                # keep the loop (health checks, other streams) responsive meanwhile.
                prepared = await asyncio.to_thread(prepare, request, self.tokenizer,
                                                   self.limits, request_id)
            else:
                prepared = prepare(request, self.tokenizer, self.limits, request_id)
        except InvalidRequestError as e:
            raise refuse(INVALID, "invalid", str(e)) from None
        except NoTokenizerError as e:
            raise refuse(PRECONDITION, "no_tokenizer", str(e)) from None
        except NoChatTemplateError as e:
            raise refuse(PRECONDITION, "no_chat_template", str(e)) from None
        if request_id in self.inflight:
            raise refuse(EXISTS, "duplicate_id", f"request_id {request_id!r} is already in flight")
        try:
            routed = self.router.submit(prepared.prompt_ids, prepared.params, request_id,
                                        prepared.cost_tokens, prepared.priority,
                                        prepared.cache_salt)
        except InvalidRequestError as e:
            raise refuse(INVALID, "invalid", str(e)) from None
        except EngineOverloadedError as e:
            raise refuse(OVERLOADED, "overloaded", f"server overloaded, retry later: {e}") from None
        except NoHealthySliceError as e:
            raise refuse(UNAVAILABLE, "unavailable", str(e)) from None
        self.metrics.routed(routed.slice.index, routed.reason, routed.matched_tokens)
        generation = Generation(self, prepared, routed, arrival, peer)
        self.inflight[request_id] = generation
        logs.event("request_started", logging.DEBUG, request_id=request_id,
                   slice=routed.slice.index,
                   prompt_tokens=len(prepared.prompt_ids), max_tokens=prepared.params.max_tokens,
                   frontend=frontend)
        return generation
