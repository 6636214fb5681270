"""Per-request sampling parameters, validated where they enter the engine."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


class InvalidRequestError(ValueError):
    """A request the engine will not run; the message says precisely why."""


MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 16
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """vLLM-compatible meanings: temperature 0 is greedy; top_k 0 and top_p 1 disable;
    penalties at their neutral values (1, 0, 0) disable."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int = 0  # how many top alternatives to return per token
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def validate(self, vocab_size: int, max_logprobs: int) -> SamplingParams:
        def finite(name: str) -> float:
            value = getattr(self, name)
            # The sampler computes in float32: a value past its range would become inf there.
            if (not isinstance(value, (int, float)) or not math.isfinite(value)
                    or abs(value) > FLOAT32_MAX):
                raise InvalidRequestError(
                    f"{name} must be a finite number in float32 range, got {value!r}")
            return float(value)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        if finite("temperature") < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < finite("top_p") <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables), got {self.top_k!r}")
        if not 0 <= finite("min_p") <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < finite("repetition_penalty") <= 10:
            raise InvalidRequestError(
                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= finite(name) <= 2:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be in [0, 2^63), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}"
            )
        for s in self.stop:
            if not s:
                raise InvalidRequestError("stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError(
                    f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters"
                )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})"
            )
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= max_logprobs:
            raise InvalidRequestError(
                f"logprobs must be in [0, {max_logprobs}], got {self.logprobs!r}"
            )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
