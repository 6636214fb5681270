"""Bad input, overload, cancellation and deadlines against a real server and engine."""

from __future__ import annotations

import concurrent.futures
import math
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.serving.proto import meshserve_pb2 as pb
from tests.serving_fixtures import (  # noqa: F401
    ServerThread,
    demo_ckpt,
    demo_model,
    error_of,
    request,
    running_server,
    stub_for,
    tokens_of,
    wait_idle,
)

MAX_REQUEST_BYTES = 4096
INF, NAN = math.inf, math.nan
GOOD = dict(token_ids=[1, 5, 6], max_tokens=3, ignore_eos=True)

# (request fields, expected message fragment)
BAD_REQUESTS = [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="hi", token_ids=[1, 2]),
     "exactly one of prompt, token_ids or messages (prompt and token_ids were set)"),
    (dict(max_tokens=3), "exactly one of prompt, token_ids or messages (none was set)"),
    (dict(token_ids=[1, 512, 3]), "token_ids [512] are outside the vocabulary [0, 512)"),
    (dict(token_ids=[-1, 4]), "token_ids [-1] are outside the vocabulary"),
    (dict(token_ids=[1] * 200, max_tokens=57),
     "prompt (200 tokens) + max_tokens (57) exceeds the model length 256"),
    (dict(token_ids=[1] * 256), "leaves no room to generate within the model length 256"),
    (dict(GOOD, temperature=-0.5), "temperature must be >= 0"),
    (dict(GOOD, temperature=NAN), "temperature must be a finite number"),
    (dict(GOOD, temperature=INF), "temperature must be a finite number"),
    (dict(GOOD, temperature=1e39), "temperature must be a finite number in float32 range"),
    (dict(GOOD, top_p=0.0), "top_p must be in (0, 1]"),
    (dict(GOOD, top_p=1.5), "top_p must be in (0, 1]"),
    (dict(GOOD, top_p=NAN), "top_p must be a finite number"),
    (dict(GOOD, top_k=-1), "top_k must be >= 0"),
    (dict(GOOD, min_p=-0.1), "min_p must be in [0, 1]"),
    (dict(GOOD, min_p=1.5), "min_p must be in [0, 1]"),
    (dict(GOOD, repetition_penalty=0.0), "repetition_penalty must be in (0, 10]"),
    (dict(GOOD, repetition_penalty=INF), "repetition_penalty must be a finite number"),
    (dict(GOOD, presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(GOOD, frequency_penalty=-3.0), "frequency_penalty must be in [-2, 2]"),
    (dict(GOOD, frequency_penalty=-INF), "frequency_penalty must be a finite number"),
    (dict(GOOD, max_tokens=0), "max_tokens must be >= 1"),
    (dict(GOOD, max_tokens=-5), "max_tokens must be >= 1"),
    (dict(GOOD, stop=["x"] * 17), "at most 16 stop strings"),
    (dict(GOOD, stop=["ok", ""]), "stop strings must not be empty"),
    (dict(GOOD, stop=["y" * 300]), "stop strings must be at most 256 characters"),
    (dict(GOOD, stop_token_ids=[600]), "stop_token_ids [600] are outside the vocabulary"),
    (dict(GOOD, priority=-1), "priority -1 is outside [0, 1000000]: requests may wait"),
    (dict(GOOD, priority=2_000_000), "priority 2000000 is outside [0, 1000000]"),
    (dict(GOOD, logprobs=5), "logprobs must be in [0, 4]"),
    (dict(GOOD, logprobs=-1), "logprobs must be in [0, 4]"),
    (dict(GOOD, seed=2**63), "seed must be in [0, 2^63)"),
    (dict(GOOD, request_id="has space"), "request_id must be 1-128 printable ASCII"),
    (dict(GOOD, request_id="r" * 129), "request_id must be 1-128 printable ASCII"),
    (dict(GOOD, cache_salt="s" * 257), "cache_salt must be at most 256 bytes"),
    (dict(prompt="a" * (MAX_REQUEST_BYTES + 10)),
     f"bytes; the limit is {MAX_REQUEST_BYTES} (--max-request-bytes)"),
]


@pytest.fixture(scope="module")
def server(demo_model):  # noqa: F811
    with running_server(demo_model, max_request_bytes=MAX_REQUEST_BYTES) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    channel, stub = stub_for(server.target)
    yield stub
    channel.close()


def _good(stub) -> list[int]:
    return tokens_of(stub.Generate(request(**GOOD)))


def test_every_bad_input_is_invalid_argument_and_the_server_carries_on(demo_model, stub,  # noqa: F811
                                                                      server):
    expected = _good(stub)
    assert len(expected) == 3
    for fields, message in BAD_REQUESTS:
        e = error_of(stub.Generate, request(**fields))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, e.details())
        assert message in e.details(), (fields, e.details())
        assert _good(stub) == expected  # the next request is served normally
    rejected = server.server.metrics.registry.get_sample_value(
        "meshserve_requests_rejected_total", {"reason": "invalid"})
    assert rejected == len(BAD_REQUESTS)
    e = error_of(stub.Detokenize, pb.DetokenizeRequest(token_ids=[3, 9999]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "[9999]" in e.details()
    wait_idle(demo_model.slices[0].engine)


def test_oversize_beyond_the_grpc_limit_is_resource_exhausted(stub):
    e = error_of(stub.Generate, request(prompt="b" * (3 * MAX_REQUEST_BYTES)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(_good(stub)) == 3


def test_duplicate_in_flight_request_id_is_refused(demo_model, stub):  # noqa: F811
    long = stub.Generate(request(token_ids=[1, 7, 8], max_tokens=200, ignore_eos=True,
                                 request_id="dup"))
    first = next(long)  # in flight
    e = error_of(stub.Generate, request(**dict(GOOD, request_id="dup")))
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(first.token_ids) + len(tokens_of(long)) == 200  # the first one is untouched
    assert len(tokens_of(stub.Generate(request(**dict(GOOD, request_id="dup"))))) == 3


def test_overload_is_resource_exhausted_while_health_and_streams_carry_on(
        demo_model, server, stub):  # noqa: F811
    """30 requests of 200 prompt tokens at once: 4 fit in the 64 KV pages, and the
    2048-token waiting limit holds 10 more, so the rest are refused at once."""
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))

    def one(i: int):
        try:
            rs = list(stub.Generate(request(token_ids=[1] + [10 + i] * 199, max_tokens=40,
                                            ignore_eos=True)))
            return len(tokens_of(rs))
        except grpc.RpcError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        futures = [pool.submit(one, i) for i in range(30)]
        checked = health.Check(health_pb2.HealthCheckRequest(service="meshserve.v1.MeshServe"),
                               timeout=5)
        results = [f.result() for f in futures]
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    assert errors, "no request was refused"
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
    assert all("waiting prompts would hold" in e.details() for e in errors)
    assert [r for r in results if not isinstance(r, grpc.RpcError)] == [40] * (30 - len(errors))
    wait_idle(demo_model.slices[0].engine)
    assert len(_good(stub)) == 3


def test_cancel_frees_pages(demo_model, server, stub):  # noqa: F811
    engine = demo_model.slices[0].engine
    call = stub.Generate(request(token_ids=[1, 20, 21, 22], max_tokens=240, ignore_eos=True))
    first = next(call)
    assert first.token_ids
    assert engine.stats().free_pages < engine.stats().total_pages
    call.cancel()
    wait_idle(engine, timeout=2.0)
    cancelled = server.server.metrics.registry.get_sample_value(
        "meshserve_requests_finished_total", {"slice": "0", "reason": "cancelled"})
    assert cancelled >= 1


def test_deadline_frees_pages(demo_model, stub):  # noqa: F811
    engine = demo_model.slices[0].engine
    e = error_of(stub.Generate, request(token_ids=[1, 30, 31], max_tokens=250,
                                        ignore_eos=True), timeout=0.15)
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(engine, timeout=2.0)
    assert len(_good(stub)) == 3


def test_stop_aborts_what_outlives_the_grace_period(demo_model):  # noqa: F811
    server = ServerThread(demo_model)
    channel, stub = stub_for(server.target)
    with channel:
        call = stub.Generate(request(token_ids=[1, 40, 41], max_tokens=250, ignore_eos=True))
        first = next(call)
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 0.1})
        stopper.start()
        rest = list(call)  # ends with a final chunk, not an error
        stopper.join(30)
    assert rest[-1].finish_reason == "abort"
    assert len(first.token_ids) + len(tokens_of(rest)) < 250
    assert rest[-1].usage.completion_tokens == len(first.token_ids) + len(tokens_of(rest))
    wait_idle(demo_model.slices[0].engine, timeout=2.0)
