"""The engine's guarantees on a mixture-of-experts model (Mixtral): batched equals alone
(and transformers), preemption changes no output, nothing compiles after warm-up — on
one device (packed projections + grouped experts) and expert-parallel."""

from __future__ import annotations

import dataclasses

import pytest

from meshserve.engine.dense import DenseGenerator
from meshserve.engine.sampling_params import SamplingParams
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.loading import load_checkpoint
from tests import hf_models
from tests.engine_fixtures import SMALL, assert_idle, make_engine, tokens_of

GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
PROMPTS = [[(11 * i + 5 * j) % 250 + 3 for j in range(n)]
           for i, n in enumerate((1, 7, 13, 5, 2, 9, 3, 14))]


@pytest.fixture(scope="module")
def alone(checkpoint_dir):
    gen = DenseGenerator(load_checkpoint(checkpoint_dir("mixtral"), make_mesh(parse_layout(""))))
    return [gen.generate(p, GREEDY.max_tokens).token_ids for p in PROMPTS]


@pytest.mark.parametrize("layout", ["", "expert=2,tensor=2"])
def test_staggered_batches_equal_alone_with_no_compile_after_warmup(
    checkpoint_dir, alone, layout
):
    engine = make_engine(checkpoint_dir("mixtral"), layout)
    warm = engine.warmup()
    handles, arrivals = [], list(range(len(PROMPTS)))
    while arrivals or engine.scheduler.num_running or engine.scheduler.waiting:
        for _ in range(2):  # new requests join batches that are mid-decode
            if arrivals:
                i = arrivals.pop(0)
                handles.append((i, engine.add_request(PROMPTS[i], GREEDY)))
        engine.step()
    for i, handle in handles:
        assert tokens_of(list(handle)) == alone[i], f"prompt {i}"
    assert engine.compiles == warm and engine.stats().compiles_after_warmup == 0
    assert_idle(engine)
    if not layout:
        for i in (1, 7):
            assert alone[i] == hf_models.hf_greedy("mixtral", PROMPTS[i], GREEDY.max_tokens)


def test_tiny_page_pool_preempts_without_changing_outputs(checkpoint_dir, alone):
    cfg = dataclasses.replace(SMALL, num_pages=6, max_seqs=8, min_seq_bucket=8)
    engine = make_engine(checkpoint_dir("mixtral"), "expert=2", cfg)
    picks = [2, 3, 5, 7]
    results = engine.generate([PROMPTS[i] for i in picks], GREEDY)
    assert engine.stats().preemptions > 0
    for i, chunks in zip(picks, results, strict=True):
        assert tokens_of(chunks) == alone[i]
    assert_idle(engine)
