"""What the engine hands back: streamed chunks, final usage, statistics."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob) alternatives, best first


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    """New tokens of one request since its previous chunk.

    `text` is UTF-8 safe: never part of a multi-byte character, and text that could be
    the start of a stop string is held back until it is known not to be one.
    The last chunk has `finish_reason` ("stop", "length" or "abort"), `usage` and timings.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    queue_ms: float | None = None  # arrival → first scheduled
    ttft_ms: float | None = None  # arrival → first token
    error: str | None = None  # set with finish_reason "abort" when the engine failed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    free_pages: int
    total_pages: int
    preemptions: int
    waiting_tokens: int
    running_tokens: int
    finished: int
    compiles: int
    chained_calls: int = 0  # decode calls launched before the previous call's results
    compiles_after_warmup: int = 0  # programs compiled after warmup() (should stay 0)
    # Prefix cache, in tokens over first admissions: prompt tokens looked up and found.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    cached_pages: int = 0  # pages in the prefix cache, held or not
    parked: int = 0  # prefill-only requests holding pages until exported (engine/handoff.py)
    # MoE models only (None / 0 for dense ones): token slots routed to each expert of each
    # MoE layer since the engine started ([moe_layers, experts], real tokens only), over
    # how many expert devices the experts are split, and per layer the busiest expert
    # device's slots ÷ the mean (engine.experts.hotspot_ratios).
    expert_tokens: np.ndarray | None = None
    expert_devices: int = 1
    expert_hotspot_ratios: np.ndarray | None = None
    # Tokens an expert refused for want of capacity: always 0, the MoE layers are dropless
    # (kept so dashboards written for capacity-factor servers read a true 0).
    moe_dropped_tokens: int = 0
