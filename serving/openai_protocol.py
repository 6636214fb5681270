"""OpenAI's JSON (Completions and Chat Completions, with vLLM's extra fields) to and from
the service's own messages.

A request body becomes a `GenerateRequest`, the message gRPC clients send, so it takes
the one validation and sampling path (`requests.prepare`, `SamplingParams`); this module
checks only JSON types and the fields the server cannot honour (`n` > 1, `echo`,
`best_of`, `logit_bias`, ...: a 400 naming the field). Unknown fields are returned to the
caller to log and are otherwise ignored, as vLLM does, so clients that send extras keep
working. Engine chunks become OpenAI's response objects and SSE chunks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

from meshserve.engine.outputs import StreamChunk, TokenLogprob, Usage
from meshserve.serving import core
from meshserve.serving.proto import meshserve_pb2 as pb

INT32 = (-(2**31), 2**31 - 1)
UINT64 = (0, 2**64 - 1)
# OpenAI's default for /v1/completions (chat has none: up to the server's default).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
STATUS_OF = {core.INVALID: 400, core.PRECONDITION: 400, core.OVERLOADED: 429,
             core.UNAVAILABLE: 503, core.EXISTS: 409}
_TYPE_OF = {400: "invalid_request_error", 401: "authentication_error",
            404: "invalid_request_error", 409: "invalid_request_error",
            413: "invalid_request_error", 429: "rate_limit_error"}

# Fields read (or deliberately accepted and ignored) by both endpoints.
_SAMPLING = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty")
_COMMON = {"model", "max_tokens", "stream", "stream_options", "stop", "stop_token_ids",
           "seed", "top_k", "ignore_eos", "min_tokens", "n", "best_of", "logit_bias", "user",
           "priority", "cache_salt", "return_token_ids", "return_tokens_as_token_ids",
           "skip_special_tokens", "include_stop_str_in_output", "prompt_logprobs",
           "spaces_between_special_tokens", "logprobs", *_SAMPLING}
_COMPLETION = _COMMON | {"prompt", "echo", "suffix"}
_CHAT = _COMMON | {"messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
                   "parallel_tool_calls", "response_format", "add_generation_prompt",
                   "continue_final_message", "echo", "chat_template", "chat_template_kwargs"}
# GenerateRequest field → the OpenAI field a validation message is about.
_PARAM_OF = {"token_ids": "prompt", "prompt": "prompt", "max_tokens": "max_tokens",
             "stop_token_ids": "stop_token_ids", "stop": "stop", "seed": "seed",
             "top_k": "top_k", "logprobs": "logprobs", "cache_salt": "cache_salt",
             "request_id": "request_id", "messages": "messages", **{n: n for n in _SAMPLING}}


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = _TYPE_OF.get(self.status, "server_error" if self.status >= 500 else
                            "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


def from_rejected(e: core.Rejected, chat: bool) -> ApiError:
    """The shared path's refusal as OpenAI reports it (param guessed from the message,
    whose first word names the field, e.g. "temperature must be >= 0")."""
    first = e.message.split(" ", 1)[0]
    param = _PARAM_OF.get(first)
    if "+ max_tokens" in e.message:  # prompt + max_tokens beyond the model length
        param = "max_tokens"
    if param == "prompt" and chat:
        param = "messages"
    if chat and param == "logprobs":
        param = "top_logprobs"
    return ApiError(STATUS_OF[e.status], e.message, param, e.reason)


@dataclasses.dataclass
class ApiRequest:
    chat: bool
    request: pb.GenerateRequest
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token; None: no logprobs asked for
    return_token_ids: bool
    tokens_as_ids: bool
    unknown: list[str]


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param, "invalid")


def _short(value: int) -> str:
    text = str(value)  # JSON integers are unbounded: echo a bounded part
    return text if len(text) <= 40 else f"{text[:40]}... ({len(text)} digits)"


def _number(body: Mapping, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"{name} must be a number, got {json.dumps(value)[:40]}")
    try:
        return float(value)
    except OverflowError:  # a JSON integer beyond any double
        raise _bad(name, f"{name} is out of range: {_short(value)}") from None


def _integer(body: Mapping, name: str, bounds: tuple[int, int] = INT32) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"{name} must be an integer, got {json.dumps(value)[:40]}")
    if not bounds[0] <= value <= bounds[1]:
        raise _bad(name, f"{name} is out of range: {_short(value)}")
    return value


def _flag(body: Mapping, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"{name} must be true or false, got {json.dumps(value)[:40]}")
    return value


def _int_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise _bad(name, f"{name} must be a list of integers")
    out = [t for t in value if not INT32[0] <= t <= INT32[1]]
    if out:
        raise _bad(name, f"{name} {out[:8]} are out of range")
    return value


def _refuse_unless(body: Mapping, name: str, ok: Callable[[Any], bool], why: str) -> None:
    """A field the server understands but cannot honour with this value: a 400 naming it."""
    if name in body and body[name] is not None and not ok(body[name]):
        raise _bad(name, f"{name}={json.dumps(body[name])[:60]} is not supported: {why}")


def _common(body: Mapping, request: pb.GenerateRequest) -> tuple[bool, bool]:
    """The fields both endpoints share; returns (stream, include_usage)."""
    _refuse_unless(body, "n", lambda v: v == 1, "one choice per request (send n requests)")
    _refuse_unless(body, "best_of", lambda v: v == 1, "one sequence per request")
    _refuse_unless(body, "logit_bias", lambda v: v == {}, "logit_bias is not implemented")
    _refuse_unless(body, "min_tokens", lambda v: v == 0, "min_tokens is not implemented")
    _refuse_unless(body, "prompt_logprobs", lambda v: False, "prompt logprobs are not computed")
    _refuse_unless(body, "include_stop_str_in_output", lambda v: v is False,
                   "stop strings are never included in the output")
    _refuse_unless(body, "skip_special_tokens", lambda v: v is True,
                   "special tokens are always skipped in the text")
    for name in _SAMPLING:
        value = _number(body, name)
        if value is not None:
            setattr(request, name, value)
    top_k = _integer(body, "top_k")
    if top_k is not None:
        request.top_k = 0 if top_k == -1 else top_k  # vLLM's "-1 disables"
    seed = _integer(body, "seed", UINT64)
    if seed is not None:
        request.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop", "stop must be a string or a list of strings")
        request.stop.extend(stop)
    if body.get("stop_token_ids") is not None:
        request.stop_token_ids.extend(_int_list(body["stop_token_ids"], "stop_token_ids"))
    request.ignore_eos = _flag(body, "ignore_eos")
    priority = _integer(body, "priority")
    if priority is not None:
        request.priority = priority
    salt = body.get("cache_salt")
    if salt is not None:
        if not isinstance(salt, str):
            raise _bad("cache_salt", "cache_salt must be a string")
        request.cache_salt = salt
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", "stream_options needs stream=true")
        if not isinstance(options, dict):
            raise _bad("stream_options", "stream_options must be an object")
        include_usage = _flag(options, "include_usage")
    return stream, include_usage


def parse_completion(body: Mapping) -> ApiRequest:
    """A /v1/completions body → ApiRequest (raises ApiError)."""
    request = pb.GenerateRequest()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise _bad("prompt", f"one prompt per request, got {len(prompt)}: send them as "
                   "separate requests")
    elif isinstance(prompt, list):
        if not prompt:
            raise _bad("prompt", "prompt is empty")
        request.token_ids.extend(_int_list(prompt, "prompt"))
    else:
        raise _bad("prompt", "prompt must be a string, a list of token ids, or a list of one "
                   "of those")
    _refuse_unless(body, "echo", lambda v: v is False, "the prompt is not echoed")
    _refuse_unless(body, "suffix", lambda v: False, "suffix (insertion) is not implemented")
    stream, include_usage = _common(body, request)
    max_tokens = _integer(body, "max_tokens")
    request.max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    logprobs = _integer(body, "logprobs")
    if logprobs is not None:
        request.logprobs = logprobs
    return ApiRequest(False, request, stream, include_usage, logprobs,
                      _flag(body, "return_token_ids"), _flag(body, "return_tokens_as_token_ids"),
                      sorted(set(body) - _COMPLETION))


def _content(message: Mapping, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad("messages", f"messages[{i}].content: only text parts are "
                           f"supported, got {json.dumps(kind)[:40]}")
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins a message's text parts
    raise _bad("messages", f"messages[{i}].content must be a string or a list of parts")


def parse_chat(body: Mapping) -> ApiRequest:
    """A /v1/chat/completions body → ApiRequest (raises ApiError)."""
    request = pb.GenerateRequest()
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad("messages", f"messages[{i}] must be an object with a string role")
        if m.get("tool_calls"):
            raise _bad("messages", f"messages[{i}].tool_calls: tool calls are not supported")
        request.messages.add(role=m["role"], content=_content(m, i))
    _refuse_unless(body, "tools", lambda v: v == [], "tool calling is not implemented")
    _refuse_unless(body, "tool_choice", lambda v: v in ("none", "auto"),
                   "tool calling is not implemented")
    _refuse_unless(body, "response_format", lambda v: isinstance(v, dict) and v.get("type")
                   == "text", "structured output is not implemented")
    _refuse_unless(body, "add_generation_prompt", lambda v: v is True,
                   "the assistant's turn is always opened")
    _refuse_unless(body, "continue_final_message", lambda v: v is False,
                   "the assistant's turn is always opened")
    _refuse_unless(body, "echo", lambda v: v is False, "the prompt is not echoed")
    _refuse_unless(body, "chat_template", lambda v: False,
                   "the checkpoint's template is used (templates are code)")
    _refuse_unless(body, "chat_template_kwargs", lambda v: v == {},
                   "the checkpoint's template is rendered as it is")
    stream, include_usage = _common(body, request)
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is not None:
        request.max_tokens = max_tokens
    logprobs = None
    top = _integer(body, "top_logprobs")
    if _flag(body, "logprobs"):
        logprobs = 0 if top is None else top
        request.logprobs = logprobs
    elif top:
        raise _bad("top_logprobs", "top_logprobs needs logprobs=true")
    return ApiRequest(True, request, stream, include_usage, logprobs,
                      _flag(body, "return_token_ids"), _flag(body, "return_tokens_as_token_ids"),
                      sorted(set(body) - _CHAT))


def usage_json(usage: Usage | None, prompt_tokens: int, completion_tokens: int) -> dict:
    p = usage.prompt_tokens if usage else prompt_tokens
    c = usage.completion_tokens if usage else completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens if usage else 0}}


class ResponseBuilder:
    """OpenAI objects for one request: SSE chunks as chunks arrive, or one body at the end.
    `token_text(id)` spells a token for logprobs."""

    def __init__(self, api: ApiRequest, request_id: str, model: str, created: int,
                 token_text: Callable[[int], str]):
        self.api = api
        self.id = request_id
        self.model = model
        self.created = created
        self._text_of = (lambda t: f"token_id:{t}") if api.tokens_as_ids else token_text
        self._offset = 0  # completions' text_offset runs over the whole output
        self._sent_role = False
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []

    def _head(self, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.api.chat \
            else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _logprobs(self, lps) -> dict | None:
        if self.api.logprobs is None:
            return None
        n = self.api.logprobs
        if self.api.chat:
            def entry(token_id: int, logprob: float) -> dict:
                text = self._text_of(token_id)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {"content": [{**entry(lp.token_id, lp.logprob),
                                 "top_logprobs": [entry(t, v) for t, v in lp.top[:n]]}
                                for lp in lps]}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for lp in lps:
            text = self._text_of(lp.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            top = {self._text_of(t): v for t, v in lp.top[:n]}
            top.setdefault(text, lp.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._offset)
            self._offset += len(text)
        return out

    def _choice(self, chunk_text: str, token_ids, lps, finish: str | None,
                stream: bool) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.api.chat:
            if stream:
                delta: dict[str, Any] = {}
                if not self._sent_role:
                    delta["role"] = "assistant"
                    self._sent_role = True
                if chunk_text or not delta:
                    delta["content"] = chunk_text
                choice["delta"] = delta
            else:
                choice["message"] = {"role": "assistant", "content": chunk_text}
        else:
            choice["text"] = chunk_text
        choice["logprobs"] = self._logprobs(lps)
        choice["finish_reason"] = finish
        if self.api.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    def stream_chunk(self, chunk: StreamChunk) -> dict:
        """One SSE object for an engine chunk (usage null while streaming with
        include_usage, as OpenAI sends it)."""
        obj = self._head(True)
        obj["choices"] = [self._choice(chunk.text, chunk.token_ids, chunk.logprobs,
                                       chunk.finish_reason, True)]
        if self.api.include_usage:
            obj["usage"] = None
        return obj

    def usage_chunk(self, final: StreamChunk | None, prompt_tokens: int,
                    generated: int) -> dict:
        obj = self._head(True)
        obj["choices"] = []
        obj["usage"] = usage_json(final.usage if final else None, prompt_tokens, generated)
        return obj

    def add(self, chunk: StreamChunk) -> None:
        """Accumulate an engine chunk for the non-streaming body."""
        self.text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)

    def body(self, final: StreamChunk, prompt_tokens: int) -> dict:
        obj = self._head(False)
        obj["choices"] = [self._choice("".join(self.text), self.token_ids, self.logprobs,
                                       final.finish_reason, False)]
        obj["usage"] = usage_json(final.usage, prompt_tokens, len(self.token_ids))
        return obj
