"""The engine's guarantees on a mixture-of-experts model (Mixtral): batched equals alone
(and transformers), preemption changes no output, nothing compiles after warm-up — on
one device (packed projections + grouped experts) and expert-parallel; the routing
counts the engine reports."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from meshserve.engine.dense import DenseGenerator
from meshserve.engine.engine import Engine
from meshserve.engine.sampling_params import SamplingParams
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.loading import load_checkpoint
from meshserve.serving.metrics import ServingMetrics
from meshserve.serving.slices import Slice
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
    # Every real token fed (the prompt, then each output but the last) reaches k experts
    # in every MoE layer; padding and finished rows are not counted.
    stats, k = engine.stats(), engine.model.config.experts_per_token
    fed = sum(len(p) + GREEDY.max_tokens - 1 for p in PROMPTS) - stats.prefix_cache_hits
    assert (stats.expert_tokens.sum(-1) == k * fed).all(), stats.expert_tokens
    assert stats.expert_devices == (2 if layout else 1) and stats.moe_dropped_tokens == 0
    assert ((stats.expert_hotspot_ratios >= 1) & (stats.expert_hotspot_ratios <= 2)).all()
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


def _zero_routers(model):
    """All router logits 0: softmax is uniform and top-k breaks ties by the lower index,
    so every token goes to experts 0..k-1 — all on the first expert device."""
    def zero(path, x):
        return x * 0 if "router" in jax.tree_util.keystr(path) else x

    return dataclasses.replace(model, params=jax.tree_util.tree_map_with_path(zero, model.params))


@pytest.mark.parametrize("expert", [2, 4])
def test_a_router_sending_every_token_to_one_device_has_hotspot_ratio_expert(
    checkpoint_dir, expert
):
    model = _zero_routers(load_checkpoint(checkpoint_dir("mixtral"),
                                          make_mesh(parse_layout(f"expert={expert}"))))
    engine = Engine(model, SMALL)
    prompts = PROMPTS[:3]
    engine.generate(prompts, dataclasses.replace(GREEDY, max_tokens=5))
    stats, k = engine.stats(), model.config.experts_per_token
    fed = sum(len(p) + 5 - 1 for p in prompts) - stats.prefix_cache_hits
    counts = np.zeros_like(stats.expert_tokens)
    counts[:, :k] = fed  # each token once on each of experts 0..k-1
    np.testing.assert_array_equal(stats.expert_tokens, counts)
    assert stats.expert_devices == expert
    np.testing.assert_allclose(stats.expert_hotspot_ratios, expert)
    # The same numbers on /metrics: per expert (summed over layers) and the worst layer.
    registry = ServingMetrics([Slice(0, engine, f"expert={expert}", ())]).registry
    value = lambda name, **labels: registry.get_sample_value(name, {"slice": "0", **labels})  # noqa: E731
    layers = len(model.config.moe_layers)
    assert [value("meshserve_expert_tokens_total", expert=str(e)) for e in range(8)] == [
        layers * fed] * k + [0] * (8 - k)
    assert value("meshserve_expert_hotspot_ratio") == pytest.approx(expert)
    assert value("meshserve_moe_dropped_tokens_total") == 0
