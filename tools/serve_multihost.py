"""`meshserve serve` across processes: the same command on every host.

    meshserve serve --coordinator HOST:PORT --num-processes N --process-id I --checkpoint DIR
        --mesh data=2,tensor=4 ...

(or MESHSERVE_COORDINATOR / MESHSERVE_NUM_PROCESSES / MESHSERVE_PROCESS_ID; on a Cloud
TPU VM with none of them JAX detects the pod slice). Process 0 serves gRPC and drives
the engine; the others run its steps (engine/multihost.py) and serve only the gRPC
health service on --host/--port, SERVING while they are part of the group.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import NoReturn

from absl import flags

from meshserve.meshes.distributed import EXIT_GROUP_FAILED, EXIT_STARTUP, DistributedConfig

ENV_SECRET = "MESHSERVE_MULTIHOST_SECRET"
_LOOPBACK_SECRET = b"meshserve-loopback-only"  # all processes on one host; see _secret()
_GROUP: DistributedConfig | None = None


def define_flags() -> None:
    d = flags
    d.DEFINE_string("coordinator", None, "HOST:PORT of process 0 (JAX's coordination "
                    "service); enables multi-host serving. Env: MESHSERVE_COORDINATOR.")
    d.DEFINE_integer("num_processes", None, "Processes in the group (the same everywhere). "
                     "Env: MESHSERVE_NUM_PROCESSES.", lower_bound=1)
    d.DEFINE_integer("process_id", None, "This process's id; 0 serves gRPC. "
                     "Env: MESHSERVE_PROCESS_ID.", lower_bound=0)
    d.DEFINE_float("distributed_init_timeout", 300.0, "Seconds for every process to join "
                   "(jax.distributed and the step channel) before start-up fails.",
                   lower_bound=1.0)
    d.DEFINE_float("heartbeat_timeout", 10.0, "A process silent this long on the step "
                   "channel counts as dead (heartbeats go every fifth of it).",
                   lower_bound=0.1)
    d.DEFINE_float("step_timeout", 60.0, "A device step not finished in this many seconds "
                   "fails its slice: it leaves rotation and its streams end UNAVAILABLE "
                   "(multi-host: the group fails; a hung process, or a collective blocked "
                   "on a dead one).", lower_bound=0.1)
    d.DEFINE_float("compile_timeout", 900.0, "The step timeout for a step that launches a "
                   "shape for the first time, which compiles.", lower_bound=0.1)
    d.DEFINE_integer("step_channel_port", None, "Port of the leader's step channel "
                     "(default: the coordinator's port + 1).", lower_bound=0)
    d.DEFINE_string("multihost_secret_file", None, "Shared secret authenticating the step "
                    f"channel (or env {ENV_SECRET}); required unless the coordinator is on "
                    "loopback.")
    d.DEFINE_float("failure_exit_delay", 2.0, "After a group failure the leader fails its "
                   "streams and reports NOT_SERVING, then exits non-zero this much later.",
                   lower_bound=0.0)
    d.DEFINE_bool("tpu_auto_distributed", True, "On a Cloud TPU VM without --coordinator, "
                  "let JAX detect the pod slice's processes.")


def init_runtime() -> None:
    """Join the process group; the CLI calls this before anything starts a JAX backend."""
    global _GROUP
    from meshserve.meshes import distributed

    f = flags.FLAGS
    cfg = distributed.resolve(
        f.coordinator, f.num_processes, f.process_id, tpu_auto=f.tpu_auto_distributed,
        init_timeout=f.distributed_init_timeout,
        # JAX's heartbeat is a backstop that aborts: ours must detect (and report) first.
        heartbeat_timeout=3 * f.heartbeat_timeout + f.failure_exit_delay + 10.0,
    )
    if cfg is None:
        return
    _convert_before_joining()
    try:
        group = distributed.initialize(cfg)
    except distributed.DistributedError as e:
        if jax_distributed_started():  # half-joined: JAX's exit-time barrier could hang
            distributed.exit_now(EXIT_STARTUP, str(e))
        raise
    _GROUP = group if group.num_processes > 1 else None


def _convert_before_joining() -> None:
    """Convert `--hf`/`--gguf` into the cache of converted checkpoints before the group
    forms. Orbax's save in a process that joined a group waits on barriers the other
    processes never enter (a fatal coordination error), so the conversion runs in a
    child process of its own; processes sharing a filesystem take turns on the cache's
    lock and the later ones load the first one's result."""
    f = flags.FLAGS
    source, kind = (f.hf, "hf") if f.hf else (f.gguf, "gguf") if f.gguf else (None, None)
    if source is None or f.checkpoint:
        return  # no conversion, or checkpoint_dir() refuses the flags later
    done = subprocess.run([sys.executable, "-m", "meshserve.tools.converted_cache", kind,
                           source], stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        raise ValueError(f"converting {source} failed (its error is above)")


def jax_distributed_started() -> bool:
    import jax

    return jax.distributed.is_initialized()


def active() -> bool:
    return _GROUP is not None


def _log(name: str, **fields) -> None:
    from meshserve.serving import logs

    logs.event(name, **fields)


def _secret(coordinator_host: str) -> bytes:
    from meshserve.meshes.distributed import is_loopback

    f = flags.FLAGS
    if f.multihost_secret_file:
        with open(f.multihost_secret_file, "rb") as fh:
            secret = fh.read().strip()
    else:
        secret = os.environ.get(ENV_SECRET, "").strip().encode()
    if secret:
        if len(secret) < 16:
            raise ValueError("the multi-host secret must be at least 16 bytes")
        return secret
    if is_loopback(coordinator_host):
        _log("step_channel_default_secret", message=f"no {ENV_SECRET}: the step channel on "
             "loopback is not protected from other local users")
        return _LOOPBACK_SECRET
    raise ValueError(f"multi-host serving beyond loopback needs a shared secret: set {ENV_SECRET} "
                     "or --multihost-secret-file on every process")


def _fingerprint(ckpt: str, engine_config, dtype: str, layout: str) -> dict:
    """What must be equal on every process (compared in the step channel's handshake)."""
    import dataclasses

    import jax

    from meshserve.models.checkpoint import MANIFEST

    with open(os.path.join(ckpt, MANIFEST), "rb") as fh:
        manifest = hashlib.sha256(fh.read()).hexdigest()[:16]
    return {"checkpoint": manifest, "mesh": layout, "dtype": dtype,
            "engine": dataclasses.asdict(engine_config),
            "local_devices": len(jax.local_devices()), "jax": jax.__version__}


def _global_mesh(text: str):
    import jax

    from meshserve.meshes import LayoutError, make_mesh, parse_layout

    layout = parse_layout(text)
    total, local = jax.device_count(), jax.local_device_count()
    if layout.slices != 1 or flags.FLAGS.slices != 1:
        raise LayoutError("multi-host serving runs one slice spanning every process: "
                          "use --slices 1")
    if layout.devices_per_slice != total:
        raise LayoutError(
            f"--mesh {layout.to_string()} uses {layout.devices_per_slice} devices; multi-host "
            f"serving needs one mesh over all {total} devices of the {jax.process_count()} "
            f"processes, e.g. data={jax.process_count()},tensor={local}")
    return layout, make_mesh(layout, jax.devices())


def main(options, engine_config, dtype: str) -> int:
    """Run this process's part; start-up errors end the process (EXIT_STARTUP) rather
    than return into JAX's exit-time barrier with peers that may be gone."""
    from meshserve.meshes.distributed import exit_now, split_address
    from meshserve.tools.model_flags import checkpoint_dir

    f = flags.FLAGS
    group = _GROUP
    try:
        if not f.checkpoint and not f.hf and not f.gguf:
            raise ValueError("multi-host serving needs --checkpoint (or --hf, --gguf) on every "
                             "process")
        host, port = split_address(group.coordinator)
        port = f.step_channel_port or port + 1
        if port > 65535:
            raise ValueError("the coordinator port is the largest: give --step-channel-port")
        secret = _secret(host)
        with checkpoint_dir() as ckpt:
            layout, mesh = _global_mesh(f.mesh)
            fingerprint = _fingerprint(ckpt, engine_config, dtype, layout.to_string())
            if group.is_leader:
                return _leader(group, ckpt, mesh, layout, options, engine_config, dtype,
                               secret, host, port, fingerprint)
            return _follower(group, ckpt, mesh, options, engine_config, dtype, secret, host,
                             port, fingerprint)
    except (ValueError, RuntimeError, OSError) as e:
        exit_now(EXIT_STARTUP, f"process {group.process_id}: {e}")
    return EXIT_STARTUP  # not reached


def _load(ckpt: str, mesh, dtype: str, engine_config):
    import jax.numpy as jnp

    from meshserve.engine.multihost import agree_config
    from meshserve.models.loading import load_checkpoint

    model = load_checkpoint(ckpt, mesh, jnp.dtype(dtype))  # collective: every process
    return model, agree_config(model, engine_config)


def _leader(group, ckpt, mesh, layout, options, engine_config, dtype, secret, host, port,
            fingerprint) -> int:
    from meshserve.engine.multihost import LeaderFailure, MultiHostEngine
    from meshserve.engine.step_channel import LeaderLink
    from meshserve.engine.step_tls import LeaderTls
    from meshserve.meshes.distributed import is_loopback
    from meshserve.models.checkpoint import checkpoint_config
    from meshserve.models.tokenizer import find_tokenizer
    from meshserve.serving import launch
    from meshserve.serving.slices import Slice, model_info

    f = flags.FLAGS
    # The step channel carries users' token ids: TLS with the gRPC server's certificate.
    tls = LeaderTls.from_pem(options.tls_cert, options.tls_key) if options.tls_cert else None
    link = LeaderLink(host if is_loopback(host) else "", port, secret, group.num_processes,
                      fingerprint, f.heartbeat_timeout, log=_log, tls=tls)
    _log("step_channel_listening", port=link.port, processes=group.num_processes,
         tls=tls is not None)
    if tls is None and not is_loopback(host):
        _log("step_channel_plaintext", message="without --tls-cert the step channel sends "
             "every step's token ids (users' prompts) in clear")
    link.accept_all(f.distributed_init_timeout)
    failure = LeaderFailure(f.failure_exit_delay, _log)
    failure.link = link
    link.start(failure)
    model, engine_config = _load(ckpt, mesh, dtype, engine_config)
    tokenizer = find_tokenizer(ckpt, checkpoint_config(ckpt))
    engine = MultiHostEngine(model, engine_config, tokenizer, link=link,
                             step_timeout=f.step_timeout, compile_timeout=f.compile_timeout,
                             on_failure=failure)
    failure.engine = engine
    if f.warmup:
        engine.warmup()
    engine.start()
    devices = tuple(str(d) for d in mesh.devices.flat)
    # Warmed up and started already: the followers run warm-up's steps in lockstep.
    info = model_info(ckpt, dtype, f.hf or f.gguf or f.checkpoint)
    loaded = launch.LoadedModel([Slice(0, engine, layout.to_string(), devices)], tokenizer,
                                info, warmup=False, load_seconds=0.0)
    _log("model_loaded", model=loaded.info.name, dtype=dtype, slices=1,
         layout=layout.to_string(), processes=group.num_processes,
         num_pages=engine.num_pages, max_model_len=engine.max_model_len)
    return _serve_then_leave(group, loaded, options, link, failure)


def _serve_then_leave(group, loaded, options, link, failure) -> int:
    """Serve until SIGTERM; then stop the followers and leave the group together."""
    from meshserve.serving import launch

    try:
        code = launch.serve(loaded, options)
    except Exception as e:  # noqa: BLE001 - the followers must hear of it, not hang
        failure(f"the server failed: {type(e).__name__}: {e}")
        code = EXIT_GROUP_FAILED
    if failure.reason is not None:
        threading.Event().wait()  # the failure's exit timer ends the process
    link.stop("the leader shut down")
    return _leave(group, code)


def _leave(group, code: int) -> NoReturn:
    """jax.distributed.shutdown (a barrier with the other processes, bounded), then exit
    with `code` without interpreter finalization: with gRPC's and JAX's native threads
    still around, finalization aborted ("FATAL: exception not rethrown", SIGABRT) in
    about one clean stop in three here. Everything was already stopped and flushed."""
    from meshserve.meshes.distributed import shutdown

    try:
        shutdown(group.shutdown_timeout)
    except Exception as e:  # noqa: BLE001
        _log("distributed_shutdown_failed", error=f"{type(e).__name__}: {e}")
    logging.shutdown()  # flushes every handler
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _follower(group, ckpt, mesh, options, engine_config, dtype, secret, host, port,
              fingerprint) -> int:
    from meshserve.engine.multihost import MultiHostEngine, run_follower
    from meshserve.engine.step_channel import FollowerLink
    from meshserve.meshes.distributed import exit_now

    f = flags.FLAGS
    pid = group.process_id
    link = FollowerLink(host, port, secret, pid, group.num_processes, fingerprint,
                        f.heartbeat_timeout, tls=options.tls_cert is not None)
    link.connect(f.distributed_init_timeout)

    def lost(reason: str) -> None:
        exit_now(EXIT_GROUP_FAILED, f"process {pid}: {reason}")

    link.start(lost)
    model, engine_config = _load(ckpt, mesh, dtype, engine_config)
    engine = MultiHostEngine(model, engine_config)
    server, health_port = _health_server(options)
    signals: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        signals.append(signum)
        if len(signals) > 1:
            exit_now(128 + signum, f"process {pid}: second signal, exiting now")
        _log("signal", signal=signal.Signals(signum).name, process_id=pid,
             message="a follower runs until the leader stops the group; again to exit now")

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    _log("follower_started", process_id=pid, health_port=health_port,
         num_pages=engine.num_pages)
    try:
        code = run_follower(engine, link)
    except Exception as e:  # noqa: BLE001 - reported to the leader by run_follower
        exit_now(EXIT_GROUP_FAILED, f"process {pid}: step failed: {type(e).__name__}: {e}")
    server.stop(0)
    link.close()
    if code:
        exit_now(code, f"process {pid}: the leader stopped the group after a failure")
    _log("follower_stopped", process_id=pid)
    return _leave(group, 0)


def _health_server(options):
    """The standard gRPC health service on --host/--port (for liveness/readiness probes
    on every host); SERVING while this follower is in the group."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from meshserve.serving.service import SERVICE_NAME

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    host = f"[{options.host}]" if ":" in options.host else options.host
    address = f"{host}:{options.port}"
    if options.tls_cert is not None:
        creds = grpc.ssl_server_credentials([(options.tls_key, options.tls_cert)])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if not port:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    for service in ("", SERVICE_NAME):
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, port
