"""The paged engine: continuous batching, preemption, aborts, compile stability."""

from __future__ import annotations

import dataclasses
import random
import threading

import pytest

from meshserve.engine.config import EngineConfig
from meshserve.engine.dense import DenseGenerator
from meshserve.engine.engine import Engine
from meshserve.engine.sampling_params import InvalidRequestError, SamplingParams
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.demo import train_demo_tokenizer
from meshserve.models.loading import load_checkpoint
from meshserve.models.tokenizer import Tokenizer
from tests import hf_models
from tests.engine_fixtures import SMALL, assert_idle, make_engine, tokens_of

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
PROMPTS = [[(7 * i + 3 * j) % 250 + 3 for j in range(n)]
           for i, n in enumerate((1, 5, 9, 17, 33, 64, 70, 3, 12, 40, 2, 25, 48, 8, 90, 31))]


@pytest.fixture(scope="module", params=["", "data=2,tensor=2"])
def engine(request, checkpoint_dir):
    eng = make_engine(checkpoint_dir("llama"), request.param)
    yield eng
    assert_idle(eng)


@pytest.fixture(scope="module")
def alone(checkpoint_dir):
    """Greedy outputs of each prompt run alone (dense path), computed once."""
    gen = DenseGenerator(load_checkpoint(checkpoint_dir("llama"), make_mesh(parse_layout(""))))
    return [gen.generate(p, GREEDY.max_tokens).token_ids for p in PROMPTS]


def test_staggered_arrivals_equal_runs_alone_and_transformers(engine, alone):
    handles, arrivals = [], list(range(len(PROMPTS)))
    step = 0
    while arrivals or engine.scheduler.num_running or engine.scheduler.waiting:
        # two new requests every step: they join batches that are mid-decode
        for _ in range(2):
            if arrivals:
                i = arrivals.pop(0)
                handles.append((i, engine.add_request(PROMPTS[i], GREEDY)))
        engine.step()
        step += 1
    for i, handle in handles:
        chunks = list(handle)
        assert tokens_of(chunks) == alone[i], f"prompt {i}"
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 24
        assert chunks[-1].usage.prompt_tokens == len(PROMPTS[i])
    for i in (0, 6, 14):
        assert alone[i] == hf_models.hf_greedy("llama", PROMPTS[i], 24)
    assert_idle(engine)


@pytest.mark.parametrize("layout", ["", "data=2,tensor=2"])
def test_tiny_page_pool_preempts_without_changing_outputs(checkpoint_dir, alone, layout):
    cfg = dataclasses.replace(SMALL, num_pages=14, max_seqs=8, min_seq_bucket=8)
    engine = make_engine(checkpoint_dir("llama"), layout, cfg)
    picks = [4, 5, 6, 9, 12, 14, 15]
    results = engine.generate([PROMPTS[i] for i in picks], GREEDY)
    assert engine.stats().preemptions > 0
    for i, chunks in zip(picks, results, strict=True):
        assert tokens_of(chunks) == alone[i]
    assert_idle(engine)


def test_abort_mid_generation_frees_pages_at_once(engine):
    keep = engine.add_request(PROMPTS[5], GREEDY)
    drop = engine.add_request(PROMPTS[6], SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    used = engine.stats().total_pages - engine.stats().free_pages
    assert used >= 2 * 5
    assert engine.abort(drop.request_id)
    engine.step()
    after = engine.stats().total_pages - engine.stats().free_pages
    assert after < used and engine.stats().running == 1
    chunks = list(drop)
    assert chunks[-1].finish_reason == "abort"
    assert 0 < len(tokens_of(chunks)) < 200
    while engine.step():
        pass
    assert list(keep)[-1].finish_reason == "length"
    assert not engine.abort(drop.request_id)
    assert_idle(engine)


def test_abort_while_a_chained_call_runs(engine, alone):
    keep = engine.add_request(PROMPTS[5], GREEDY)
    drop = engine.add_request(PROMPTS[6], SamplingParams(max_tokens=200, ignore_eos=True))
    chained = engine.stats().chained_calls
    while engine.stats().chained_calls == chained:  # until a call waits behind another
        assert engine.step()
    free = engine.stats().free_pages
    assert engine.abort(drop.request_id)
    assert engine.step()  # reads a call, drops the aborted row, launches the next
    assert engine.stats().free_pages > free and engine.stats().running == 1
    chunks = list(drop)
    assert chunks[-1].finish_reason == "abort" and 0 < len(tokens_of(chunks)) < 200
    while engine.step():
        pass
    assert tokens_of(list(keep)) == alone[5]
    assert_idle(engine)


def _top_logprobs(chunks) -> list[tuple[int, float]]:
    return [t for c in chunks for lp in c.logprobs for t in ((lp.token_id, lp.logprob), *lp.top)]


@pytest.mark.parametrize("layout", ["", "data=2,tensor=2"])
def test_chained_decode_calls_change_no_output(checkpoint_dir, tmp_path, layout):
    """Decode calls launched before the previous call's results are read give what calls
    launched one at a time give, with requests ending inside a call in every way."""
    tok_path = tmp_path / "tokenizer.model"  # text for stop strings (ids < 256 decode)
    tok_path.write_bytes(train_demo_tokenizer())
    model = load_checkpoint(checkpoint_dir("llama"), make_mesh(parse_layout(layout)))
    tokenizer = Tokenizer(str(tok_path), model.config)
    off = Engine(model, dataclasses.replace(SMALL, overlap_decode=False), tokenizer)
    on = Engine(model, SMALL, tokenizer)
    [ref] = off.generate([PROMPTS[3]], SamplingParams(max_tokens=30, ignore_eos=True))
    ref_ids, ref_text = tokens_of(ref), "".join(c.text for c in ref)
    near_end = on.max_model_len - 10
    requests = [
        (PROMPTS[3], SamplingParams(max_tokens=30, ignore_eos=True)),
        (PROMPTS[4], SamplingParams(max_tokens=23, ignore_eos=True)),  # ends mid-call
        (PROMPTS[3], SamplingParams(max_tokens=30, stop_token_ids=(ref_ids[9],))),
        (PROMPTS[3], SamplingParams(max_tokens=30, stop=(ref_text[len(ref_text) // 2:][:3],))),
        (PROMPTS[7], SamplingParams(max_tokens=27, temperature=0.8, top_p=0.9, seed=3,
                                    repetition_penalty=1.2, presence_penalty=0.5,
                                    logprobs=2, ignore_eos=True)),
        ([5] * near_end, SamplingParams(max_tokens=10, ignore_eos=True)),  # model length
    ]
    prompts, params = zip(*requests, strict=True)
    want = off.generate(prompts, params)
    got = on.generate(prompts, params)
    assert on.stats().chained_calls > 0 and off.stats().chained_calls == 0
    for a, b in zip(got, want, strict=True):
        assert tokens_of(a) == tokens_of(b)
        assert "".join(c.text for c in a) == "".join(c.text for c in b)
        assert a[-1].finish_reason == b[-1].finish_reason
        top_a, top_b = _top_logprobs(a), _top_logprobs(b)
        assert [i for i, _ in top_a] == [i for i, _ in top_b]
        assert [p for _, p in top_a] == pytest.approx([p for _, p in top_b], abs=1e-4)
    reasons = [w[-1].finish_reason for w in want]
    assert reasons == ["length", "length", "stop", "stop", "length", "length"]
    assert len(tokens_of(want[1])) == 23
    assert len(tokens_of(want[2])) == ref_ids.index(ref_ids[9]) + 1
    for e in (on, off):
        assert_idle(e)


def test_stops_eos_stop_ids_and_model_length(engine, alone):
    target = alone[3]
    stop_tok = target[5]
    first = target.index(stop_tok)
    [chunks] = engine.generate([PROMPTS[3]], [SamplingParams(max_tokens=24,
                                                             stop_token_ids=(stop_tok,))])
    assert tokens_of(chunks) == target[: first + 1] and chunks[-1].finish_reason == "stop"
    long_prompt = [5] * (engine.max_model_len - 4)
    [chunks] = engine.generate([long_prompt], [SamplingParams(max_tokens=4, ignore_eos=True)])
    assert len(tokens_of(chunks)) == 4 and chunks[-1].finish_reason == "length"
    assert_idle(engine)


def test_invalid_requests_are_refused_precisely(engine):
    cases = [
        ([], GREEDY, "empty"),
        ([1, 999], GREEDY, "outside the vocabulary"),
        ([1] * 10, SamplingParams(max_tokens=engine.max_model_len), "exceeds the maximum"),
        ([1], SamplingParams(temperature=float("nan")), "temperature"),
        ([1], SamplingParams(top_p=0.0), "top_p"),
        ([1], SamplingParams(top_k=-1), "top_k"),
        ([1], SamplingParams(min_p=1.5), "min_p"),
        ([1], SamplingParams(presence_penalty=3.0), "presence_penalty"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
        ([1], SamplingParams(stop=("",)), "stop strings"),
        ([1], SamplingParams(logprobs=99), "logprobs"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            engine.add_request(prompt, params)
    assert_idle(engine)


@pytest.mark.parametrize("layout", ["", "data=2,tensor=2"])
def test_no_recompiles_after_warmup_for_random_streams(checkpoint_dir, layout):
    cfg = EngineConfig(page_size=16, num_pages=40, max_seqs=4, max_step_tokens=32,
                       decode_steps=4, max_logprobs=2)
    engine = make_engine(checkpoint_dir("llama"), layout, cfg)
    warm = engine.warmup()
    # mixed: tokens {16, 32}, each with seqs min(T, max_seqs) = 4; decode: seqs {1, 2, 4}
    assert cfg.programs() == ((False, 16, 4), (False, 32, 4),
                              (True, 1, 1), (True, 2, 2), (True, 4, 4))
    assert warm == len(cfg.programs())
    rng = random.Random(0)
    handles = []
    for step in range(60):
        if rng.random() < 0.4:
            n = rng.randint(1, 60)
            params = SamplingParams(
                max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.8]),
                top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.9]),
                repetition_penalty=rng.choice([1.0, 1.3]), logprobs=rng.choice([0, 2]),
                seed=step,
            )
            handles.append(engine.add_request([rng.randint(3, 250) for _ in range(n)], params))
        engine.step()
    while engine.step():
        pass
    assert engine.compiles == warm and engine.stats().compiles_after_warmup == 0
    assert engine.stats().chained_calls > 0  # calls chained on device outputs compile nothing
    assert all(list(h)[-1].finished for h in handles)
    assert_idle(engine)


def test_background_thread_serves_concurrent_callers(engine, alone):
    engine.start()
    try:
        results: dict[int, list[int]] = {}

        def client(i):
            results[i] = tokens_of(engine.add_request(PROMPTS[i], GREEDY))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert {i: alone[i] for i in range(8)} == results
    finally:
        engine.shutdown()
        engine._thread = None
        engine._stopping = False
    assert_idle(engine)
