"""Assembling and running the server: the gRPC port and, with `http_port`, the
OpenAI-compatible HTTP API in the same event loop (both over one GenerationCore, so one
request path); TLS, auth, health, reflection, metrics, warm-up, and graceful shutdown on
SIGTERM/SIGINT.

Shutdown: readiness ("meshserve.v1.MeshServe", and HTTP /health) turns NOT_SERVING and
new Generate calls get UNAVAILABLE (HTTP 503) while liveness ("") and in-flight streams
carry on; after the grace period whatever is still running is aborted (its stream ends
with finish_reason "abort"), the ports close and the engines stop. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from meshserve.serving import logs
from meshserve.serving.auth import BearerTokenInterceptor
from meshserve.serving.compat_metrics import CompatMetrics
from meshserve.serving.core import GenerationCore
from meshserve.serving.disagg_roles import DisaggOptions, Role
from meshserve.serving.metrics import ServingMetrics, TensorBoardWriter, start_prometheus
from meshserve.serving.proto import meshserve_pb2 as pb
from meshserve.serving.requests import ModelLimits
from meshserve.serving.routing import RoutingConfig
from meshserve.serving.service import SERVICE_NAME, MeshServeService
from meshserve.serving.slices import ModelInfo, Router, Slice
from meshserve.serving.wire import Malformed, add_service

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclasses.dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (see MeshServeServer.port)
    # Requests larger than this get INVALID_ARGUMENT from the service; grpc itself
    # refuses messages over twice this with RESOURCE_EXHAUSTED before parsing them.
    max_request_bytes: int = 1 << 20
    grace_period: float = 30.0
    auth_token: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None  # set: clients must present a cert it signed (mTLS)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    tensorboard_dir: str | None = None
    tensorboard_interval: float = 10.0
    # Concurrent RPCs of all kinds; grpc answers RESOURCE_EXHAUSTED above it. The
    # engines' waiting queues refuse work long before this in normal operation.
    max_concurrent_rpcs: int = 4096
    default_max_tokens: int = 256
    min_priority: int = 0  # the most urgent priority a client may ask for
    routing: RoutingConfig = dataclasses.field(default_factory=RoutingConfig)
    # The OpenAI-compatible HTTP API (None: off), with the same TLS, token and limits.
    http_port: int | None = None  # 0 picks a free port (see MeshServeServer.http_port)
    http_host: str = "127.0.0.1"
    served_model_name: str | None = None  # the API's model id (default: the model's name)
    profile_dir: str | None = None  # set: on-demand jax.profiler traces are written here
    slo: dict[str, float] = dataclasses.field(default_factory=dict)  # goodput targets (ms)
    # Prefill/decode across servers (serving/disagg_roles.py): the role, its peers, the
    # KV transfer server's address.
    disagg: DisaggOptions = dataclasses.field(default_factory=DisaggOptions)

    def check(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.max_request_bytes < 1024:
            raise ValueError("--max-request-bytes must be at least 1024")
        if self.grace_period < 0:
            raise ValueError("--grace-period must be >= 0")
        if self.default_max_tokens < 1:
            raise ValueError("--default-max-tokens must be >= 1")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError("--http-port must be in [0, 65536)")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("--served-model-name must not be empty")
        self.disagg.check()


class MeshServeServer:
    def __init__(self, slices: list[Slice], tokenizer, model: ModelInfo, options: ServerOptions):
        options.check()
        self.options = options
        self.slices = slices
        self.metrics = ServingMetrics(slices)
        self.role = Role(options.disagg, slices, options.routing, self.metrics)
        self.router = self.role.router or Router(slices, options.routing)
        engine = slices[0].engine
        limits = ModelLimits(
            vocab_size=engine.vocab_size,
            max_model_len=engine.max_model_len,
            max_logprobs=engine.config.max_logprobs,
            max_request_bytes=options.max_request_bytes,
            default_max_tokens=options.default_max_tokens,
            min_priority=options.min_priority,
        )
        self.limits = limits
        self.model_name = options.served_model_name or model.name
        self.compat = CompatMetrics(self.metrics.registry, slices, self.model_name, options.slo)
        self.compat.observe_steps(slices)
        self.core = GenerationCore(self.router, tokenizer, limits, self.metrics, self.compat)
        self.profiler = None
        if options.profile_dir:
            from meshserve.serving.profiling import Profiler

            self.profiler = Profiler(options.profile_dir)
        self.service = MeshServeService(self.core, model, self.profiler)
        self.http = None
        self.http_port: int | None = None
        self.health = None
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._prometheus = None
        self._tensorboard: TensorBoardWriter | None = None
        self._stopped: asyncio.Event | None = None
        self._skip_grace: asyncio.Event | None = None
        self._monitor: asyncio.Task | None = None
        self._stopping = False
        self._prepare_task: asyncio.Task | None = None
        self.prepare_error: Exception | None = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        o = self.options
        self._stopped = asyncio.Event()
        self._skip_grace = asyncio.Event()
        interceptors = []
        if o.auth_token is not None:
            interceptors.append(BearerTokenInterceptor(
                o.auth_token, on_reject=lambda _m: self.metrics.reject("unauthenticated")))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=o.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", 2 * o.max_request_bytes),
                # Without this Linux lets a second server bind the same port silently.
                ("grpc.so_reuseport", 0),
                # Ping idle connections so a vanished client's stream is cancelled (and
                # its request aborted) instead of generating into the void.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
            ],
        )
        # Bytes that are no valid request get INVALID_ARGUMENT, not grpc's UNKNOWN.
        def malformed(m: Malformed) -> None:
            self.metrics.reject("invalid")
            logs.event("request_rejected", reason="invalid", code="INVALID_ARGUMENT",
                       message=m.message, frontend="grpc")

        add_service(self.server, self.service, pb, "MeshServe", malformed)
        # The internal Prefill call streams both ways: its generated registration.
        internal = self.role.add_services(self.server, self.slices, self.core.tokenizer,
                                          self.limits)
        self.health = health_aio.HealthServicer()
        add_service(self.server, self.health, health_pb2, "Health", malformed)
        await self.health.set("", SERVING)
        await self.health.set(SERVICE_NAME, NOT_SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, *internal, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        host = f"[{o.host}]" if ":" in o.host and not o.host.startswith("[") else o.host
        address = f"{host}:{o.port}"
        if o.tls_cert is not None:
            creds = grpc.ssl_server_credentials(
                [(o.tls_key, o.tls_cert)], root_certificates=o.tls_client_ca,
                require_client_auth=o.tls_client_ca is not None,
            )
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"could not bind {address}")
        for bound in (o.host, o.http_host if o.http_port is not None else None):
            if bound and bound not in LOOPBACK and (o.tls_cert is None or o.auth_token is None):
                logs.event("insecure_bind", logging.WARNING, host=bound,
                           message="listening beyond loopback without TLS and auth")
        if o.metrics_port is not None:
            self._prometheus = start_prometheus(self.metrics, o.metrics_port, o.metrics_host)
        if o.tensorboard_dir:
            self._tensorboard = TensorBoardWriter(self.metrics, o.tensorboard_dir,
                                                  o.tensorboard_interval)
            self._tensorboard.start()
        await self.server.start()
        if o.http_port is not None:
            await self._start_http()
        logs.event("server_started", host=o.host, port=self.port, tls=o.tls_cert is not None,
                   mtls=o.tls_client_ca is not None, auth=o.auth_token is not None,
                   slices=len(self.slices), layouts=[s.layout for s in self.slices],
                   metrics_port=o.metrics_port, http_host=o.http_host if self.http else None,
                   http_port=self.http_port, model_name=self.model_name,
                   **self.role.describe())
        self._monitor = asyncio.create_task(self._watch_health())
        return self.port

    async def _start_http(self) -> None:
        from meshserve.serving.http_api import OpenAIServer, server_ssl_context

        o = self.options
        ssl_context = None
        if o.tls_cert is not None:
            ssl_context = server_ssl_context(o.tls_cert, o.tls_key, o.tls_client_ca)
        self.http = OpenAIServer(self.core, self.model_name, o.max_request_bytes,
                                 o.max_concurrent_rpcs, o.auth_token, self.profiler)
        try:
            self.http_port = await self.http.start(o.http_host, o.http_port, ssl_context)
        except OSError as e:
            await self.server.stop(grace=0)
            raise RuntimeError(f"could not bind the HTTP API on {o.http_host}:{o.http_port}: "
                               f"{e}") from None

    async def _readiness(self) -> None:
        await self.health.set(SERVICE_NAME, SERVING if self.core.ready else NOT_SERVING)

    async def _watch_health(self) -> None:
        """Keep readiness in step with the slices: NOT_SERVING once none is healthy."""
        known = None
        while not self.core.draining:
            healthy = tuple(s.index for s in self.slices if s.healthy)
            if healthy != known:
                if known is not None:
                    logs.event("slices_changed", logging.WARNING, healthy=list(healthy),
                               errors={s.index: str(getattr(s.engine, "error", None))
                                       for s in self.slices if not s.healthy})
                known = healthy
                await self._readiness()
            await asyncio.sleep(0.5)

    async def drain(self) -> None:
        """Refuse new Generate calls (UNAVAILABLE) and report readiness NOT_SERVING;
        running streams carry on."""
        self.core.draining = True
        self.role.drain()
        await self._readiness()

    async def stop(self, grace: float | None = None, shutdown_engines: bool = True) -> None:
        """Drain and stop (idempotent): see the module docstring. shutdown_engines=False
        leaves the engines running for another server (tests share them)."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.options.grace_period if grace is None else grace
        await self.drain()
        loop = asyncio.get_running_loop()
        inflight = self.core.inflight
        logs.event("draining", inflight=len(inflight), grace_period_s=grace)
        deadline = loop.time() + grace
        while ((inflight or self.role.busy) and loop.time() < deadline
               and not self._skip_grace.is_set()):
            await asyncio.sleep(0.05)
        left = list(inflight.values())
        for stream in left:
            stream.abort()
        # Let the aborted streams send their final chunk before the ports close.
        deadline = loop.time() + 2.0
        while inflight and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=1.0)
        if self.http is not None:
            await self.http.stop()
        if self.profiler is not None and self.profiler.running:
            await asyncio.to_thread(self.profiler.stop)
        if self._monitor is not None:
            self._monitor.cancel()
        await self.role.close()
        if shutdown_engines:
            await asyncio.gather(*(asyncio.to_thread(s.engine.shutdown, timeout=10.0)
                                   for s in self.slices))
        if self._prometheus is not None:
            self._prometheus.shutdown()
        if self._tensorboard is not None:
            self._tensorboard.close()
        logs.event("server_stopped", aborted_on_shutdown=len(left))
        self._stopped.set()

    def record_startup(self, load_seconds: float, warmup_seconds: float, ready_seconds: float,
                       programs: int, from_cache: int) -> None:
        other = max(0.0, ready_seconds - load_seconds - warmup_seconds)
        st = self.service.startup
        st.load_seconds, st.warmup_seconds = load_seconds, warmup_seconds
        st.other_seconds, st.ready_seconds = other, ready_seconds
        st.programs, st.programs_from_cache = programs, from_cache
        for phase, value in (("load", load_seconds), ("warmup", warmup_seconds),
                             ("other", other), ("ready", ready_seconds)):
            self.metrics.startup.labels(phase).set(value)
        self.metrics.startup_programs.labels("compiled").set(programs - from_cache)
        self.metrics.startup_programs.labels("cache").set(from_cache)
        logs.event("ready", seconds=round(ready_seconds, 2), load_s=round(load_seconds, 2),
                   warmup_s=round(warmup_seconds, 2), other_s=round(other, 2),
                   programs=programs, compiled=programs - from_cache, from_cache=from_cache)

    async def _prepare(self, prepare: Callable[[], None], failed: asyncio.Event) -> None:
        """Run `prepare` (warm-up) off the loop with readiness NOT_SERVING meanwhile."""
        self.core.warming = True
        await self._readiness()
        try:
            await asyncio.to_thread(prepare)
        except Exception as e:  # the server cannot become ready: stop, exit non-zero
            logs.event("warmup_failed", logging.ERROR, error=f"{type(e).__name__}: {e}")
            self.prepare_error = e
            failed.set()
            return
        self.core.warming = False
        self.service.startup.ready = True
        await self._readiness()

    async def run_until_signal(self, prepare: Callable[[], None] | None = None) -> None:
        """Start, run `prepare` (the engines' warm-up) with readiness NOT_SERVING, serve
        until SIGTERM or SIGINT, then drain and stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        got = asyncio.Event()
        if prepare is None:
            self.service.startup.ready = True
        else:
            self._prepare_task = asyncio.create_task(self._prepare(prepare, got))

        def on_signal(signum: int) -> None:
            if got.is_set():
                logs.event("signal_again", signal=signal.Signals(signum).name,
                           message="skipping the rest of the grace period")
                self._skip_grace.set()
                return
            logs.event("signal", signal=signal.Signals(signum).name)
            got.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await got.wait()
            await self.stop()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        if self.prepare_error is not None:
            raise self.prepare_error

