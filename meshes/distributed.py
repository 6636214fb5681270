"""Multi-process start-up: the one place that calls `jax.distributed.initialize`.

Every process runs the same command with its own process id; process 0 hosts JAX's
coordination service and is the serving leader. After `initialize` returns,
`jax.devices()` lists the devices of every process and one mesh can span them.

JAX 0.10.2 handles a bad start-up badly (measured, see /work/shared/notes/jax-facts.md):
an unreachable coordinator or a missing process ends in a C++ `LOG(FATAL)` abort after
about twice `initialization_timeout`, with an unhelpful message, and a process that
states a different `num_processes` than the coordinator is accepted silently. So:

- a non-coordinator first checks, with plain TCP connects, that the coordinator is
  reachable, and fails with a clear message when it is not within the timeout;
- a watchdog thread ends the process (exit code `EXIT_STARTUP`) with a message naming
  the likely causes if `initialize` has not returned within `init_timeout`; JAX's own
  timeout is set later than ours so that it never fires first;
- `num_processes` and the configuration of every process are compared over the step
  channel's handshake (engine/step_channel.py) once everyone is connected.

On CPU the collectives across processes use gloo (set here, before any backend exists),
so multi-process meshes run on a laptop with simulated devices.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping

import jax

ENV_COORDINATOR = "MESHSERVE_COORDINATOR"
ENV_NUM_PROCESSES = "MESHSERVE_NUM_PROCESSES"
ENV_PROCESS_ID = "MESHSERVE_PROCESS_ID"
# Exit codes: a misconfigured start-up (like the CLI's other usage errors), and a group
# that failed after start-up (a peer died or hung): a supervisor restarts the group.
EXIT_STARTUP = 2
EXIT_GROUP_FAILED = 3


class DistributedError(RuntimeError):
    """Multi-process start-up failed; the message says what to fix."""


def exit_now(code: int, message: str) -> None:
    """Print `message` and end the process at once, from any thread.

    The only reliable way out when another thread may be blocked in a collective whose
    peer is gone (it never returns) or inside JAX's runtime: no atexit hooks run.
    """
    try:
        sys.stdout.flush()
        print(f"meshserve: error: {message}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port); raises DistributedError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"coordinator address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the group. coordinator None: auto-detect (Cloud TPU)."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    init_timeout: float = 300.0  # start-up: every process must have joined by then
    heartbeat_timeout: float = 100.0  # JAX's own liveness check (a backstop, see above)
    shutdown_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.coordinator is not None:
            split_address(self.coordinator)
            if self.num_processes is None or self.process_id is None:
                raise DistributedError(
                    "--coordinator needs --num-processes and --process-id (or "
                    f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})"
                )
        if self.num_processes is not None and self.num_processes < 1:
            raise DistributedError(f"--num-processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.num_processes is not None and not (
            0 <= self.process_id < self.num_processes
        ):
            raise DistributedError(
                f"--process-id must be in [0, {self.num_processes}) for --num-processes "
                f"{self.num_processes}, got {self.process_id}"
            )
        for name in ("init_timeout", "heartbeat_timeout", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise DistributedError(f"{name} must be positive")

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @property
    def coordinator_host(self) -> str:
        return split_address(self.coordinator)[0] if self.coordinator else ""


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not an integer") from None


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
    tpu_auto: bool = True,
    **timeouts: float,
) -> DistributedConfig | None:
    """Flags first, then MESHSERVE_* environment variables; None means one process.

    With neither, on a Cloud TPU VM (and tpu_auto) JAX detects the pod slice itself.
    """
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(
        env, ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(env, ENV_PROCESS_ID)
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise DistributedError(
                f"--num-processes/--process-id need --coordinator HOST:PORT (or {ENV_COORDINATOR})"
            )
        if tpu_auto and _on_cloud_tpu():
            return DistributedConfig(None, None, None, **timeouts)
        return None
    return DistributedConfig(coordinator, num_processes, process_id, **timeouts)


def _on_cloud_tpu() -> bool:
    try:
        from jax._src import cloud_tpu_init

        return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
    except (ImportError, AttributeError):
        return False


def wait_reachable(host: str, port: int, timeout: float, what: str = "the coordinator") -> None:
    """Retry TCP connects to host:port until one succeeds; DistributedError after timeout."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DistributedError(
                f"cannot reach {what} at {host}:{port} within {timeout:.0f}s ({last}): is "
                "process 0 running, and do --coordinator and the firewall allow it?"
            )
        try:
            with socket.create_connection((host, port), timeout=min(1.0, left)):
                return
        except OSError as e:
            last = e
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def initialize(cfg: DistributedConfig) -> DistributedConfig:
    """Join the group (before anything touches a JAX backend); returns the config with
    the detected process id and count filled in.

    Fails with DistributedError, or (when JAX itself hangs) ends the process with
    EXIT_STARTUP, in about `cfg.init_timeout` seconds at most.
    """
    if jax.distributed.is_initialized():
        raise DistributedError("jax.distributed is already initialised in this process")
    # Only the CPU backend reads this; it must be set before that backend is created.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    t0 = time.monotonic()
    bind = None
    if cfg.coordinator is not None:
        host, port = split_address(cfg.coordinator)
        if is_loopback(host):
            bind = cfg.coordinator  # JAX's default is every interface ([::]:port)
        if not cfg.is_leader:
            wait_reachable(host, port, cfg.init_timeout)
    left = max(1.0, cfg.init_timeout - (time.monotonic() - t0))
    where = cfg.coordinator or "the auto-detected coordinator"
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(left):
            exit_now(
                EXIT_STARTUP,
                f"jax.distributed did not assemble {cfg.num_processes or 'all'} processes at "
                f"{where} within {cfg.init_timeout:.0f}s: start every process with the same "
                "--coordinator and --num-processes (and a distinct --process-id), and check "
                "that all of them can reach the coordinator",
            )

    threading.Thread(target=watchdog, name="meshserve-init-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            # Later than our watchdog: JAX's own expiry aborts with a cryptic message.
            initialization_timeout=int(left) + 30,
            heartbeat_timeout_seconds=max(1, int(cfg.heartbeat_timeout)),
            shutdown_timeout_seconds=max(1, int(cfg.shutdown_timeout)),
            coordinator_bind_address=bind,
        )
    except (RuntimeError, ValueError, TypeError) as e:
        hint = ""
        if "before" in str(e) and "backend" in str(e).lower():
            hint = " (jax.distributed must start before anything touches a JAX backend)"
        raise DistributedError(f"jax.distributed.initialize failed{hint}: {e}") from None
    finally:
        done.set()
    # Not jax.process_count(): that would start the backends before --cpu-devices is set.
    coordinator, num_processes, process_id = _detected()
    return dataclasses.replace(
        cfg,
        coordinator=cfg.coordinator or coordinator,
        num_processes=cfg.num_processes if cfg.num_processes is not None else num_processes,
        process_id=cfg.process_id if cfg.process_id is not None else process_id,
    )


def _detected() -> tuple[str | None, int | None, int | None]:
    """What jax.distributed settled on (auto-detection fills these in on Cloud TPU)."""
    try:
        from jax._src import distributed

        state = distributed.global_state
        return state.coordinator_address, state.num_processes, state.process_id
    except (ImportError, AttributeError):
        return None, None, None


def shutdown(timeout: float) -> None:
    """Leave the group cleanly (a barrier with every other process), or exit at once with
    EXIT_GROUP_FAILED when that takes longer than `timeout`."""
    if not jax.distributed.is_initialized():
        return
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(timeout):
            exit_now(EXIT_GROUP_FAILED, f"jax.distributed.shutdown took over {timeout:.0f}s")

    threading.Thread(target=watchdog, name="meshserve-shutdown-watchdog", daemon=True).start()
    try:
        jax.distributed.shutdown()
    finally:
        done.set()
