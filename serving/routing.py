"""Cache-aware routing: the router's copy of each slice's prefix cache, and the policy
that weighs a slice's cached prefix against its load.

Each engine logs page-hash events (a page joined its prefix cache, or left it:
engine/prefix_cache.CacheEventLog). The router keeps one `PrefixIndex` per slice, fed
from that log whenever it routes, and estimates how many of a request's prompt tokens a
slice would find cached: the leading run of the request's page digests the slice
holds. While the slices' loads are balanced, the slice with the best score `matched
tokens - load_weight * load tokens` wins; once the most loaded slice carries more than
`balance_abs_tokens` more than the least loaded one *and* more than `balance_rel` times
its load, load alone decides (locality-only routing makes hotspots). The estimate can be
stale (pages evicted since, or not yet published): the service counts what each request
really found.
"""

from __future__ import annotations

import dataclasses

from meshserve.engine.prefix_cache import STORED, page_digests, reusable_tokens
from meshserve.engine.sampling_params import SamplingParams

# Why a slice was chosen (the label of meshserve_routing_decisions).
ONLY_HEALTHY, LOAD, CACHE = "only_healthy", "load", "cache"
REASONS = (CACHE, LOAD, ONLY_HEALTHY)


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """cache_aware False: least load only (queued + running + routed-but-unfinished
    tokens, then most free KV pages), as without a prefix cache."""

    cache_aware: bool = True
    balance_abs_tokens: int = 4096
    balance_rel: float = 1.5
    load_weight: float = 0.25

    def __post_init__(self) -> None:
        if self.balance_abs_tokens < 0 or self.balance_rel < 1 or self.load_weight < 0:
            raise ValueError("routing needs balance_abs_tokens >= 0, balance_rel >= 1 and "
                             "load_weight >= 0")


class PrefixIndex:
    """Which page digests one slice's engine holds in its prefix cache (a page cached in
    several data shards counts once per shard), kept up to date from its event log."""

    def __init__(self, engine):
        self.engine = engine
        self._log = engine.cache_events()
        if self._log is None:
            raise ValueError("the engine keeps no prefix cache to index")
        self._cursor = 0
        self._counts: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def update(self) -> None:
        batch = self._log.read(self._cursor)
        if batch.lost:  # fell behind the bounded log: start over from what it still has
            self._counts.clear()
        counts = self._counts
        for kind, digest in batch.events:
            if kind == STORED:
                counts[digest] = counts.get(digest, 0) + 1
            elif counts.get(digest, 0) > 1:
                counts[digest] -= 1
            else:
                counts.pop(digest, None)
        self._cursor = batch.cursor

    def matched_pages(self, digests: list[bytes]) -> int:
        n = 0
        for digest in digests:
            if digest not in self._counts:
                break
            n += 1
        return n


def request_digests(prompt_ids: list[int], params: SamplingParams, cache_salt: str,
                    page_size: int) -> list[bytes]:
    """The digests of the prompt's pages the engine could serve from its cache."""
    usable = reusable_tokens(len(prompt_ids), len(prompt_ids), params)
    return page_digests(prompt_ids, page_size, cache_salt.encode(), usable // page_size)


def skewed(loads: list[int], cfg: RoutingConfig) -> bool:
    """Load beyond both thresholds: the busiest slice carries more than
    balance_abs_tokens more than the idlest and more than balance_rel times its load."""
    hi, lo = max(loads), min(loads)
    return hi - lo > cfg.balance_abs_tokens and hi > cfg.balance_rel * lo


def cache_score(matched_tokens: int, load_tokens: int, cfg: RoutingConfig) -> float:
    return matched_tokens - cfg.load_weight * load_tokens
