"""Prefill and decode slices in one server (`--slices 2 --prefill-slices 1`): over real
gRPC the client sees one stream, the same tokens as a colocated server and transformers,
and every page comes back on both slices, also for cancelled requests."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import urllib.request

import grpc
import pytest

from meshserve.serving.proto import meshserve_pb2 as pb
from meshserve.serving.slices import DECODE, PREFILL, Slice, _meshes
from tests import hf_models
from tests.serving_fixtures import (
    SERVING_CONFIG,
    request,
    running_server,
    stub_for,
    tokens_of,
    wait_idle,
)

LENGTHS = (3, 70, 9, 33, 1, 120, 17, 5, 48, 2, 90, 12, 26, 7, 60, 4)
PROMPTS = [[(11 * i + 5 * j) % 250 + 3 for j in range(n)] for i, n in enumerate(LENGTHS)]
MAX_TOKENS = [8 + (i % 4) * 3 for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def pd_model(checkpoint_dir):
    """Slice 0 prefills, slice 1 decodes: tensor=2 each, on devices 0-3."""
    from meshserve.serving import launch

    model = launch.load(checkpoint_dir("llama"), "tensor=2", 2, "float32", SERVING_CONFIG,
                        prefill_slices=1)
    launch.warm_up(model)
    yield model
    for s in model.slices:
        s.engine.shutdown(timeout=10.0)


def _generate_all(target: str) -> list:
    channel, stub = stub_for(target)
    with channel:
        def one(i):
            return list(stub.Generate(request(token_ids=PROMPTS[i], max_tokens=MAX_TOKENS[i],
                                              ignore_eos=True), timeout=120))

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return list(pool.map(one, range(len(PROMPTS))))


def _idle(model) -> None:
    for s in model.slices:
        wait_idle(s.engine)
        assert s.engine.stats().parked == 0
        for allocator in s.engine.scheduler.allocators:
            allocator.check_all_free()


def test_pd_server_streams_what_a_colocated_server_and_transformers_do(pd_model):
    prefill, decode = pd_model.slices
    assert (prefill.role, decode.role) == (PREFILL, DECODE)
    assert set(prefill.devices).isdisjoint(decode.devices)
    with running_server(pd_model, http_port=0) as server:
        results = _generate_all(server.target)
        # The OpenAI API takes the same path: one body with every token, once.
        body = json.dumps({"prompt": PROMPTS[1], "max_tokens": MAX_TOKENS[1], "ignore_eos":
                           True, "temperature": 0, "return_token_ids": True}).encode()
        http = urllib.request.Request(
            f"http://127.0.0.1:{server.server.http_port}/v1/completions", data=body,
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(http, timeout=60) as r:
            completion = json.loads(r.read())
        assert completion["choices"][0]["token_ids"] == tokens_of(results[1])
        assert completion["usage"]["completion_tokens"] == MAX_TOKENS[1]
        channel, stub = stub_for(server.target)
        with channel:
            info = stub.GetServerInfo(pb.GetServerInfoRequest())
        assert [(s.role, s.parked) for s in info.slices] == [(PREFILL, 0), (DECODE, 0)]
        assert [s.routed_requests for s in info.slices] == [len(PROMPTS) + 1] * 2
        registry = server.server.metrics.registry
        sample = registry.get_sample_value
        assert sample("meshserve_kv_transfer_seconds_count") == len(PROMPTS) + 1
        moved = [r[-1].timings.kv_transfer_bytes for r in results]
        assert sample("meshserve_kv_transfer_bytes_sum") == sum(moved) + moved[1]  # + HTTP
        assert sample("meshserve_kv_transfer_failures_total", {"kind": "export"}) == 0
        for role in ("prefill", "decode"):
            assert sample("meshserve_role_queue_seconds_count", {"role": role}) == len(
                PROMPTS) + 1
    _idle(pd_model)
    # The colocated server: one slice doing both, on the decode slice's engine.
    colocated = dataclasses.replace(pd_model, slices=[Slice(0, decode.engine, decode.layout,
                                                            decode.devices)])
    with running_server(colocated) as server:
        expected = _generate_all(server.target)
    _idle(pd_model)
    for i, (got, want) in enumerate(zip(results, expected, strict=True)):
        assert tokens_of(got) == tokens_of(want), i
        assert len(tokens_of(got)) == MAX_TOKENS[i]  # nothing streamed twice
        assert got[0].token_ids and len(got[0].token_ids) == 1  # the first token, at once
        final = got[-1]
        assert (final.slice, final.prefill_slice) == (1, 0)
        assert final.usage.completion_tokens == MAX_TOKENS[i]
        assert final.usage.prompt_tokens == LENGTHS[i]
        t = final.timings
        assert t.transfer_ms > 0 and t.decode_ms > 0 and t.kv_transfer_bytes > 0
        assert t.e2e_ms >= t.ttft_ms
    for i in (1, 5, 10):
        assert tokens_of(results[i]) == hf_models.hf_greedy("llama", PROMPTS[i], MAX_TOKENS[i])


def test_cancelled_requests_free_pages_on_both_slices(pd_model):
    with running_server(pd_model) as server:
        channel, stub = stub_for(server.target)
        with channel:
            for after in (1, 3):  # during the handoff, and while decoding
                call = stub.Generate(request(token_ids=PROMPTS[3], max_tokens=200,
                                             ignore_eos=True))
                for _ in range(after):
                    assert next(call).token_ids
                call.cancel()
                with pytest.raises(grpc.RpcError) as e:
                    list(call)
                assert e.value.code() == grpc.StatusCode.CANCELLED
                _idle(pd_model)
            # A deadline that expires mid-stream frees them too.
            call = stub.Generate(request(token_ids=PROMPTS[1], max_tokens=180,
                                         ignore_eos=True), timeout=0.02)
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _idle(pd_model)


def test_prefill_slice_flags_are_checked_before_loading():
    with pytest.raises(ValueError, match="--prefill-slices must be in"):
        _meshes("tensor=2", 2, 2, None)
    with pytest.raises(ValueError, match="need 10 devices, 8 exist"):
        _meshes("tensor=2", 4, 1, "tensor=4")
    with pytest.raises(ValueError, match="--prefill-mesh needs --prefill-slices"):
        _meshes("", 2, 0, "tensor=2")
    layouts = [(layout, role) for _, layout, role in _meshes("data=2,tensor=2", 2, 1,
                                                               "tensor=4")]
    assert [role for _, role in layouts] == [PREFILL, DECODE]
    assert layouts[0][0].startswith("data=1,tensor=4")
    assert layouts[1][0].startswith("data=2,tensor=2")


def test_other_layouts_then_a_dead_decode_slice(checkpoint_dir):
    """Prefill tensor=2 (devices 0-1), decode data=2,tensor=2 (2-5): the KV is resharded
    on the way and the tokens do not change. Then the decode slice stops: a request gets
    its first token and a clean UNAVAILABLE, and the prefill slice frees its pages."""
    from meshserve.serving import launch

    model = launch.load(checkpoint_dir("llama"), "data=2,tensor=2", 2, "float32",
                        SERVING_CONFIG, prefill_slices=1, prefill_mesh="tensor=2")
    launch.warm_up(model)
    prefill, decode = model.slices
    try:
        assert (prefill.layout.split(",")[:2], decode.layout.split(",")[:2]) == (
            ["data=1", "tensor=2"], ["data=2", "tensor=2"])
        picks = (1, 5, 10, 3)
        with running_server(model) as server:
            channel, stub = stub_for(server.target)
            with channel:
                def one(i):
                    return tokens_of(stub.Generate(request(
                        token_ids=PROMPTS[i], max_tokens=MAX_TOKENS[i], ignore_eos=True)))

                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    got = list(pool.map(one, picks))
                for i, tokens in zip(picks, got, strict=True):
                    assert tokens == hf_models.hf_greedy("llama", PROMPTS[i], MAX_TOKENS[i])
                _idle(model)
                decode.engine.shutdown()
                call = stub.Generate(request(token_ids=PROMPTS[3], max_tokens=20,
                                             ignore_eos=True))
                assert len(next(call).token_ids) == 1
                with pytest.raises(grpc.RpcError) as e:
                    list(call)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "no healthy decode slice" in e.value.details()
                failures = server.server.metrics.registry.get_sample_value(
                    "meshserve_kv_transfer_failures_total", {"kind": "no_decode_slice"})
                assert failures == 1
        wait_idle(prefill.engine)
        assert prefill.engine.stats().parked == 0
    finally:
        for s in model.slices:
            s.engine.shutdown(timeout=10.0)
