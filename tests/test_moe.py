"""Mixture of experts: Mixtral and Qwen3-MoE against transformers on expert-parallel
layouts, the grouped compute against its dense reference, layout refusal, the planner."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.engine.dense import DenseGenerator
from meshserve.engine.experts import (
    default_dispatch,
    default_impl,
    expert_compute,
    experts_backend,
)
from meshserve.meshes import LayoutError, MeshLayout, make_mesh, parse_layout
from meshserve.models.loading import check_layout, load_checkpoint, memory_plan
from meshserve.models.moe import dense_experts, grouped_experts, route
from tests import hf_models

LAYOUTS = ("", "expert=2", "expert=4", "expert=2,tensor=2", "data=2,expert=2")
PROMPTS = ([1, 5, 9, 200, 3], list(range(3, 42)), [7] * 17 + [100, 101])
GROUPED = jax.jit(grouped_experts, static_argnames="rows")
DENSE = jax.jit(dense_experts)


def _experts(seed: int, num=8, hidden=16, inner=8):
    keys = jax.random.split(jax.random.key(seed), 3)
    gate = jax.random.normal(keys[0], (num, hidden, inner))
    up = jax.random.normal(keys[1], (num, hidden, inner))
    down = jax.random.normal(keys[2], (num, inner, hidden))
    return gate, up, down


@pytest.mark.parametrize("tokens,rows", [(1, None), (3, 8), (40, None)])
def test_grouped_experts_equal_dense_reference_and_read_only_selected(tokens, rows):
    gate, up, down = _experts(0)
    x = jax.random.normal(jax.random.key(1), (1, tokens, 16))
    router = jax.random.normal(jax.random.key(2), (16, 8))
    ids, weights = route(x, router, 2, normalize=False)
    expected = DENSE(x, ids, weights, gate, up, down)
    got = GROUPED(x, ids, weights, gate, up, down, rows=rows)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-5)
    # Experts no token selected are never read: NaN in their weights changes nothing.
    unused = np.setdiff1d(np.arange(8), np.asarray(ids))
    if unused.size:
        poison = lambda w: w.at[unused].set(jnp.nan)  # noqa: E731
        got = GROUPED(x, ids, weights, poison(gate), poison(up), poison(down), rows=rows)
        np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-5)
    # One device's share (experts 4..7): exactly the slots routed there.
    local = GROUPED(x, ids, weights, gate[4:], up[4:], down[4:], first_expert=4)
    mask = ids >= 4
    np.testing.assert_allclose(
        local, DENSE(x, ids, jnp.where(mask, weights, 0), gate, up, down),
        atol=2e-4, rtol=2e-5)


@pytest.mark.parametrize("impl", ["ragged_dot", "megablox-interpret"])
@pytest.mark.parametrize("tokens", [1, 40])
def test_grouped_matmul_backends_equal_dense_reference(impl, tokens):
    """ragged_dot (GPU) and Megablox gmm (TPU, here interpreted) over the sorted slots:
    equal to the oracle and blind to other devices' slots; gmm skips unused experts'
    weights (XLA:CPU lowers ragged_dot to one dense dot over every group, so NaN there
    would spread: that check is gmm's only)."""
    compute = jax.jit(expert_compute(impl), static_argnames="first_expert")
    gate, up, down = _experts(3, hidden=128, inner=128)
    x = jax.random.normal(jax.random.key(4), (1, tokens, 128))
    ids, weights = route(x, jax.random.normal(jax.random.key(5), (128, 8)), 2, normalize=True)
    expected = DENSE(x, ids, weights, gate, up, down)
    unused = np.setdiff1d(np.arange(8), np.asarray(ids))
    poison = (lambda w: w.at[unused].set(jnp.nan)) if impl != "ragged_dot" else (  # noqa: E731
        lambda w: w)
    got = compute(x, ids, weights, poison(gate), poison(up), poison(down))
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-4)
    local = compute(x, ids, weights, gate[4:], up[4:], down[4:], first_expert=4)
    mask = ids >= 4
    np.testing.assert_allclose(
        local, DENSE(x, ids, jnp.where(mask, weights, 0), gate, up, down),
        atol=2e-3, rtol=2e-4)


def test_experts_backend_follows_the_platform_and_the_override(monkeypatch):
    mesh = make_mesh(parse_layout(""))
    assert default_impl(mesh) == "grouped"  # CPU: the pure-JAX tiled loop
    monkeypatch.setenv("MESHSERVE_EXPERTS_IMPL", "ragged_dot")
    assert default_impl(mesh) == "ragged_dot"
    monkeypatch.setenv("MESHSERVE_EXPERTS_IMPL", "cutlass")
    with pytest.raises(ValueError, match="choose from"):
        default_impl(mesh)


@pytest.fixture(scope="module")
def reference_logits():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = [hf_models.hf_logits(family, p) for p in PROMPTS]
        return cache[family]

    return get


# Every layout for Mixtral; the Qwen3-MoE variants (the same expert code behind a
# different router and layer pattern) on the layouts that add something for them.
LAYOUTS_OF = {"mixtral": LAYOUTS, "qwen3_moe": ("", "expert=2", "data=2,expert=2"),
              "qwen3_moe_norm": ("", "expert=2,tensor=2")}


@pytest.mark.parametrize("family", hf_models.MOE_FAMILIES)
def test_prefill_logits_match_transformers_on_expert_layouts(
    family, checkpoint_dir, reference_logits
):
    expected = reference_logits(family)
    for layout in LAYOUTS_OF[family]:
        model = load_checkpoint(checkpoint_dir(family), make_mesh(parse_layout(layout)))
        got = DenseGenerator(model).prefill_logits(PROMPTS)
        for ours, ref in zip(got, expected, strict=True):
            np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4, err_msg=layout)


def test_ragged_dot_backend_on_an_expert_layout_matches_transformers(
    checkpoint_dir, reference_logits, monkeypatch
):
    monkeypatch.setenv("MESHSERVE_EXPERTS_IMPL", "ragged_dot")
    model = load_checkpoint(checkpoint_dir("mixtral"), make_mesh(parse_layout("expert=2")))
    got = DenseGenerator(model).prefill_logits(PROMPTS)
    for ours, ref in zip(got, reference_logits("mixtral"), strict=True):
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "family,layout",
    [
        ("mixtral", ""),
        ("mixtral", "expert=4"),
        ("qwen3_moe", "expert=2"),
        ("qwen3_moe", "data=2,expert=2"),
        ("qwen3_moe_norm", "expert=2,tensor=2"),
    ],
)
def test_greedy_generation_equals_transformers(family, layout, checkpoint_dir):
    prompt = [1, 17, 33, 250, 4, 90, 12]
    expected = hf_models.hf_greedy(family, prompt, 32)
    model = load_checkpoint(checkpoint_dir(family), make_mesh(parse_layout(layout)))
    assert DenseGenerator(model).generate(prompt, max_tokens=32).token_ids == expected


def test_config_follows_each_family(checkpoint_dir):
    from meshserve.models.checkpoint import checkpoint_config

    mixtral = checkpoint_config(checkpoint_dir("mixtral"))
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.norm_topk_prob) == (8, 2, True)
    assert mixtral.moe_layers == (0, 1)
    qwen = checkpoint_config(checkpoint_dir("qwen3_moe"))
    assert qwen.moe_layers == (1, 2) and not qwen.norm_topk_prob  # mlp_only_layers=[0]
    norm = checkpoint_config(checkpoint_dir("qwen3_moe_norm"))
    assert norm.moe_layers == (1,) and norm.norm_topk_prob  # decoder_sparse_step=2
    assert qwen.num_parameters(active=True) < qwen.num_parameters()


def test_expert_layouts_refused_with_sizes_that_work(checkpoint_dir):
    from meshserve.models.checkpoint import checkpoint_config

    cfg = checkpoint_config(checkpoint_dir("mixtral"))
    with pytest.raises(LayoutError, match=r"num_experts=8 is not divisible by expert=3") as e:
        check_layout(cfg, MeshLayout(expert=3), 8)
    assert "'tensor=2,expert=4'" in str(e.value)
    four = dataclasses.replace(cfg, num_experts=4)
    with pytest.raises(LayoutError, match=r"num_experts=4 is not divisible by expert=8") as e:
        check_layout(four, MeshLayout(expert=8), 8)
    assert "'tensor=2,expert=4'" in str(e.value) and "expert=8" not in str(e.value).split(":")[-1]
    odd = dataclasses.replace(cfg, moe_intermediate_size=12)
    with pytest.raises(LayoutError, match="moe_intermediate_size=12 is not divisible by tensor=8"):
        check_layout(odd, MeshLayout(tensor=8), 8)


def test_memory_plan_counts_expert_weights_per_device(checkpoint_dir):
    from meshserve.models.checkpoint import checkpoint_config

    cfg = checkpoint_config(checkpoint_dir("mixtral"))
    expert_bytes = 4 * cfg.num_layers * cfg.num_experts * 3 * cfg.hidden_size * 32
    one = memory_plan(cfg, make_mesh(parse_layout("")), jnp.float32, 64)
    four = memory_plan(cfg, make_mesh(parse_layout("expert=4")), jnp.float32, 64)
    assert one.weights_bytes == cfg.num_parameters() * 4
    assert one.weights_bytes - four.weights_bytes == expert_bytes * 3 // 4


@pytest.mark.parametrize("family,layout", [("mixtral", "data=2,expert=4"),
                                           ("qwen3_moe_norm", "expert=2,tensor=2")])
def test_all_to_all_dispatch_equals_psum_and_transformers(
    family, layout, checkpoint_dir, reference_logits
):
    """Tokens split over the expert devices, all-to-all there and back: the same logits
    as the psum combine and as transformers (dropless: the capacity per device pair is the
    source's token count), prompts whose lengths do not divide the expert devices."""
    model = load_checkpoint(checkpoint_dir(family), make_mesh(parse_layout(layout)))
    a2a = experts_backend(model.rules, dispatch="all_to_all")
    psum = DenseGenerator(model, experts=experts_backend(model.rules, dispatch="psum"))
    got = DenseGenerator(model, experts=a2a).prefill_logits(PROMPTS)
    for ours, ref, other in zip(got, reference_logits(family), psum.prefill_logits(PROMPTS),
                                strict=True):
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(ours, other, atol=1e-5, rtol=1e-5)


def test_dispatch_choice_is_checked(monkeypatch):
    monkeypatch.setenv("MESHSERVE_EXPERTS_DISPATCH", "all_to_all")
    assert default_dispatch() == "all_to_all"
    monkeypatch.setenv("MESHSERVE_EXPERTS_DISPATCH", "ragged")
    with pytest.raises(ValueError, match="choose from"):
        default_dispatch()
