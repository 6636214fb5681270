"""gRPC Generate against the real engine: parity with offline generation, concurrency,
logprobs, stop strings, Tokenize/Detokenize/GetServerInfo."""

from __future__ import annotations

import concurrent.futures

import pytest

from meshserve.engine.sampling_params import SamplingParams
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

PROMPTS = [f"The {w} of the mesh is" for w in ("color", "size", "speed", "heart")]


@pytest.fixture(scope="module")
def server(demo_model):  # noqa: F811
    with running_server(demo_model) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    channel, stub = stub_for(server.target)
    yield stub
    channel.close()


def test_stream_equals_engine_and_dense_greedy(demo_model, demo_ckpt, stub):  # noqa: F811
    from meshserve.engine.dense import DenseGenerator
    from meshserve.meshes import make_mesh, parse_layout
    from meshserve.models.loading import load_checkpoint

    tok, engine = demo_model.tokenizer, demo_model.slices[0].engine
    dense = DenseGenerator(load_checkpoint(demo_ckpt, make_mesh(parse_layout("")), "float32"))
    for prompt in PROMPTS:
        responses = list(stub.Generate(request(prompt, max_tokens=20, ignore_eos=True)))
        served = tokens_of(responses)
        assert len(served) == 20
        direct = engine.add_request(tok.encode(prompt),
                                    SamplingParams(max_tokens=20, ignore_eos=True))
        assert served == [t for c in direct for t in c.token_ids]
        assert served == dense.generate(tok.encode(prompt), 20).token_ids
        # Streamed pieces add up to the decoded whole (with the leading space a word
        # after the prompt has, which decoding the output alone drops).
        streamed = "".join(r.text for r in responses)
        assert streamed.lstrip(" ") == tok.decode(served).lstrip(" ")
        last = responses[-1]
        assert last.finish_reason == "length" and all(not r.finish_reason for r in responses[:-1])
        assert last.usage.prompt_tokens == len(tok.encode(prompt))
        assert last.usage.completion_tokens == 20
        assert 0 <= last.timings.queue_ms <= last.timings.ttft_ms <= last.timings.e2e_ms
    wait_idle(engine)


def test_token_ids_prompt_and_logprobs(demo_model, stub):  # noqa: F811
    ids = [1, 40, 41, 42, 43]
    responses = list(stub.Generate(request(token_ids=ids, max_tokens=6, ignore_eos=True,
                                           logprobs=3)))
    lps = [lp for r in responses for lp in r.logprobs]
    assert [lp.token_id for lp in lps] == tokens_of(responses)
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 3
        # Greedy: the chosen token is the best alternative, with the same logprob.
        assert lp.top[0].token_id == lp.token_id
        assert lp.top[0].logprob == pytest.approx(lp.logprob, abs=1e-5)
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
    plain = list(stub.Generate(request(token_ids=ids, max_tokens=6, ignore_eos=True)))
    assert tokens_of(plain) == tokens_of(responses)
    assert all(not r.logprobs for r in plain)  # none asked for, none sent


def test_stop_string_and_stop_token(demo_model, stub):  # noqa: F811
    tok = demo_model.tokenizer
    ids = [1, 50, 60, 70]
    full = list(stub.Generate(request(token_ids=ids, max_tokens=12, ignore_eos=True)))
    full_ids = tokens_of(full)
    # Stop at the 4th generated token by id: it is included, generation ends there.
    stopped = list(stub.Generate(request(token_ids=ids, max_tokens=12, ignore_eos=True,
                                         stop_token_ids=[full_ids[3]])))
    first = full_ids.index(full_ids[3])
    assert tokens_of(stopped) == full_ids[: first + 1]
    assert stopped[-1].finish_reason == "stop"
    # A stop string taken from the full text: the output ends before it.
    text = tok.decode(full_ids)
    needle = text.strip()[len(text.strip()) // 2:][:3]
    if needle.strip():
        by_text = list(stub.Generate(request(token_ids=ids, max_tokens=12, ignore_eos=True,
                                             stop=[needle])))
        assert by_text[-1].finish_reason == "stop"
        out = "".join(r.text for r in by_text)
        assert needle not in out and text.startswith(out.lstrip(" "))


def test_32_concurrent_clients_each_get_their_own_output(demo_model, stub):  # noqa: F811
    engine, tok = demo_model.slices[0].engine, demo_model.tokenizer
    prompts = [f"client {i} says {'hi ' * (i % 5)}" for i in range(32)]
    expected = [[t for c in h for t in c.token_ids] for h in [
        engine.add_request(tok.encode(p), SamplingParams(max_tokens=10, ignore_eos=True))
        for p in prompts]]

    def one(i: int) -> list[int]:
        rs = list(stub.Generate(request(prompts[i], request_id=f"client-{i}", max_tokens=10,
                                        ignore_eos=True)))
        assert all(r.request_id == f"client-{i}" for r in rs)
        return tokens_of(rs)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    assert got == expected
    assert len({tuple(g) for g in got}) > 1  # different prompts, different outputs
    wait_idle(engine)


def test_tokenize_detokenize_and_server_info(demo_model, stub):  # noqa: F811
    tok = demo_model.tokenizer
    ids = stub.Tokenize(pb.TokenizeRequest(text="Hello Zürich 🙂")).token_ids
    assert list(ids) == tok.encode("Hello Zürich 🙂") and ids[0] == 1  # BOS from the config
    no_bos = stub.Tokenize(pb.TokenizeRequest(text="Hello", add_bos=False)).token_ids
    assert list(no_bos) == tok.encode("Hello", add_special_tokens=False)
    text = stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text
    assert text == "Hello Zürich 🙂"
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.demo and info.has_tokenizer and info.model_name.startswith("meshserve-demo")
    assert info.architecture == "LlamaForCausalLM" and info.dtype == "float32"
    assert info.slice_count == 1 and len(info.slices) == 1
    assert info.max_model_len == 256 and info.vocab_size == 512 and info.page_size == 16
    assert info.bos_token_id == 1 and list(info.eos_token_ids) == [2]
    s = info.slices[0]
    assert s.healthy and s.total_pages == 64 and s.mesh_layout.startswith("data=1,tensor=1")
    assert len(s.devices) == 1
