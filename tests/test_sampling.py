"""On-device sampling: semantics on fixed logits, and per-request behaviour in batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.engine.sampler import SamplingBatch, sample
from meshserve.engine.sampling_params import SamplingParams
from tests.engine_fixtures import assert_idle, make_engine, tokens_of

VOCAB = 8
LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005], np.float32))


def _batch(rows: int, **overrides) -> SamplingBatch:
    base = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                presence_penalty=0.0, frequency_penalty=0.0)
    base.update(overrides)
    arr = {k: jnp.full((rows,), v, jnp.int32 if k == "top_k" else jnp.float32)
           for k, v in base.items()}
    temp = arr["temperature"]
    return SamplingBatch(
        **arr, seed_lo=jnp.arange(rows, dtype=jnp.uint32), seed_hi=jnp.zeros(rows, jnp.uint32),
        gen_index=jnp.zeros(rows, jnp.int32), any_random=jnp.any(temp > 0),
        any_filter=jnp.bool_(base["top_k"] > 0 or base["top_p"] < 1),
        any_penalty=jnp.bool_(True), any_logprobs=jnp.bool_(True),
    )


def _draw(rows: int = 20000, counts=None, seen=None, **overrides) -> np.ndarray:
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (rows, VOCAB))
    counts = jnp.zeros((rows, VOCAB), jnp.int32) if counts is None else counts
    seen = jnp.zeros((rows, VOCAB), bool) if seen is None else seen
    run = jax.jit(lambda lg, b, c, s: sample(lg, b, lambda: (c, s), 2))
    tokens, *_ = run(logits, _batch(rows, **overrides), counts, seen)
    return np.bincount(np.asarray(tokens), minlength=VOCAB) / rows


def test_temperature_one_follows_the_distribution():
    freq = _draw()
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.012)


def test_temperature_sharpens_and_flattens():
    p = np.exp(LOGITS / 0.5)
    np.testing.assert_allclose(_draw(temperature=0.5), p / p.sum(), atol=0.012)
    p = np.exp(LOGITS / 2.0)
    np.testing.assert_allclose(_draw(temperature=2.0), p / p.sum(), atol=0.012)


def test_top_k_top_p_and_min_p_truncate():
    assert np.all(_draw(top_k=3)[3:] == 0)
    np.testing.assert_allclose(_draw(top_k=3)[:3], np.array([0.4, 0.25, 0.15]) / 0.8, atol=0.015)
    # top_p=0.7: tokens 0 and 1 hold 0.65 < 0.7, token 2 crosses it: keep three
    assert np.all(_draw(top_p=0.7)[3:] == 0) and _draw(top_p=0.7)[2] > 0.1
    # min_p=0.3 keeps probabilities >= 0.12: tokens 0, 1, 2
    assert np.all(_draw(min_p=0.3)[3:] == 0)
    assert _draw(top_k=1)[0] == 1.0


def test_penalties_match_their_definitions():
    rows = 4
    counts = jnp.zeros((rows, VOCAB), jnp.int32).at[:, 0].set(3)
    seen = jnp.zeros((rows, VOCAB), bool).at[:, 0].set(True).at[:, 1].set(True)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (rows, VOCAB))
    from meshserve.engine.sampler import _penalised

    batch = _batch(rows, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = np.asarray(_penalised(logits, batch, counts, seen))[0]
    want = LOGITS.copy()
    want[:2] = np.where(want[:2] > 0, want[:2] / 2, want[:2] * 2)  # seen: prompt or output
    want[0] -= 0.25 * 3 + 0.5  # generated three times
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # a strong presence penalty moves greedy off the most likely token
    freq = _draw(rows=rows, counts=counts, seen=seen, temperature=0.0, presence_penalty=2.0)
    assert freq[1] == 1.0


@pytest.fixture(scope="module", params=["", "data=2,tensor=2"])
def engine(checkpoint_dir, request):
    eng = make_engine(checkpoint_dir("llama"), request.param)
    yield eng
    assert_idle(eng)


def test_seeded_sampling_is_the_same_in_any_batch(engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234,
                            ignore_eos=True)
    prompt = [1, 50, 60, 70]
    [alone] = engine.generate([prompt], params)
    others = [[9] * n for n in (3, 20, 41)]
    crowd = engine.generate(
        [*others, prompt],
        [SamplingParams(max_tokens=20, temperature=0.7, seed=i) for i in range(3)] + [params],
    )
    assert tokens_of(crowd[-1]) == tokens_of(alone)
    [other_seed] = engine.generate([prompt], SamplingParams(
        max_tokens=16, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))
    assert tokens_of(other_seed) != tokens_of(alone)


def test_top_k_one_equals_greedy_and_logprobs_are_consistent(engine):
    prompt = [1, 2, 3, 4, 5, 6]
    [greedy] = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True,
                                                        logprobs=3))
    [top1] = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=1.5, top_k=1,
                                                      seed=5, ignore_eos=True))
    assert tokens_of(top1) == tokens_of(greedy)
    entries = [lp for c in greedy for lp in c.logprobs]
    assert [e.token_id for e in entries] == tokens_of(greedy)
    for e in entries:
        assert len(e.top) == 3 and e.top[0] == (e.token_id, pytest.approx(e.logprob, abs=1e-6))
        assert e.top[0][1] >= e.top[1][1] >= e.top[2][1]
        assert e.logprob <= 0


def test_repetition_penalty_changes_greedy_output(engine):
    prompt = [5] * 8
    [plain] = engine.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))
    [penal] = engine.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True,
                                                       repetition_penalty=5.0))
    plain, penal = tokens_of(plain), tokens_of(penal)
    assert plain != penal
    assert 5 not in penal
    # with a strong repetition penalty, repeats within the output become rarer
    assert len(set(penal)) >= len(set(plain))
