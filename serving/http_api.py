"""The OpenAI-compatible HTTP API (aiohttp), beside gRPC in the same event loop, process,
router and engines.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON or SSE streams),
`GET /v1/models`, `GET /health` (200 only when ready), `GET /metrics` (the registry of
`--metrics-port`) and, with `--profile-dir`, `POST /start_profile` and `/stop_profile`.
Requests go through the same path as gRPC's (serving/core.py): the JSON is translated
into a GenerateRequest (serving/openai_protocol.py) and validated, routed and streamed
exactly as a gRPC call is.

Security as for gRPC: the bearer token (`--auth-token-file`) on everything but
/health, compared in constant time; bodies bounded by `--max-request-bytes` (413
beyond); TLS and mutual TLS from the same certificates; a bound on concurrent
generation requests (429 beyond). Errors are OpenAI's JSON: 400 bad input, 401 auth,
404 unknown model or route, 409 a request id in flight, 413 body too large, 429 queue
full, 503 draining, warming up or no healthy slice. A client that disconnects has its
request aborted at once, which frees its KV pages.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import time
import uuid

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meshserve.engine.step_tls import server_context
from meshserve.serving import logs
from meshserve.serving import openai_protocol as oa
from meshserve.serving.auth import bearer_matches
from meshserve.serving.core import INVALID, GenerationCore, Rejected, SliceFailedError
from meshserve.serving.profiling import Profiler, ProfilerBusyError

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
OPEN_PATHS = ("/health",)  # probes need no credentials, as gRPC health checks
REQUEST_ID_HEADER = "X-Request-Id"


def server_ssl_context(cert: bytes, key: bytes, client_ca: bytes | None) -> ssl.SSLContext:
    """TLS (and with client_ca, mutual TLS) from the PEM bytes the gRPC server uses."""
    return server_context(cert, key, client_ca)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _json_response(obj, status: int = 200, headers=None) -> web.Response:
    return web.Response(text=json.dumps(obj), status=status, content_type="application/json",
                        headers=headers)


def _error(e: oa.ApiError, headers=None) -> web.Response:
    return _json_response(e.body(), e.status, headers)


class OpenAIServer:
    """Serve the HTTP API on `start(host, port)` until `stop()`."""

    def __init__(self, core: GenerationCore, model_name: str, max_request_bytes: int,
                 max_concurrent: int, auth_token: bytes | None = None,
                 profiler: Profiler | None = None):
        self.core = core
        self.model_name = model_name
        self.max_concurrent = max_concurrent
        self.profiler = profiler
        self.created = int(time.time())
        self._expected = None if auth_token is None else b"Bearer " + auth_token
        self._active = 0
        self._token_text = functools.lru_cache(maxsize=65536)(self._spell)
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self.app = web.Application(client_max_size=max_request_bytes,
                                   middlewares=[self._errors, self._auth])
        self.max_request_bytes = max_request_bytes
        routes = [web.post("/v1/completions", functools.partial(self._generate, chat=False)),
                  web.post("/v1/chat/completions", functools.partial(self._generate, chat=True)),
                  web.get("/v1/models", self._models), web.get("/health", self._health),
                  web.get("/metrics", self._metrics)]
        if profiler is not None:
            routes += [web.post("/start_profile", self._start_profile),
                       web.post("/stop_profile", self._stop_profile)]
        self.app.add_routes(routes)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        # handler_cancellation: a client that goes away cancels its handler, whose
        # Generation then aborts the request in its engine.
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context,
                           reuse_port=False)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # -- middleware --------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except oa.ApiError as e:
            return _error(e)
        except web.HTTPException as e:  # no such route, wrong method, ...
            if e.status < 400:
                raise
            return _error(oa.ApiError(e.status, f"{e.reason}: {request.method} {request.path}",
                                      code=e.reason.lower().replace(" ", "_")))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:  # noqa: BLE001 - a bug must not take the server down
            logs.event("http_error", logging.ERROR, path=request.path,
                       error=f"{type(e).__name__}: {e}")
            return _error(oa.ApiError(500, "internal server error", code="internal"))

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self._expected is None or request.path in OPEN_PATHS:
            return await handler(request)
        if bearer_matches(request.headers.getall("Authorization", []), self._expected):
            return await handler(request)
        self.core.metrics.reject("unauthenticated")
        logs.event("request_rejected", reason="unauthenticated", code=401, path=request.path,
                   peer=request.remote, frontend="http")
        return _error(oa.ApiError(401, "missing or invalid bearer token in the Authorization "
                                  "header", code="unauthenticated"),
                      headers={"WWW-Authenticate": "Bearer"})

    # -- generation ----------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise oa.ApiError(413, f"the request body is larger than {self.max_request_bytes} "
                              "bytes (--max-request-bytes)", code="invalid") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise oa.ApiError(400, f"the body is not valid JSON: {e}"[:200],
                              code="invalid") from None
        if not isinstance(body, dict):
            raise oa.ApiError(400, "the body must be a JSON object", code="invalid")
        try:
            # JSON's \u escapes can spell lone surrogates, which are no text: no protobuf
            # string (nor tokenizer) takes them.
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise oa.ApiError(400, "the body holds a string that is not valid Unicode (a lone "
                              "surrogate \\uD800-\\uDFFF escape)", code="invalid") from None
        except (ValueError, RecursionError) as e:
            raise oa.ApiError(400, f"the body is not valid JSON: {e}"[:200],
                              code="invalid") from None
        return body

    def _parse(self, body: dict, chat: bool) -> oa.ApiRequest:
        api = oa.parse_chat(body) if chat else oa.parse_completion(body)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise oa.ApiError(404, f"The model `{model}` does not exist.", "model",
                              "model_not_found")
        return api

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = time.perf_counter()
        peer = request.remote or ""
        rid = request.headers.get(REQUEST_ID_HEADER) or \
            f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if self._active >= self.max_concurrent:
            self.core.reject("RESOURCE_EXHAUSTED", "overloaded", "too many concurrent "
                             "requests", rid, peer, "http")
            raise oa.ApiError(429, f"more than {self.max_concurrent} concurrent requests "
                              "(--max-concurrent-rpcs); retry later", code="overloaded")
        self._active += 1
        try:
            try:
                if not rid.isascii():  # aiohttp decodes other header bytes as surrogates
                    raise oa.ApiError(400, f"the {REQUEST_ID_HEADER} header must be 1-128 "
                                      "printable ASCII characters", code="invalid")
                api = self._parse(await self._body(request), chat)
            except oa.ApiError as e:
                self.core.reject(INVALID, "invalid", e.message, rid, peer, "http")
                raise
            if api.unknown:  # names only: values may be private
                logs.event("unknown_fields_ignored", request_id=rid, fields=api.unknown[:32])
            api.request.request_id = rid
            try:
                generation = await self.core.start(api.request, rid, peer, arrival, "http")
            except Rejected as e:
                raise oa.from_rejected(e, chat) from None
            builder = oa.ResponseBuilder(api, rid, self.model_name, int(time.time()),
                                         self._token_text)
            try:
                if api.stream:
                    return await self._stream(request, generation, builder)
                return await self._collect(generation, builder)
            finally:
                generation.close()
        finally:
            self._active -= 1

    async def _stream(self, request: web.Request, generation, builder: oa.ResponseBuilder):
        response = web.StreamResponse(headers={**SSE_HEADERS, REQUEST_ID_HEADER: builder.id})
        await response.prepare(request)
        try:
            try:
                async for chunk in generation.chunks():
                    if chunk.token_ids or chunk.text or chunk.finished:
                        await response.write(_sse(builder.stream_chunk(chunk)))
                if builder.api.include_usage:
                    await response.write(_sse(builder.usage_chunk(
                        generation.final, len(generation.prepared.prompt_ids),
                        generation.generated)))
            except SliceFailedError as e:
                generation.fail(str(e))
                error = oa.ApiError(503, f"slice {generation.slice.index} failed while "
                                    f"generating: {e}", code="unavailable")
                await response.write(_sse(error.body()))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left; closing the generation aborts the request
        return response

    async def _collect(self, generation, builder: oa.ResponseBuilder) -> web.Response:
        try:
            async for chunk in generation.chunks():
                builder.add(chunk)
        except SliceFailedError as e:
            generation.fail(str(e))
            raise oa.ApiError(503, f"slice {generation.slice.index} failed while generating: "
                              f"{e}", code="unavailable") from None
        body = builder.body(generation.final, len(generation.prepared.prompt_ids))
        return _json_response(body, headers={REQUEST_ID_HEADER: builder.id})

    def _spell(self, token_id: int) -> str:
        tok = self.core.tokenizer
        if tok is None:
            return f"token_id:{token_id}"
        return tok.decode([token_id], skip_special=False)

    # -- the rest ------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "meshserve", "root": self.model_name, "parent": None,
                "max_model_len": self.core.limits.max_model_len}
        return _json_response({"object": "list", "data": [card]})

    async def _health(self, request: web.Request) -> web.Response:
        reason = self.core.not_ready_reason()
        if reason is None:
            return _json_response({"status": "ready"})
        return _error(oa.ApiError(503, reason, code="not_ready"))

    async def _metrics(self, request: web.Request) -> web.Response:
        text = await asyncio.to_thread(generate_latest, self.core.metrics.registry)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _start_profile(self, request: web.Request) -> web.Response:
        try:
            folder = await asyncio.to_thread(self.profiler.start)
        except ProfilerBusyError as e:
            raise oa.ApiError(409, str(e), code="profile_running") from None
        return _json_response({"status": "started", "profile_dir": folder})

    async def _stop_profile(self, request: web.Request) -> web.Response:
        try:
            seconds, files = await asyncio.to_thread(self.profiler.stop)
        except ProfilerBusyError as e:
            raise oa.ApiError(409, str(e), code="profile_not_running") from None
        return _json_response({"status": "stopped", "seconds": seconds, "files": files})
