"""Layouts, sharding rules and the memory planner."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from meshserve.meshes import (
    DoesNotFitError,
    LayoutError,
    MeshLayout,
    ShardingRules,
    enumerate_layouts,
    make_mesh,
    parse_layout,
    split_slices,
)
from meshserve.models.config import ModelConfig
from meshserve.models.loading import check_layout, effective_kv_heads, init_random, memory_plan

CFG = ModelConfig(
    family="llama",
    vocab_size=250,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=8,
)


def test_parse_layout():
    assert parse_layout("data=2,tensor=4") == MeshLayout(data=2, tensor=4)
    assert parse_layout("") == MeshLayout()
    assert parse_layout("slices=2, tensor=2").num_devices == 4
    for bad in ("tensor", "pipeline=2", "tensor=x", "tensor=0", "tensor=2,tensor=2"):
        with pytest.raises(LayoutError):
            parse_layout(bad)


def test_enumerate_layouts_covers_every_factorisation():
    layouts = enumerate_layouts(8)
    # ordered factorisations of 8 = 2^3 into 5 factors: C(3+4, 4) = 35
    assert len(layouts) == 35 == len(set(layouts))
    assert all(x.num_devices == 8 for x in layouts)


def test_mesh_has_the_four_axes_and_refuses_too_many_devices():
    mesh = make_mesh(parse_layout("data=2,tensor=4"))
    assert dict(mesh.shape) == {"data": 2, "expert": 1, "sequence": 1, "tensor": 4}
    with pytest.raises(LayoutError, match="needs 16 devices"):
        make_mesh(parse_layout("tensor=16"))
    meshes = split_slices(parse_layout("slices=2,tensor=2"))
    assert len(meshes) == 2
    assert not set(meshes[0].devices.flat) & set(meshes[1].devices.flat)


def test_rules_replicate_what_does_not_divide():
    mesh = make_mesh(parse_layout("tensor=4"))
    rules = ShardingRules.create(mesh, {"vocab": 250, "heads": 8})
    assert rules.spec(("vocab", "embed")) == jax.sharding.PartitionSpec()
    assert "vocab=250" in rules.replicated["vocab"]
    assert rules.spec(("embed", "heads", "head_dim"))[1] == "tensor"


def test_kv_heads_are_replicated_when_tensor_exceeds_them():
    assert effective_kv_heads(CFG, 4) == 4
    assert effective_kv_heads(CFG, 2) == 2
    model = init_random(CFG, make_mesh(parse_layout("tensor=8")))
    k = model.params["layers"][0]["attn"]["k_proj"][...]
    assert k.shape == (64, 8, 8)
    assert k.sharding.shard_shape(k.shape) == (64, 1, 8)


def test_layout_refusals_name_the_problem_and_the_alternatives():
    with pytest.raises(LayoutError) as err:
        check_layout(dataclasses.replace(CFG, num_heads=6, num_kv_heads=2), MeshLayout(tensor=4), 8)
    assert "num_heads=6" in str(err.value) and "[1, 2]" in str(err.value)
    with pytest.raises(LayoutError, match="no experts"):
        check_layout(CFG, MeshLayout(expert=2), 8)


def test_memory_planner_counts_shards_and_refuses_with_numbers():
    mesh1 = make_mesh(parse_layout(""))
    mesh4 = make_mesh(parse_layout("tensor=4"))
    p1 = memory_plan(CFG, mesh1, "float32", kv_cache_tokens=1024, capacity_bytes=1 << 40)
    p4 = memory_plan(CFG, mesh4, "float32", kv_cache_tokens=1024, capacity_bytes=1 << 40)
    # 2 layers x (k,v) x 1024 tokens x 2 kv heads x 8 dims x 4 bytes
    assert p1.kv_bytes == 2 * 2 * 1024 * 2 * 8 * 4
    assert p4.kv_bytes == 2 * 2 * 1024 * 4 * 8 * 4 // 4  # kv heads replicated to 4, split 4 ways
    assert p1.weights_bytes == CFG.num_parameters() * 4
    # vocab 250 stays replicated; every other big weight is split 4 ways
    assert p1.weights_bytes / 4 < p4.weights_bytes < p1.weights_bytes / 2
    small = memory_plan(CFG, mesh1, "float32", kv_cache_tokens=1 << 20, capacity_bytes=64 << 20)
    assert not small.fits
    with pytest.raises(DoesNotFitError) as err:
        small.check()
    assert "KV cache 256.00 MiB" in str(err.value) and "64.00 MiB available" in str(err.value)
