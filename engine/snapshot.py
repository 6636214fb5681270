"""What other threads may know of the scheduler: a snapshot the engine thread publishes.

The scheduler's lists and page allocators belong to the thread that runs `step()` (the
engine thread): nothing else reads or changes them. `add_request` (admission limits) and
`stats()` run on other threads, so after each change of the scheduler's state the owner
computes a `SchedulerSnapshot` and publishes it under the engine's lock; readers take the
latest one, plus the inbox they share with the owner under that same lock.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from meshserve.engine.experts import routing_stats
from meshserve.engine.outputs import EngineStats
from meshserve.engine.scheduler import Scheduler


@dataclasses.dataclass(frozen=True)
class SchedulerSnapshot:
    running: int = 0
    waiting: int = 0
    running_tokens: int = 0
    waiting_tokens: int = 0
    free_pages: int = 0
    preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    cached_pages: int = 0
    expert_tokens: np.ndarray | None = None  # a copy: the owner adds to its own in place


def take_snapshot(s: Scheduler, expert_tokens: np.ndarray) -> SchedulerSnapshot:
    """Called by the owner of `s` only."""
    running = [q for r in s.running for q in r]
    return SchedulerSnapshot(
        running=len(running),
        waiting=len(s.waiting),
        running_tokens=sum(q.num_tokens for q in running),
        waiting_tokens=sum(q.num_tokens for q in s.waiting),
        free_pages=s.free_pages(),
        preemptions=s.preemptions,
        prefix_queries=s.prefix_queries,
        prefix_hits=s.prefix_hits,
        cached_pages=s.cached_pages(),
        expert_tokens=expert_tokens.copy(),
    )


def engine_stats(snap: SchedulerSnapshot, inbox: int, inbox_tokens: int, *, total_pages: int,
                 expert_devices: int, **counters: int) -> EngineStats:
    """EngineStats from a snapshot and the requests still in the inbox (queued, not yet
    handed to the scheduler: they count as waiting)."""
    return EngineStats(
        running=snap.running,
        waiting=snap.waiting + inbox,
        free_pages=snap.free_pages,
        total_pages=total_pages,
        preemptions=snap.preemptions,
        waiting_tokens=snap.waiting_tokens + inbox_tokens,
        running_tokens=snap.running_tokens,
        prefix_cache_queries=snap.prefix_queries,
        prefix_cache_hits=snap.prefix_hits,
        cached_pages=snap.cached_pages,
        **counters,
        **routing_stats(snap.expert_tokens, expert_devices),
    )
