"""`meshserve serve`: the gRPC server and, with --http-port, the OpenAI-compatible HTTP
API beside it (flags here; everything else lives in serving/)."""

from __future__ import annotations

import time

from absl import flags

from meshserve.tools import serve_multihost
from meshserve.tools.cli import PROCESS_START
from meshserve.tools.model_flags import capacity_bytes, checkpoint_dir, define_model_flags

# Joins a multi-process group (--coordinator ...) before JAX's backends start.
init_runtime = serve_multihost.init_runtime


def define_flags() -> None:
    define_model_flags()
    serve_multihost.define_flags()
    d = flags
    d.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback by default).")
    d.DEFINE_integer("port", 50051, "gRPC port (0 picks a free one).", lower_bound=0)
    d.DEFINE_integer("slices", 1, "Independent replicas: the devices are split into this many "
                     "equal groups, each with its own --mesh, engine and batch.", lower_bound=1)
    d.DEFINE_integer("prefill_slices", 0, "Prefill/decode disaggregation: this many of the "
                     "--slices only prefill (first token streamed at once), the others only "
                     "decode; each request's KV pages move between them.", lower_bound=0)
    d.DEFINE_string("prefill_mesh", None, "Layout of each prefill slice (default: --mesh), "
                    "e.g. tensor=4 beside a decode --mesh data=2,tensor=2.")
    d.DEFINE_string("layout_from", None, "results.json of `meshserve bench-mesh`: serve its "
                    "best layout (sets --slices and --mesh).")
    # Engine (per slice; limits are per data shard).
    d.DEFINE_integer("page_size", 16, "Tokens per KV page.", lower_bound=1)
    d.DEFINE_integer("num_pages", None, "KV pages per data shard (default: from memory).")
    d.DEFINE_integer("max_seqs", 64, "Sequences in a batch.", lower_bound=1)
    d.DEFINE_integer("max_step_tokens", 512, "Tokens per step.", lower_bound=1)
    d.DEFINE_integer("max_model_len", None, "Prompt + output limit (default: the model's).")
    d.DEFINE_integer("decode_steps", 8, "Decode iterations per device call.", lower_bound=1)
    d.DEFINE_integer("max_logprobs", 8, "Most top logprobs a request may ask for.",
                     lower_bound=0)
    d.DEFINE_integer("max_waiting_requests", 1024, "Queued requests per slice before "
                     "RESOURCE_EXHAUSTED.", lower_bound=1)
    d.DEFINE_integer("max_waiting_tokens", 1 << 20, "Queued prompt tokens per slice before "
                     "RESOURCE_EXHAUSTED.", lower_bound=1)
    d.DEFINE_integer("min_token_bucket", 16, "Smallest step-token bucket (fewer compiled "
                     "shapes for more padding).", lower_bound=1)
    d.DEFINE_integer("min_seq_bucket", 1, "Smallest batch bucket.", lower_bound=1)
    d.DEFINE_bool("warmup", True, "Compile every shape bucket before serving.")
    d.DEFINE_bool("prefix_cache", True, "Reuse the KV pages of prompt prefixes already "
                  "computed (same tokens and cache_salt); --no-prefix-cache turns it off.")
    # Routing between slices.
    d.DEFINE_bool("cache_aware_routing", True, "With --slices > 1 and the prefix cache: send "
                  "a request to the slice holding most of its prompt prefix while loads are "
                  "balanced (--no-cache-aware-routing: least load only).")
    d.DEFINE_integer("routing_balance_abs_tokens", 4096, "Load wins over the cache once the "
                     "busiest slice has this many more queued + running tokens than the "
                     "idlest...", lower_bound=0)
    d.DEFINE_float("routing_balance_rel", 1.5, "...and more than this many times its load.",
                   lower_bound=1.0)
    d.DEFINE_float("routing_load_weight", 0.25, "While balanced, a slice scores matched "
                   "prefix tokens minus this times its load tokens.", lower_bound=0.0)
    # Server.
    d.DEFINE_integer("max_request_bytes", 1 << 20, "Largest request (INVALID_ARGUMENT above "
                     "it; grpc answers RESOURCE_EXHAUSTED above twice it).", lower_bound=1024)
    d.DEFINE_integer("min_priority", 0, "The most urgent `priority` a request may ask for "
                     "(lower runs first; the default lets clients only yield to others).",
                     upper_bound=0)
    d.DEFINE_integer("default_max_tokens", 256, "max_tokens when a request leaves it unset.",
                     lower_bound=1)
    d.DEFINE_integer("max_concurrent_rpcs", 4096, "Concurrent RPCs of all kinds.",
                     lower_bound=1)
    d.DEFINE_float("grace_period", 30.0, "Seconds in-flight requests get after SIGTERM.",
                   lower_bound=0.0)
    d.DEFINE_string("auth_token_file", None, "Require `authorization: Bearer <token>` with "
                    "the token in this file (health checks are exempt).")
    d.DEFINE_string("tls_cert", None, "Server certificate chain (PEM) for TLS.")
    d.DEFINE_string("tls_key", None, "Server private key (PEM) for TLS.")
    d.DEFINE_string("tls_client_ca", None, "CA (PEM) that client certificates must chain to "
                    "(mutual TLS).")
    d.DEFINE_integer("metrics_port", None, "Serve Prometheus /metrics on "
                     "--metrics-host:PORT.")
    d.DEFINE_string("metrics_host", "127.0.0.1", "Address of --metrics-port (loopback by "
                    "default; 0.0.0.0 lets an in-cluster Prometheus scrape).")
    d.DEFINE_integer("http_port", None, "Also serve the OpenAI-compatible HTTP API "
                     "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics) "
                     "on this port (0 picks a free one), with the same token, TLS and limits.",
                     lower_bound=0, upper_bound=65535)
    d.DEFINE_string("http_host", "127.0.0.1", "Address of --http-port (loopback by default).")
    d.DEFINE_string("served_model_name", None, "The model id of the HTTP API (default: the "
                    "model's name).")
    d.DEFINE_string("profile_dir", None, "Allow on-demand jax.profiler traces (HTTP POST "
                    "/start_profile, /stop_profile; the StartProfile/StopProfile RPCs), written "
                    "here. Off without it.")
    d.DEFINE_string("slo", None, "Goodput targets, e.g. ttft_ms=500,tpot_ms=50 (also e2e_ms): "
                    "meshserve_requests_within_slo counts the requests that met them.")
    d.DEFINE_string("tensorboard_dir", None, "Write serving scalars as TensorBoard events.")
    d.DEFINE_float("tensorboard_interval", 10.0, "Seconds between TensorBoard writes.",
                   lower_bound=0.1)
    # Prefill/decode across servers (docs/deployment.md, "Prefill/decode across servers").
    d.DEFINE_enum("role", "colocated", ["colocated", "prefill", "decode"], "colocated: "
                  "prefill and decode here; prefill: also serve the internal Prefill API "
                  "for decode servers; decode: prefill on --prefill-peers, decode here.")
    d.DEFINE_list("prefill_peers", [], "--role decode: prefill servers' gRPC HOST:PORT "
                  "(they get this server's --auth-token-file token; TLS with --peer-tls-ca).")
    d.DEFINE_string("kv_transfer_address", "127.0.0.1:0", "--role prefill/decode: address "
                    "of this server's KV transfer server (jax.experimental.transfer).")
    d.DEFINE_bool("kv_transfer_insecure", False, "Allow a non-loopback "
                  "--kv-transfer-address: that transport is neither authenticated nor "
                  "encrypted, so only on a trusted, isolated fabric.")
    d.DEFINE_float("kv_offer_ttl", 30.0, "--role prefill: seconds an offered request's KV "
                   "waits to be pulled before its pages are reclaimed.", lower_bound=0.1)
    d.DEFINE_float("kv_transfer_timeout", 10.0, "--role decode: seconds for the KV offer "
                   "to come and for the pull itself.", lower_bound=0.1)
    d.DEFINE_float("prefill_timeout", 30.0, "--role decode: seconds from sending a request "
                   "to a prefill peer to its first token (then the next peer is tried).",
                   lower_bound=0.1)
    d.DEFINE_enum("kv_transport", "jax", ["jax", "grpc"], "--role decode: how KV pages "
                  "come from the prefill peers: jax (jax.experimental.transfer; fast, not "
                  "encrypted) or grpc (chunks on the internal call, under its TLS).")
    d.DEFINE_bool("peer_tls", False, "--role decode: TLS to the prefill peers (system roots "
                  "unless --peer-tls-ca).")
    d.DEFINE_string("peer_tls_ca", None, "CA (PEM) the prefill peers' certificates chain to "
                    "(implies --peer-tls).")
    d.DEFINE_string("peer_tls_cert", None, "Client certificate (PEM) for prefill peers that "
                    "require mutual TLS.")
    d.DEFINE_string("peer_tls_key", None, "Its private key (PEM).")
    d.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"],
                  "Serving log level (JSON lines on stderr).")


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def main(argv: list[str]) -> int:
    del argv
    from meshserve.engine.engine import EngineConfig
    from meshserve.meshes import default_compute_dtype
    from meshserve.serving import launch, logs
    from meshserve.serving.auth import read_token_file
    from meshserve.serving.compat_metrics import parse_slo
    from meshserve.serving.disagg_roles import DisaggOptions
    from meshserve.serving.prefill_server import PrefillOptions
    from meshserve.serving.remote_prefill import DecodeOptions
    from meshserve.serving.routing import RoutingConfig
    from meshserve.serving.server import ServerOptions

    f = flags.FLAGS
    logs.configure(f.log_level)
    from meshserve.tools.bench_mesh_report import apply_layout_from

    apply_layout_from(f)
    token = read_token_file(f.auth_token_file) if f.auth_token_file else None
    decode = None
    if f.role == "decode" or f.prefill_peers:
        decode = DecodeOptions(
            prefill_peers=tuple(f.prefill_peers), prefill_timeout_s=f.prefill_timeout,
            transfer_timeout_s=f.kv_transfer_timeout, peer_auth_token=token,
            peer_tls=f.peer_tls or f.peer_tls_ca is not None, peer_tls_ca=_read(f.peer_tls_ca),
            peer_tls_cert=_read(f.peer_tls_cert), peer_tls_key=_read(f.peer_tls_key),
            kv_transport=f.kv_transport)
    disagg = DisaggOptions(
        role=f.role, kv_transfer_address=f.kv_transfer_address,
        kv_transfer_insecure=f.kv_transfer_insecure,
        prefill=PrefillOptions(offer_ttl_s=f.kv_offer_ttl), decode=decode)
    options = ServerOptions(
        host=f.host, port=f.port, max_request_bytes=f.max_request_bytes,
        grace_period=f.grace_period,
        auth_token=token, disagg=disagg,
        tls_cert=_read(f.tls_cert), tls_key=_read(f.tls_key),
        tls_client_ca=_read(f.tls_client_ca), metrics_port=f.metrics_port,
        metrics_host=f.metrics_host, http_port=f.http_port, http_host=f.http_host,
        served_model_name=f.served_model_name, profile_dir=f.profile_dir, slo=parse_slo(f.slo),
        tensorboard_dir=f.tensorboard_dir, tensorboard_interval=f.tensorboard_interval,
        max_concurrent_rpcs=f.max_concurrent_rpcs, default_max_tokens=f.default_max_tokens,
        min_priority=f.min_priority,
        routing=RoutingConfig(cache_aware=f.cache_aware_routing,
                              balance_abs_tokens=f.routing_balance_abs_tokens,
                              balance_rel=f.routing_balance_rel,
                              load_weight=f.routing_load_weight),
    )
    if f.role != "colocated" and f.prefill_slices:
        raise ValueError("--role prefill/decode splits prefill and decode across servers; "
                         "--prefill-slices splits them inside one: choose one")
    if f.role != "colocated" and serve_multihost.active():
        raise ValueError("--role prefill/decode runs on one process per server (no "
                         "--coordinator group yet)")
    options.check()  # before the (slow) model load
    engine_config = EngineConfig(
        page_size=f.page_size, num_pages=f.num_pages, max_seqs=f.max_seqs,
        max_step_tokens=f.max_step_tokens, max_model_len=f.max_model_len,
        decode_steps=f.decode_steps, max_logprobs=f.max_logprobs,
        max_waiting_requests=f.max_waiting_requests, max_waiting_tokens=f.max_waiting_tokens,
        min_token_bucket=f.min_token_bucket, min_seq_bucket=f.min_seq_bucket,
        device_memory_bytes=capacity_bytes(), prefix_caching=f.prefix_cache,
        # One process: each slice's engine watches its own steps. A multi-host leader
        # watches the group's steps itself (the same flags, engine/multihost.py).
        step_timeout=None if serve_multihost.active() else f.step_timeout,
        compile_timeout=f.compile_timeout,
        # A parked prefill outlives its offer's TTL: the offer is what frees it.
        park_timeout_s=f.kv_offer_ttl + 10.0,
    )
    dtype = f.dtype or default_compute_dtype()
    if serve_multihost.active():
        if f.prefill_slices:
            raise ValueError("--prefill-slices splits the devices of one process; it does "
                             "not combine with a multi-process group (--coordinator)")
        return serve_multihost.main(options, engine_config, dtype)
    load_started = time.monotonic()
    with checkpoint_dir() as ckpt:
        model = launch.load(ckpt, f.mesh, f.slices, dtype, engine_config,
                            source=f.hf or f.gguf or f.checkpoint, warmup=f.warmup,
                            load_started=load_started, prefill_slices=f.prefill_slices,
                            prefill_mesh=f.prefill_mesh)
    return launch.serve(model, options, process_start=PROCESS_START)
