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
from meshserve.pallas_kernels import packed_matmul as pm


def _panel_matmul(x: jax.Array, w: jax.Array, k: int, n: int) -> jax.Array:
    if pm.packable(k, n, w.dtype):  # the rule pack_weights applied to this weight
        return pm.packed_matmul(x, w.reshape(n // pm.PANEL, k, pm.PANEL))
    return plain_matmul(x, w, k, n)


PANEL_MATMUL: Matmul = _panel_matmul


def single_cpu_device(mesh: Mesh) -> bool:
    """Where the CPU kernels run: a custom call is opaque to GSPMD, so one device only."""
    return mesh.size == 1 and mesh.devices.flat[0].platform == "cpu"


def packing_applies(model: ShardedModel) -> bool:
    """One CPU device and a matmul kernel that builds here."""
    return single_cpu_device(model.rules.mesh) and pm.available()


def pack_weights(model: ShardedModel) -> tuple[ShardedModel, Matmul]:
    """A copy of `model` with its packable projection weights panel-packed (same shapes),
    and the matmul the model must then be run with; the caller's model is left as it was."""
    pack = jax.jit(lambda w, k, n: pm.pack(w.reshape(k, n)).reshape(w.shape),
                   static_argnums=(1, 2))

    def convert(path, variable: nnx.Variable):
        contract = variable.get_metadata().get("contract")
        if contract is None:  # not a projection: the model reads it some other way
            return variable
        value = variable.get_value()
        k = math.prod(value.shape[:contract])
        n = value.size // k
        return variable.replace(pack(value, k, n)) if pm.packable(k, n, value.dtype) else variable

    params = nnx.map_state(convert, model.params)
    return dataclasses.replace(model, params=params), PANEL_MATMUL
