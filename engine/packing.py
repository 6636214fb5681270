"""Panel-packed projection weights for the C++ matmul kernel on single-device CPU meshes.

XLA:CPU's dots at decode shapes (M = batch rows) read weights at a fraction of memory
bandwidth; pallas_kernels.packed_matmul streams panel-packed weights instead (measured
in tools/bench_engine.py and docs/bench). Packing keeps every weight's shape and dtype,
so parameter trees, shardings and compiled signatures are unchanged; the model is then
traced under `model_context`, which tells `models.layers.dense` the element order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import jax
from flax import nnx

from meshes import use_rules
from models.layers import PROJECTIONS, use_packed_matmul
from models.loading import ShardedModel
from pallas_kernels import packed_matmul as pm


class PanelMatmul:
    """models.layers.PackedMatmul over pallas_kernels.packed_matmul."""

    def packable(self, k: int, n: int, dtype) -> bool:
        return pm.packable(k, n, dtype)

    def __call__(self, x: jax.Array, w: jax.Array, k: int, n: int) -> jax.Array:
        return pm.packed_matmul(x, w.reshape(n // pm.PANEL, k, pm.PANEL))


PANEL_MATMUL = PanelMatmul()


def packing_applies(model: ShardedModel) -> bool:
    """One CPU device (a custom call is opaque to GSPMD) and a kernel that builds."""
    mesh = model.rules.mesh
    return (
        not model.packed
        and mesh.size == 1
        and mesh.devices.flat[0].platform == "cpu"
        and pm.available()
    )


def pack_weights(model: ShardedModel) -> ShardedModel:
    """A copy of `model` with its packable projection weights panel-packed (same shapes);
    the caller's model is left as it was."""
    pack = jax.jit(lambda w, k, n: pm.pack(w.reshape(k, n)).reshape(w.shape),
                   static_argnums=(1, 2))

    def convert(path, variable: nnx.Variable):
        contract = PROJECTIONS.get(str(path[-1]))
        if contract is None:
            return variable
        value = variable.get_value()
        k = math.prod(value.shape[:contract])
        n = value.size // k
        return variable.replace(pack(value, k, n)) if pm.packable(k, n, value.dtype) else variable

    params = nnx.map_state(convert, model.params)
    return dataclasses.replace(model, params=params, packed=True)


@contextlib.contextmanager
def model_context(model: ShardedModel) -> Iterator[None]:
    """What tracing `model` needs: its sharding rules and, if packed, the packed matmul."""
    with use_rules(model.rules), use_packed_matmul(PANEL_MATMUL if model.packed else None):
        yield
