"""Property-based fuzzing (hypothesis) of a real server on the demo model: arbitrary
GenerateRequest fields, arbitrary and mutated bytes on the gRPC wire, arbitrary JSON and
bytes to the OpenAI endpoints. Every input is either served or refused as bad input
(INVALID_ARGUMENT, RESOURCE_EXHAUSTED for size, FAILED_PRECONDITION for what the model
cannot do; HTTP 4xx), never INTERNAL/UNKNOWN or a 5xx; afterwards the server still
answers health checks and serves a control request token for token as before.

Deterministic (derandomize: the same examples every run) and modest in size, so the
module stays fast; `MESHSERVE_FUZZ_EXAMPLES` runs more examples locally."""

from __future__ import annotations

import http.client
import json
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshserve.serving.proto import meshserve_pb2 as pb
from tests.serving_fixtures import (  # noqa: F401
    demo_ckpt,
    demo_model,
    request,
    running_server,
    stub_for,
    tokens_of,
    wait_idle,
)

MAX_REQUEST_BYTES = 8192
EXAMPLES = int(os.environ.get("MESHSERVE_FUZZ_EXAMPLES", "80"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Refusals of bad input; anything else (INTERNAL, UNKNOWN, ...) is a server defect.
BAD_INPUT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.FAILED_PRECONDITION}
CONTROL = dict(token_ids=[1, 5, 6, 7], max_tokens=4, ignore_eos=True)
READY = health_pb2.HealthCheckRequest(service="meshserve.v1.MeshServe")


@pytest.fixture(scope="module")
def server(demo_model):  # noqa: F811
    # A small default max_tokens keeps the valid examples short.
    with running_server(demo_model, http_port=0, max_request_bytes=MAX_REQUEST_BYTES,
                        default_max_tokens=4) as s:
        channel, stub = stub_for(s.target)
        s.channel, s.stub = channel, stub
        s.health = health_pb2_grpc.HealthStub(channel)
        s.expected = tokens_of(stub.Generate(request(**CONTROL)))
        assert len(s.expected) == 4
        yield s
        channel.close()


def _still_serving(server, demo_model) -> None:  # noqa: F811
    assert server.health.Check(READY, timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert tokens_of(server.stub.Generate(request(**CONTROL), timeout=30)) == server.expected
    assert _http(server, "GET", "/health")[0] == 200
    wait_idle(demo_model.slices[0].engine)


def _drain(call) -> grpc.StatusCode:
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        assert e.code() in BAD_INPUT, (e.code(), e.details())
        event(e.code().name)  # the spread shows with --hypothesis-show-statistics
        return e.code()
    event("OK")
    return grpc.StatusCode.OK


# -- GenerateRequest fields ------------------------------------------------------------

INT32 = st.integers(-2**31, 2**31 - 1)
SMALL_TOKENS = st.integers(0, 6)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
TEXT = st.text(max_size=40)
messages = st.lists(st.builds(pb.Message, role=st.sampled_from(
    ["user", "system", "assistant", "tool", "developer", "", "bogus"]) | TEXT, content=TEXT),
    max_size=3)


def _set(r: pb.GenerateRequest, name: str, value) -> None:
    if isinstance(value, list):  # a repeated field
        r.ClearField(name)
        getattr(r, name).extend(value)
    else:
        setattr(r, name, value)


GRPC_FIELDS = {
    "request_id": st.text(max_size=140), "prompt": TEXT,
    "token_ids": st.lists(st.integers(0, 600) | INT32, max_size=12), "messages": messages,
    "max_tokens": SMALL_TOKENS | INT32, "temperature": st.floats(0, 2) | ANY_FLOAT,
    "top_p": st.floats(0, 1) | ANY_FLOAT, "top_k": st.integers(0, 50) | INT32,
    "min_p": st.floats(0, 1) | ANY_FLOAT, "repetition_penalty": st.floats(0, 10) | ANY_FLOAT,
    "presence_penalty": st.floats(-2, 2) | ANY_FLOAT,
    "frequency_penalty": st.floats(-2, 2) | ANY_FLOAT, "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(TEXT, max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 600) | INT32, max_size=4),
    "logprobs": st.integers(0, 4) | INT32, "ignore_eos": st.booleans(),
    "priority": st.integers(0, 10) | INT32, "cache_salt": st.text(max_size=300),
}


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """A valid request (token ids or text) with a few fields set to arbitrary values."""
    r = request(**CONTROL) if draw(st.booleans()) else request(prompt="hi", max_tokens=3)
    if draw(st.integers(0, 4)) == 0:
        r = pb.GenerateRequest()
    for name in draw(st.sets(st.sampled_from(sorted(GRPC_FIELDS)), min_size=1, max_size=4)):
        _set(r, name, draw(GRPC_FIELDS[name]))
    if not 0 < r.max_tokens <= 6 and r.max_tokens < 256 and draw(st.booleans()):
        r.max_tokens = 3  # valid but long requests: most kept short
    return r


@FUZZ
@given(generate_requests())
def test_generate_request_fields(server, demo_model, r):  # noqa: F811
    _drain(server.stub.Generate(r, timeout=60))


def test_fields_fuzz_leaves_the_server_serving(server, demo_model):  # noqa: F811
    _still_serving(server, demo_model)


# -- raw bytes on the gRPC wire --------------------------------------------------------

VALID = request(**CONTROL).SerializeToString()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "cut"]))
        if op == "flip" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i:i + draw(st.integers(1, 8))]
    return bytes(data)


WIRE = st.binary(max_size=256) | mutated() | st.just(b"\x0a" * 3 * MAX_REQUEST_BYTES)
METHODS = ["/meshserve.v1.MeshServe/Generate", "/meshserve.v1.MeshServe/Tokenize",
           "/meshserve.v1.MeshServe/Detokenize", "/meshserve.v1.MeshServe/GetServerInfo",
           "/grpc.health.v1.Health/Check"]


@FUZZ
@given(st.sampled_from(METHODS), WIRE)
def test_raw_bytes_on_the_wire(server, demo_model, method, data):  # noqa: F811
    if method.endswith("/Generate"):
        call = server.channel.unary_stream(method)(data, timeout=60)
    else:
        call = [server.channel.unary_unary(method)]
        try:
            call[0](data, timeout=30)
        except grpc.RpcError as e:
            # Health/Check of a service name nobody registered: NOT_FOUND, as specified.
            assert e.code() in BAD_INPUT | {grpc.StatusCode.NOT_FOUND} if method.startswith(
                "/grpc.health") else e.code() in BAD_INPUT, (method, e.code(), e.details())
        return
    _drain(call)


def test_malformed_bytes_are_invalid_argument(server, demo_model):  # noqa: F811
    for method in METHODS:
        stream = method.endswith("/Generate")
        fn = (server.channel.unary_stream if stream else server.channel.unary_unary)(method)
        try:
            result = fn(b"\xff\xff\xff", timeout=10)
            if stream:
                list(result)
            raise AssertionError(f"{method} accepted malformed bytes")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.code())
            assert "is not a valid" in e.details() and "message" in e.details()
    _still_serving(server, demo_model)


# -- the OpenAI HTTP endpoints ---------------------------------------------------------

def _http(server, method: str, path: str, body: bytes | None = None,
          headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# JSON text may hold what no protobuf string can (lone surrogates, "\\ud800") and numbers
# no double can (10**400).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=20) | st.text(
    st.sampled_from(["a", " ", "\x00", "\u00e9", "\ud800", "\udc00", "\U0001f600"]),
    min_size=1, max_size=6)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-10**400, 10**400) | st.floats()
    | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12)
NUMBER = (st.floats(0, 2) | st.integers(-3, 3) | st.integers(-10**400, 10**400)
          | st.floats(allow_nan=True, allow_infinity=True))
COUNT = st.integers(0, 6) | st.integers(-10**400, 10**400)
TEXTS = ANY_TEXT | st.lists(ANY_TEXT, max_size=3)
# Per field: values of the type the parser expects (reaching the checks behind the type
# checks), else arbitrary JSON.
FIELDS = {
    "prompt": ANY_TEXT | st.lists(st.integers(-5, 600) | st.integers(), max_size=6)
    | st.lists(ANY_TEXT, max_size=2),
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]) | ANY_TEXT,
         "content": ANY_TEXT | st.lists(st.fixed_dictionaries(
             {"type": st.just("text") | ANY_TEXT, "text": ANY_TEXT}), max_size=2)}),
        max_size=3),
    "max_tokens": COUNT, "max_completion_tokens": COUNT, "temperature": NUMBER,
    "top_p": NUMBER, "top_k": COUNT, "min_p": NUMBER, "seed": COUNT, "stop": TEXTS,
    "stop_token_ids": st.lists(st.integers(-5, 600) | st.integers(), max_size=4),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries(
        {"include_usage": st.booleans()}), "logprobs": COUNT | st.booleans(),
    "top_logprobs": COUNT, "n": COUNT, "echo": st.booleans(), "priority": COUNT,
    "cache_salt": ANY_TEXT, "ignore_eos": st.booleans(), "model": ANY_TEXT,
    "response_format": st.fixed_dictionaries({"type": st.just("text") | ANY_TEXT}),
    "repetition_penalty": NUMBER, "presence_penalty": NUMBER, "frequency_penalty": NUMBER,
    "return_token_ids": st.booleans(),
}


@st.composite
def api_bodies(draw, chat: bool) -> dict:
    """A valid request with a few fields set to other values (mostly of the right type)."""
    body = ({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    body["max_tokens"] = 3
    if draw(st.integers(0, 4)) == 0:
        body = {}
    for name in draw(st.sets(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3)):
        body[name] = draw(FIELDS[name] if draw(st.integers(0, 3)) else JSON)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 3  # valid but long requests: kept short
    return body


def _encode(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


def http_bodies(chat: bool):
    return st.one_of(api_bodies(chat).map(_encode), api_bodies(chat).map(_encode),
                     api_bodies(chat).map(_encode), JSON.map(_encode), st.binary(max_size=200),
                     ANY_TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")))


@FUZZ
@given(st.data(), st.booleans(), st.sampled_from(["application/json", "text/plain", ""]))
def test_openai_endpoints(server, demo_model, data, chat, content_type):  # noqa: F811
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = data.draw(http_bodies(chat))
    headers = {"Content-Type": content_type} if content_type else {}
    if data.draw(st.integers(0, 3)) == 0:
        # A client-chosen request id, any byte but the control characters aiohttp's own
        # parser refuses (a plain-text 400 before any handler runs).
        headers["X-Request-Id"] = data.draw(st.text(st.characters(
            min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=140))
    status, payload = _http(server, "POST", path, body, headers)
    assert status < 500, (status, body, payload[:300])
    event(f"HTTP {status}")
    if status >= 400:
        assert payload.startswith(b'{"error"'), (status, headers, body, payload[:300])
        error = json.loads(payload)["error"]
        assert error["message"] and error["code"] != "internal", error
        return
    assert status == 200
    if payload.startswith(b"data: "):  # a stream: no event may be an error
        events = [line[6:] for line in payload.split(b"\n\n") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]", payload[-300:]
        assert all("error" not in json.loads(e) for e in events[:-1]), payload[:300]
    else:
        assert json.loads(payload)["choices"], payload[:300]


def test_http_fuzz_leaves_the_server_serving(server, demo_model):  # noqa: F811
    _still_serving(server, demo_model)
