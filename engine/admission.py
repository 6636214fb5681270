"""What a prompt must satisfy before it is queued: ids in the vocabulary, a length the
model and the KV pool can hold."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

from meshserve.engine.sampling_params import InvalidRequestError, SamplingParams


def check_prompt(prompt_ids: Seq[int], params: SamplingParams, vocab_size: int,
                 max_model_len: int, pages_for: Callable[[int], int], num_pages: int
                 ) -> list[int]:
    """The prompt as ints, or InvalidRequestError naming the first problem."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise InvalidRequestError("the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    total = len(prompt) + params.max_tokens
    if total > max_model_len:
        raise InvalidRequestError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} "
            f"exceeds the maximum model length {max_model_len}")
    if pages_for(total) > num_pages:
        raise InvalidRequestError(
            f"the request needs {pages_for(total)} KV pages; the cache has {num_pages}")
    return prompt
