"""A request as the scheduler sees it."""

from __future__ import annotations

import dataclasses
import enum
import time

from meshserve.engine.detokenizer import IncrementalDetokenizer
from meshserve.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    PARKED = "parked"  # prefill-only, first token out: holds its pages, no batch slot


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: tuple[int, ...]  # EOS (unless ignore_eos) and stop_token_ids
    detokenizer: IncrementalDetokenizer
    priority: int = 0
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    order: int = 0  # admission order: the newest running sequence is preempted first
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    pages: list[int] = dataclasses.field(default_factory=list)
    shard: int | None = None
    slot: int | None = None
    status: Status = Status.WAITING
    fresh_slot: bool = False  # statistics of its slot must be reset on the next step
    first_scheduled: float | None = None
    first_token: float | None = None
    finish_reason: str | None = None
    sent_tokens: int = 0  # output tokens already streamed
    pending_logprobs: list = dataclasses.field(default_factory=list)
    # Prefix cache: the chain's root (from the cache salt), the digests of full pages
    # named so far (token ids only grow, so they stay valid across preemptions), how many
    # of its pages are in the cache, and prompt tokens found cached on first admission.
    cache_root: bytes = b""
    page_digests: list[bytes] = dataclasses.field(default_factory=list)
    pages_cached: int = 0
    cached_tokens: int | None = None
    # Disaggregation (engine/handoff.py): park after the first token instead of decoding;
    # or, on the decode side, the KVHandoff to copy into the pages once admitted.
    prefill_only: bool = False
    kv_import: object | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, index: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[index] if index < n else self.output_ids[index - n]

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token is left to feed."""
        return self.num_computed == self.num_tokens - 1 and bool(self.output_ids)

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def remaining_output(self) -> int:
        return self.params.max_tokens - len(self.output_ids)
