"""The MeshServe gRPC service (grpc.aio): the gRPC frontend of serving/core.py.

Status codes: bad input → INVALID_ARGUMENT; full waiting queue → RESOURCE_EXHAUSTED;
no healthy slice, a slice dying (or its step hanging past --step-timeout) after the
stream sent tokens, or a draining server → UNAVAILABLE (a request that had streamed
nothing fails over to another slice instead: serving/core.py); a text
prompt without a tokenizer, or chat messages without a chat template →
FAILED_PRECONDITION; a request id already in flight →
ALREADY_EXISTS. A stream that ends for any other reason than its last chunk (client
cancel, expired deadline, server error) is aborted in its engine, which frees its pages.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from meshserve.serving.core import GenerationCore, Rejected, SliceFailedError
from meshserve.serving.profiling import Profiler, ProfilerBusyError
from meshserve.serving.proto import meshserve_pb2 as pb
from meshserve.serving.proto import meshserve_pb2_grpc as pb_grpc
from meshserve.serving.requests import to_response
from meshserve.serving.slices import ModelInfo
from meshserve.serving.topology import fill_runtime

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MeshServe"].full_name
VERSION = "meshserve.v1"


class MeshServeService(pb_grpc.MeshServeServicer):
    """The gRPC frontend of the shared request path (serving/core.py)."""

    def __init__(self, core: GenerationCore, model: ModelInfo,
                 profiler: Profiler | None = None):
        self.core = core
        self.profiler = profiler
        self.router = core.router
        self.tokenizer = core.tokenizer
        self.limits = core.limits
        self.metrics = core.metrics
        self.model = model
        self.startup = pb.StartupInfo()

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[
            pb.GenerateResponse]:
        arrival = time.perf_counter()
        rid = request.request_id or f"req-{uuid.uuid4().hex[:20]}"
        try:
            generation = await self.core.start(request, rid, context.peer(), arrival)
        except Rejected as e:
            await context.abort(getattr(grpc.StatusCode, e.status), e.message)
        # Runs when the RPC ends however it ends, even if grpc never resumes this
        # generator after a cancellation.
        context.add_done_callback(lambda _ctx: generation.close())
        prepared = generation.prepared
        try:
            async for chunk in generation.chunks():
                if chunk.finished:
                    response = to_response(chunk, prepared)
                    response.timings.e2e_ms = (generation.finished_at - arrival) * 1e3
                    response.slice = generation.slice.index  # where it ran (after failover)
                    if generation.prefill_slice is not None:
                        response.prefill_slice = generation.prefill_slice.index
                    generation.fill_timings(response.timings)
                    yield response
                    return
                if chunk.token_ids or chunk.text:
                    yield to_response(chunk, prepared)
        except SliceFailedError as e:
            generation.fail(str(e))
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"slice {generation.slice.index} failed while generating: {e}")
        finally:
            generation.close()

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
                role=s.role, parked=st.parked,
            )
        fill_runtime(info, [list(s.engine.model.rules.mesh.devices.flat)
                            for s in self.router.slices])
        return info

    async def _profile(self, context, action):
        if self.profiler is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "profiling is off: start the server with --profile-dir")
        try:
            return await asyncio.to_thread(action)
        except ProfilerBusyError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    async def StartProfile(self, request: pb.StartProfileRequest, context) -> pb.ProfileResponse:
        folder = await self._profile(context, lambda: self.profiler.start())
        return pb.ProfileResponse(profile_dir=folder)

    async def StopProfile(self, request: pb.StopProfileRequest, context) -> pb.ProfileResponse:
        seconds, files = await self._profile(context, lambda: self.profiler.stop())
        return pb.ProfileResponse(profile_dir=self.profiler.profile_dir, seconds=seconds,
                                  files=files)
