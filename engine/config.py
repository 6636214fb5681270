"""Engine configuration: page pool, batch limits and the shape buckets."""

from __future__ import annotations

import dataclasses


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= 2
    out.append(hi)
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Limits are per data shard (each shard has its own batch and page pool).

    num_pages None: the smaller of what `kv_memory_fraction` of the memory left after
    weights and the step reserve holds, and what `max_seqs` sequences of `max_model_len`
    tokens can ever use (see `engine.kv_pool.plan_num_pages`).
    """

    page_size: int = 16
    num_pages: int | None = None
    kv_memory_fraction: float = 0.9
    device_memory_bytes: int | None = None  # planner capacity; None: what the device reports
    max_kv_memory_bytes: int | None = 4 << 30
    max_seqs: int = 64
    max_step_tokens: int = 512
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    decode_steps: int = 8  # decode iterations per compiled loop before returning to host
    # Launch the next decode loop before reading this one's results (engine.Engine.step):
    # rows that stop in this loop are dropped when its results come.
    overlap_decode: bool = True
    max_logprobs: int = 8
    max_stop_ids: int = 8  # EOS ids + stop_token_ids checked on device
    max_waiting_requests: int = 1024
    max_waiting_tokens: int = 1 << 20
    # Smallest buckets: raising them trades padding for fewer compiled programs.
    min_token_bucket: int = 16
    min_seq_bucket: int = 1
    # Mixed (prefill) steps of a token bucket T use one of two batch buckets: this many
    # rows when as few sequences take part, else min(T, max_seqs) (see `programs`).
    mixed_small_seqs: int = 8
    seed: int = 0
    # Reuse the KV of cached full pages across requests with the same prefix and salt
    # (engine/prefix_cache.py); a freed cached page stays until its memory is needed.
    prefix_caching: bool = True
    # Page-hash events (stored, evicted) kept for routers (prefix_cache.CacheEventLog).
    cache_event_capacity: int = 1 << 14
    # One CPU device: keep the projection weights panel-packed for the C++ matmul kernel
    # (engine/packing.py), ~2x XLA:CPU's speed at decode batch sizes.
    pack_weights: bool = True
    # Run homogeneous decoder layers under one scanned body with stacked weights and one
    # stacked KV cache (engine/layer_scan.py, models/scan.py): compile time flat in depth.
    # Off by default (see docs/design.md "Scanned layers"); packing takes precedence.
    scan_layers: bool = False
    # Step watchdog (engine/watchdog.py; None: off): a step not finished in this many
    # seconds fails the engine, one that launches a first-seen shape (a compile) gets
    # compile_timeout. Multi-host leaders watch their steps themselves (engine/multihost.py).
    step_timeout: float | None = None
    compile_timeout: float = 900.0
    # A prefill-only request's pages are freed this long after it parked (or after its
    # last export) unless released first (engine/handoff.py): a lost handoff is bounded.
    park_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.max_seqs < 1 or self.max_step_tokens < 1:
            raise ValueError("page_size, max_seqs and max_step_tokens must be positive")
        if self.max_step_tokens < self.max_seqs:
            raise ValueError("max_step_tokens must be >= max_seqs (one decode token each)")
        if self.decode_steps < 1:
            raise ValueError("decode_steps must be >= 1")
        if not self.park_timeout_s > 0:
            raise ValueError("park_timeout_s must be > 0")
        if self.cache_event_capacity < 1:
            raise ValueError("cache_event_capacity must be >= 1")
        if (self.step_timeout is not None and self.step_timeout <= 0) or self.compile_timeout <= 0:
            raise ValueError("step_timeout and compile_timeout must be positive")

    def token_buckets(self) -> tuple[int, ...]:
        return _powers_of_two(
            min(self.min_token_bucket, self.max_step_tokens), self.max_step_tokens
        )

    def seq_buckets(self) -> tuple[int, ...]:
        """Batch buckets of decode calls."""
        return _powers_of_two(min(self.min_seq_bucket, self.max_seqs), self.max_seqs)

    def mixed_seq_buckets(self, tokens_bucket: int) -> tuple[int, ...]:
        """Batch buckets of a mixed step of `tokens_bucket` tokens. Every sequence in a
        mixed step brings at least one token, so min(T, max_seqs) rows always suffice; a
        small bucket beside it keeps a lone prefill from computing logits and sampling
        for up to max_seqs padded rows. (Attention and the KV writes stop at the real
        sequence count whatever the bucket: padded rows cost only their row of the LM
        head and the sampler.)"""
        full = min(tokens_bucket, self.max_seqs)
        return tuple(sorted({min(self.mixed_small_seqs, full), full}))

    def buckets(self, decode: bool, seqs: int, tokens: int | None = None) -> tuple[int, int]:
        """(tokens bucket, seqs bucket) of a step of `seqs` sequences and `tokens` tokens
        (a decode call: one token per row)."""
        if decode:
            s = bucket(max(1, seqs), self.seq_buckets())
            return s, s
        t = bucket(max(1, tokens or seqs), self.token_buckets())
        return t, bucket(max(1, seqs), self.mixed_seq_buckets(t))

    def programs(self) -> tuple[tuple[bool, int, int], ...]:
        """(decode, tokens bucket, seqs bucket) of every program a step can run: what
        `Engine.warmup` compiles. Mixed steps: each token bucket with its batch buckets;
        decode calls (decode_steps > 1): one per batch bucket, one token per row."""
        mixed = [(False, t, s) for t in self.token_buckets() for s in self.mixed_seq_buckets(t)]
        decode = [(True, s, s) for s in self.seq_buckets()] if self.decode_steps > 1 else []
        return tuple(mixed + decode)


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")
