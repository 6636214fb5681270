"""Panel-packed projection weights for the C++ matmul kernel on single-device CPU meshes.

XLA:CPU's dots at decode shapes (M = batch rows) read weights at a fraction of memory
bandwidth; pallas_kernels.packed_matmul streams panel-packed weights instead (measured
in tools/bench_matmul.py and docs/benchmarks.md). Packing keeps every weight's shape and
dtype, so parameter trees, shardings and compiled signatures are unchanged. The model
is told nothing: the engine hands it `PANEL_MATMUL` as its projection matmul, which
knows the element order `pack_weights` chose.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx
from jax.sharding import Mesh

from meshserve.models.layers import Matmul, plain_matmul
from meshserve.models.loading import ShardedModel
from meshserve.models.moe import (
    EXPERT_IN_AXES,
    EXPERT_OUT_AXES,
    ExpertsFn,
    combine_tiles,
    grouped_experts,
    plan_tiles,
    tile_rows,
)
from meshserve.pallas_kernels import packed_matmul as pm


def _panel_matmul(x: jax.Array, w: jax.Array, k: int, n: int) -> jax.Array:
    if pm.packable(k, n, w.dtype):  # the rule pack_weights applied to this weight
        return pm.packed_matmul(x, w.reshape(n // pm.PANEL, k, pm.PANEL))
    return plain_matmul(x, w, k, n)


PANEL_MATMUL: Matmul = _panel_matmul


def _experts_packable(gate: jax.Array, down: jax.Array) -> bool:
    """The rule pack_weights applies to a MoE layer's expert weights (all or none)."""
    _, e, i = gate.shape
    return pm.packable(e, i, gate.dtype) and pm.packable(i, e, down.dtype)


def _packed_experts(x, expert_ids, weights, gate, up, down, first_expert=0):
    """MoE expert compute over panel-packed expert weights: the grouped C++ kernel runs
    only the tiles that hold tokens, each streaming its own expert's panels."""
    if not _experts_packable(gate, down):
        return grouped_experts(x, expert_ids, weights, gate, up, down, first_expert)
    shape = x.shape
    xs = x.reshape(-1, shape[-1])
    num, e, i = gate.shape
    plan = plan_tiles(xs, expert_ids, num, first_expert, tile_rows(expert_ids.size, num))

    def mm(a, w, k, n):
        return pm.grouped_packed_matmul(a, w.reshape(num, n // pm.PANEL, k, pm.PANEL),
                                        plan.tile_expert, plan.rows_used, plan.num_tiles)

    h = jax.nn.silu(mm(plan.xp, gate, e, i)) * mm(plan.xp, up, e, i)
    yp = mm(h, down, i, e)
    return combine_tiles(plan, yp, weights, xs.shape[0]).astype(x.dtype).reshape(shape)


PACKED_EXPERTS: ExpertsFn = _packed_experts


def single_cpu_device(mesh: Mesh) -> bool:
    """Where the CPU kernels run: a custom call is opaque to GSPMD, so one device only."""
    return mesh.size == 1 and mesh.devices.flat[0].platform == "cpu"


def packing_applies(model: ShardedModel) -> bool:
    """One CPU device and a matmul kernel that builds here."""
    return single_cpu_device(model.rules.mesh) and pm.available()


def pack_weights(model: ShardedModel) -> tuple[ShardedModel, Matmul]:
    """A copy of `model` with its packable projection weights panel-packed (same shapes),
    and the matmul the model must then be run with; the caller's model is left as it was.
    MoE expert weights are packed per expert where `PACKED_EXPERTS` reads them so."""
    pack = jax.jit(lambda w, k, n: pm.pack(w.reshape(k, n)).reshape(w.shape),
                   static_argnums=(1, 2))
    pack_experts = jax.jit(jax.vmap(pm.pack))
    cfg = model.config
    experts_packable = bool(cfg.moe_layers) and pm.packable(
        cfg.hidden_size, cfg.moe_intermediate_size, model.dtype
    ) and pm.packable(cfg.moe_intermediate_size, cfg.hidden_size, model.dtype)

    def convert(path, variable: nnx.Variable):
        axes = tuple(variable.get_metadata().get("axes", ()))
        if axes in (EXPERT_IN_AXES, EXPERT_OUT_AXES):
            if not experts_packable:
                return variable
            value = variable.get_value()
            return variable.replace(pack_experts(value).reshape(value.shape))
        contract = variable.get_metadata().get("contract")
        if contract is None:  # not a projection: the model reads it some other way
            return variable
        value = variable.get_value()
        k = math.prod(value.shape[:contract])
        n = value.size // k
        return variable.replace(pack(value, k, n)) if pm.packable(k, n, value.dtype) else variable

    params = nnx.map_state(convert, model.params)
    return dataclasses.replace(model, params=params), PANEL_MATMUL
