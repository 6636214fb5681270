"""Compiling an engine's programs before it serves (`Engine.warmup`, `precompile`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from meshserve.engine.batching import build_inputs
from meshserve.engine.scheduler import StepPlan


class WarmupMixin:
    """Runs empty steps of every bucket so that no request waits for a compile."""

    def warmup(self, progress: Callable[[int, int, float], None] | None = None) -> int:
        """Compile every program a step can run (`EngineConfig.programs`) now, so that no
        batch composition compiles later; returns the compile count."""
        programs = self.config.programs()
        start = time.monotonic()
        for i, (decode, t, s) in enumerate(programs, 1):
            self._run_empty(t, s, decode)
            if progress is not None:
                progress(i, len(programs), time.monotonic() - start)
        self._compiles_at_warmup = self.compiles
        return self.compiles

    def precompile(self, decode: bool, seqs: int, tokens: int | None = None) -> None:
        """Compile the program for the buckets holding `seqs` sequences / `tokens` tokens."""
        self._run_empty(*self.config.buckets(decode, seqs, tokens), decode)

    def _run_empty(self, tokens: int, seqs: int, decode: bool) -> None:
        plan = StepPlan(decode=decode, shards=[[] for _ in range(self.data_shards)])
        # Compiles are not steps: keep them out of the step-time histograms.
        observer, self.step_observer = self.step_observer, None
        try:
            self.execute(build_inputs(plan, self.config, self.pages_per_seq, 0, tokens, seqs),
                         decode)
        finally:
            self.step_observer = observer
