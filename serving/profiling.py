"""On-demand device profiling: a jax.profiler trace between a start and a stop request.

Off unless `--profile-dir` is given, since it writes files; the endpoints that drive it
(HTTP `POST /start_profile` and `/stop_profile`, the StartProfile/StopProfile RPCs)
need the bearer token when one is set. Each trace goes to a folder of its own,
`<profile-dir>/<time>-<suffix>/plugins/profile/<run>/` (jax names `<run>` by the second,
so two traces within one second would share it; TensorBoard's `--logdir <profile-dir>`
finds every trace; the
`.trace.json.gz` beside the `.xplane.pb` opens in Perfetto), and shows every step's
programs, kernels and collectives on each device.
"""

from __future__ import annotations

import glob
import os
import tempfile
import threading
import time

from meshserve.serving import logs


class ProfilerBusyError(Exception):
    """A trace is already running (start) or none is (stop)."""


class Profiler:
    def __init__(self, profile_dir: str):
        self.profile_dir = os.path.abspath(profile_dir)
        self._lock = threading.Lock()
        self._started: float | None = None
        self._trace_dir: str | None = None

    @property
    def running(self) -> bool:
        return self._started is not None

    def start(self) -> str:
        """Begin a trace; returns the folder it will be written under."""
        import jax

        with self._lock:
            if self._started is not None:
                raise ProfilerBusyError("a profile is already running: stop it first")
            os.makedirs(self.profile_dir, mode=0o700, exist_ok=True)
            trace_dir = tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"),
                                         dir=self.profile_dir)
            jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
            self._started, self._trace_dir = time.monotonic(), trace_dir
        logs.event("profile_started", profile_dir=self.profile_dir)
        return self.profile_dir

    def stop(self) -> tuple[float, list[str]]:
        """End the trace and write it; returns (seconds traced, files written)."""
        import jax

        with self._lock:
            if self._started is None:
                raise ProfilerBusyError("no profile is running: start one first")
            jax.profiler.stop_trace()
            seconds, self._started = time.monotonic() - self._started, None
            trace_dir, self._trace_dir = self._trace_dir, None
        files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*")))
        logs.event("profile_stopped", profile_dir=self.profile_dir, seconds=round(seconds, 3),
                   files=files)
        return seconds, files
