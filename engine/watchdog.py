"""The single-host step watchdog: a slice whose device call hangs is noticed and failed.

A device call that never returns (a hung kernel, a wedged driver) blocks the engine
thread in `jax.device_get` (or in the launch, once the device queue is full) forever:
without a watchdog its streams wait for their clients' deadlines and the slice stays
"healthy", so the router keeps sending it work. `EngineConfig.step_timeout` turns this
watchdog on: each `Engine.step()` runs in a watched window, and a window still open
`step_timeout` seconds after it began fails the engine.

A step that launches a shape not seen before (in warm-up or an earlier step) compiles it
(or loads it from the persistent cache), which takes far longer than a step: its window
gets `compile_timeout` from that launch on, the way multi-host groups distinguish
first-seen shapes (engine/multihost.py).

Failing never touches the scheduler, which the (blocked) engine thread owns: the
watchdog marks the engine failed (`healthy` turns False, `add_request` raises
EngineDeadError) and ends every live stream with a final "abort" chunk carrying the
error, after the tokens already sent. If the blocked call ever returns, the engine
thread sees the failure at the end of its step and stops (its late chunks go to streams
that already ended, so no token reaches a client twice).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# (decode, tokens bucket, seqs bucket): the program a launch runs.
ShapeKey = tuple[bool, int, int]


class StepWatchdog:
    """Watches one engine's steps from a thread of its own (started with the engine)."""

    def __init__(self, engine, step_timeout: float, compile_timeout: float):
        if step_timeout <= 0 or compile_timeout <= 0:
            raise ValueError("step_timeout and compile_timeout must be positive")
        self.engine = engine
        self.step_timeout = step_timeout
        self.compile_timeout = compile_timeout
        # Test hook only (fault injection): called on the engine thread before each device
        # launch of a watched step with the launch's ShapeKey; a test makes it block to
        # stand for a hung device call. Nothing outside tests sets it; no request can.
        self.fault: Callable[[ShapeKey], None] | None = None
        self.failure: str | None = None
        self._cond = threading.Condition()
        self._shapes: set[ShapeKey] = set()
        self._began: float | None = None
        self._deadline: float | None = None
        self._limit = step_timeout
        self._stopped = False
        # When the watching thread wakes by itself (a deadline it sleeps to, inf while no
        # window is open): a window is signalled only if its deadline comes earlier, so
        # steps do not wake the thread one by one.
        self._wakes_at = float("inf")
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="meshserve-step-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def watched(self, step: Callable[[], bool]) -> bool:
        """Run one engine step in a watched window. Raises the engine's EngineDeadError
        when the watchdog failed the engine meanwhile (the step's results are stale)."""
        from meshserve.engine.engine import EngineDeadError

        with self._cond:
            if self.failure is not None:
                raise EngineDeadError(self.failure)
            self._began = time.monotonic()
            self._limit = self.step_timeout
            self._deadline = self._began + self.step_timeout
            if self._deadline < self._wakes_at:  # else it wakes in time by itself
                self._cond.notify_all()
        try:
            return step()
        finally:
            with self._cond:
                self._deadline = self._began = None
                failure = self.failure
            if failure is not None:
                raise EngineDeadError(failure)

    def launching(self, key: ShapeKey) -> None:
        """Called before each device launch (warm-up included): a first-seen shape
        compiles, so the open window's bound becomes compile_timeout from now."""
        with self._cond:
            if key not in self._shapes:
                self._shapes.add(key)
                if self._deadline is not None:
                    self._limit = self.compile_timeout
                    self._deadline = max(self._deadline, time.monotonic() + self.compile_timeout)
            active = self._deadline is not None
        if active and self.fault is not None:
            self.fault(key)

    def _watch(self) -> None:
        with self._cond:
            while not self._stopped and self.failure is None:
                if self._deadline is None:
                    self._wakes_at = float("inf")
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._wakes_at = self._deadline
                    self._cond.wait(left)
                    continue
                elapsed = time.monotonic() - self._began
                self.failure = (f"the device step did not finish within {self._limit:g}s "
                                f"(open {elapsed:.2f}s; a hung device call): the slice "
                                "left rotation")
                # Under the lock: the engine thread cannot finish its step (and see a
                # half-failed engine) until every stream has its final chunk.
                end_streams(self.engine, self.failure)


def end_streams(engine, reason: str) -> None:
    """Fail `engine` from another thread without touching its scheduler: unhealthy from
    now on, every live request's stream ends with an "abort" chunk carrying `reason`
    (`Engine._fail_all`'s path for callers that do not own the scheduler)."""
    with engine._lock:
        engine.error = reason
        engine._lock.notify_all()
    engine._fail_all(reason, reason="abort")
