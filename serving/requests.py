"""Turning GenerateRequest messages into engine requests, and engine chunks into replies.

Every check that can fail on client input happens here, before a slice is chosen, so a
bad request never touches an engine; the engine checks again (InvalidRequestError) and
those errors are mapped to INVALID_ARGUMENT as well.
"""

from __future__ import annotations

import dataclasses
import re

from meshserve.engine.outputs import StreamChunk
from meshserve.engine.sampling_params import InvalidRequestError, SamplingParams
from meshserve.models.chat import ChatTemplateError
from meshserve.serving.proto import meshserve_pb2 as pb

MAX_REQUEST_ID_CHARS = 128
MAX_CACHE_SALT_BYTES = 256
# Printable ASCII without spaces: request ids end up in logs as they are.
_REQUEST_ID = re.compile(rf"[!-~]{{1,{MAX_REQUEST_ID_CHARS}}}")

# GenerateRequest fields copied into SamplingParams when the client set them.
_OPTIONAL_PARAMS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)


class NoTokenizerError(Exception):
    """A text prompt (or Tokenize/Detokenize) for a model without a tokenizer."""


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    """What requests are checked against; the same for every slice."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int
    max_request_bytes: int
    default_max_tokens: int
    # Clients may only lower their priority below the default (larger numbers wait
    # longer); an operator who trusts every caller can allow more with --min-priority.
    min_priority: int = 0


MAX_PRIORITY = 1_000_000


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None  # None: the client did not ask for logprobs
    priority: int = 0
    # Requests share cached KV pages only with requests of the same salt (tenants).
    cache_salt: str = ""

    @property
    def cost_tokens(self) -> int:
        """Tokens of KV cache the request may need: what the router balances."""
        return len(self.prompt_ids) + self.params.max_tokens


def check_request_id(request_id: str) -> None:
    if request_id and not _REQUEST_ID.fullmatch(request_id):
        raise InvalidRequestError(
            f"request_id must be 1-{MAX_REQUEST_ID_CHARS} printable ASCII characters "
            "without spaces"
        )


def prepare(request: pb.GenerateRequest, tokenizer, limits: ModelLimits,
            request_id: str) -> PreparedRequest:
    """Validate a request and build the engine's inputs; raises InvalidRequestError with
    a message meant for the client, NoTokenizerError or NoChatTemplateError."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequestError(
            f"request is {size} bytes; the limit is {limits.max_request_bytes} "
            "(--max-request-bytes)"
        )
    check_request_id(request.request_id)
    given = [name for name, present in (("prompt", request.HasField("prompt")),
                                        ("token_ids", len(request.token_ids) > 0),
                                        ("messages", len(request.messages) > 0)) if present]
    if len(given) != 1:
        raise InvalidRequestError(
            "give exactly one of prompt, token_ids or messages"
            + (f" ({' and '.join(given)} were set)" if given else " (none was set)")
        )
    if given[0] == "prompt":
        if not request.prompt:
            raise InvalidRequestError("prompt is empty")
        if tokenizer is None:
            raise NoTokenizerError("the model has no tokenizer; send token_ids instead of prompt")
        prompt_ids = tokenizer.encode(request.prompt)
        if not prompt_ids:
            raise InvalidRequestError("prompt encodes to no tokens")
    elif given[0] == "messages":
        if tokenizer is None:
            raise NoTokenizerError("the model has no tokenizer; send token_ids instead of "
                                   "messages")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            prompt_ids = tokenizer.encode_chat(messages)
        except ChatTemplateError as e:
            raise InvalidRequestError(str(e)) from None
        if not prompt_ids:
            raise InvalidRequestError("messages render to no tokens")
    else:
        prompt_ids = list(request.token_ids)
        bad = [t for t in prompt_ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token_ids {bad[:8]} are outside the vocabulary [0, {limits.vocab_size})"
            )
    if len(request.cache_salt.encode()) > MAX_CACHE_SALT_BYTES:
        raise InvalidRequestError(f"cache_salt must be at most {MAX_CACHE_SALT_BYTES} bytes")

    room = limits.max_model_len - len(prompt_ids)
    if request.HasField("max_tokens"):
        max_tokens = request.max_tokens
        if max_tokens >= 1 and max_tokens > room:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model length {limits.max_model_len}"
            )
    else:
        if room < 1:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) leaves no room to generate within the "
                f"model length {limits.max_model_len}"
            )
        max_tokens = min(limits.default_max_tokens, room)

    kwargs = {name: getattr(request, name) for name in _OPTIONAL_PARAMS if request.HasField(name)}
    logprobs = request.logprobs if request.HasField("logprobs") else None
    params = SamplingParams(
        max_tokens=max_tokens,
        stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids),
        logprobs=0 if logprobs is None else logprobs,
        ignore_eos=request.ignore_eos,
        **kwargs,
    )
    params.validate(limits.vocab_size, limits.max_logprobs)
    if not limits.min_priority <= request.priority <= MAX_PRIORITY:
        raise InvalidRequestError(
            f"priority {request.priority} is outside [{limits.min_priority}, {MAX_PRIORITY}]: "
            "requests may wait behind others (larger values) but not jump the queue "
            "(the server's --min-priority)")
    return PreparedRequest(request_id, prompt_ids, params, logprobs, request.priority,
                           request.cache_salt)


def to_response(chunk: StreamChunk, prepared: PreparedRequest) -> pb.GenerateResponse:
    """One streamed message; the last carries finish_reason and usage (timings and the
    slice are filled in by the caller, who knows them)."""
    response = pb.GenerateResponse(
        request_id=prepared.request_id, text=chunk.text, token_ids=chunk.token_ids
    )
    if prepared.logprobs is not None:
        n = prepared.logprobs
        for lp in chunk.logprobs:
            response.logprobs.add(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top[:n]],
            )
    if chunk.finish_reason is not None:
        response.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            response.usage.prompt_tokens = chunk.usage.prompt_tokens
            response.usage.completion_tokens = chunk.usage.completion_tokens
            response.usage.cached_tokens = chunk.usage.cached_tokens
        response.timings.queue_ms = chunk.queue_ms or 0.0
        response.timings.ttft_ms = chunk.ttft_ms or 0.0
    return response
