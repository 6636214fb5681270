"""The panel-packed CPU matmul kernel against its reference, and the engine on packed
weights against the engine on the plain ones."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshserve.engine.dense import DenseGenerator
from meshserve.engine.engine import Engine
from meshserve.engine.packing import PANEL_MATMUL, pack_weights, packing_applies
from meshserve.engine.sampling_params import SamplingParams
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.layers import dense, plain_matmul
from meshserve.models.loading import load_checkpoint
from meshserve.pallas_kernels import packed_matmul as pm
from tests.engine_fixtures import SMALL, assert_idle, tokens_of


@pytest.mark.parametrize(
    "m,k,n",
    [
        (1, 768, 2048), (8, 64, 32), (13, 100, 96), (64, 96, 256), (70, 5, 64),
        # 1-4 rows read 4 or 2 panels per work item: whole groups and leftover panels
        (1, 33, 32 * 7), (2, 50, 32 * 9), (3, 17, 32 * 5), (4, 64, 32 * 4),
    ],
)
def test_kernel_matches_reference(m, k, n):
    rng = np.random.default_rng(m * k + n)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32))
    w = jnp.asarray(rng.standard_normal((k, n), np.float32))
    packed = pm.pack(w)
    assert packed.shape == (n // pm.PANEL, k, pm.PANEL)
    np.testing.assert_array_equal(np.asarray(pm.unpack(packed)), np.asarray(w))
    got = jax.jit(pm.packed_matmul)(x, packed)
    want = pm.packed_matmul_reference(x, packed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4 * k**0.5)


def test_kernel_under_vmap_and_bad_operands():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4, 40), np.float32))
    packed = jnp.stack([pm.pack(jnp.asarray(rng.standard_normal((40, 64), np.float32)))] * 3)
    got = jax.vmap(pm.packed_matmul)(x, packed)
    for i in range(3):
        want = pm.packed_matmul_reference(x[i], packed[i])
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="f32"):
        pm.packed_matmul(x[0].astype(jnp.bfloat16), packed[0])
    with pytest.raises(ValueError, match="same K|K"):
        pm.packed_matmul(x[0][:, :39], packed[0])
    assert pm.packable(64, 96, jnp.float32)
    assert not pm.packable(64, 16, jnp.float32) and not pm.packable(64, 64, jnp.bfloat16)


def test_dense_with_the_panel_matmul_reads_packed_weights():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 16), np.float32))
    w = jnp.asarray(rng.standard_normal((4, 16, 64), np.float32))  # an o_proj: contract 2
    packed = pm.pack(w.reshape(64, 64)).reshape(w.shape)

    def apply(x, w, matmul):
        return dense(x, nnx.Param(w, contract=2), matmul)

    got = jax.jit(lambda x, w: apply(x, w, PANEL_MATMUL))(x, packed)
    want = apply(x, w, plain_matmul)
    assert got.shape == (2, 3, 64)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: one kv head, N=16 plain
def test_engine_on_packed_weights_matches_plain(checkpoint_dir, family):
    ckpt = checkpoint_dir(family)
    model = load_checkpoint(ckpt, make_mesh(parse_layout("")))
    assert packing_applies(model)
    packed, matmul = pack_weights(model)
    flat, plain = nnx.to_flat_state(packed.params), dict(nnx.to_flat_state(model.params))
    changed = 0
    for path, leaf in flat:
        before, after = plain[path].get_value(), leaf.get_value()
        assert after.shape == before.shape and after.dtype == before.dtype
        contract = leaf.get_metadata().get("contract")
        k = int(np.prod(before.shape[:contract])) if contract else 0
        if contract and pm.packable(k, before.size // k, before.dtype):
            changed += 1
            np.testing.assert_array_equal(
                np.asarray(pm.unpack(after.reshape(-1, k, pm.PANEL))),
                np.asarray(before).reshape(k, -1),
            )
        else:
            np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    assert changed >= 2 * model.config.num_layers

    # The packed dense path gives the plain path's logits.
    prompts = [[5, 17, 42, 9, 100, 3], [7, 7, 7]]
    want = DenseGenerator(model).prefill_logits(prompts)
    got = DenseGenerator(packed, matmul).prefill_logits(prompts)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)

    # The engine packs its own copy and generates what the plain engine generates.
    params = SamplingParams(max_tokens=12, logprobs=2)
    engines = [Engine(model, SMALL), Engine(model, dataclasses.replace(SMALL, pack_weights=False))]
    assert engines[0].matmul is PANEL_MATMUL and engines[1].matmul is plain_matmul
    outs = [e.generate(prompts, params) for e in engines]
    for a, b in zip(*outs, strict=True):
        assert tokens_of(a) == tokens_of(b) and len(tokens_of(a)) == 12
        np.testing.assert_allclose(
            [lp.logprob for c in a for lp in c.logprobs],
            [lp.logprob for c in b for lp in c.logprobs],
            atol=1e-4,
        )
    for e in engines:
        assert_idle(e)


@pytest.mark.parametrize("rows,k,n", [(8, 64, 32 * 9), (16, 40, 32 * 6)])
def test_grouped_kernel_matches_reference_and_reads_only_used_tiles(rows, k, n):
    rng = np.random.default_rng(rows + k)
    experts, tiles = 4, 5
    w = rng.standard_normal((experts, k, n), np.float32)
    w[1] = np.nan  # an expert no used tile names: never read
    packed = jax.vmap(pm.pack)(jnp.asarray(w))
    x = rng.standard_normal((tiles * rows, k), np.float32)
    tile_expert = jnp.array([0, 2, 2, 3, 1], jnp.int32)
    # 1-4 rows (grouped panel blocks), a full tile, rows past rows_used NaN (never read);
    # tile 4 (expert 1) is past num_tiles.
    rows_used = jnp.array([1, rows, 3, 4, rows], jnp.int32)
    for t, used in enumerate(np.asarray(rows_used)):
        x[t * rows + used:(t + 1) * rows] = np.nan
    got = jax.jit(pm.grouped_packed_matmul)(jnp.asarray(x), packed, tile_expert, rows_used,
                                            jnp.int32(4))
    want = pm.grouped_packed_matmul_reference(jnp.nan_to_num(jnp.asarray(x)), packed,
                                              tile_expert, rows_used, 4)
    row = np.arange(tiles * rows)
    live = (row % rows < np.repeat(np.asarray(rows_used), rows)) & (row < 4 * rows)
    assert np.isfinite(np.asarray(got)[live]).all()
    np.testing.assert_allclose(np.asarray(got)[live], np.asarray(want)[live],
                               rtol=1e-5, atol=1e-4)
