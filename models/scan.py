"""Decoder layers under `jax.lax.scan`: one traced layer body whatever the depth.

The unrolled model traces and compiles every layer, so a program's compile time grows
with depth. Here the layers' weights are stacked on a leading "layers" axis (unsharded)
and one `DecoderLayer` body runs under a scan. Checkpoints stay per layer: `stack_layers`
stacks a restored model leaf by leaf, each stacked weight placed straight into its
sharding. The KV cache is then one array holding every layer's pages (see
`engine.paged_attention.init_paged_cache`): the attention addresses layer l's pages by
offsetting page ids, so the cache is only ever written in place (a per-layer slice of a
stacked cache, carried through the scan, made XLA copy it every layer).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from meshserve.models.config import ModelConfig
from meshserve.models.layers import AttentionFn, DecoderLayer, Matmul, plain_matmul
from meshserve.models.moe import ExpertsFn, grouped_experts

if TYPE_CHECKING:
    from meshserve.models.loading import ShardedModel

LAYERS_AXIS = "layers"


def scan_refusal(cfg: ModelConfig) -> str | None:
    """Why `cfg`'s layers cannot run under one scanned body (None: they can)."""
    if cfg.moe_layers:
        # MoE routing statistics are gathered per layer in Python during the trace.
        return "MoE layers are counted per layer while tracing"
    if len(set(cfg.sliding_windows)) > 1:
        return "layers have different sliding windows (the kernels take them statically)"
    return None


class ScannedLayers(nnx.Module):
    """All decoder layers as one `DecoderLayer` whose weights carry a leading layer axis."""

    def __init__(self, layer: DecoderLayer, num_layers: int):
        self.layer = layer
        self.num_layers = num_layers

    def __call__(self, x, cos, sin, cache: Any, attention: AttentionFn,
                 matmul: Matmul = plain_matmul, experts: ExpertsFn = grouped_experts):
        """cache: the stacked cache; `attention` gets the layer index as a traced scalar."""
        graphdef, state = nnx.split(self.layer)

        def body(carry, xs):
            h, kv = carry
            index, layer_state = xs
            layer = nnx.merge(graphdef, layer_state)

            def attend(_, q, k, v, c):
                return attention(index, q, k, v, c)

            h, kv = layer(h, cos, sin, kv, attend, matmul, experts)
            return (h, kv), None

        xs = (jnp.arange(self.num_layers, dtype=jnp.int32), state)
        (x, cache), _ = jax.lax.scan(body, (x, cache), xs)
        return x, cache


def stack_layers(model: ShardedModel) -> ShardedModel:
    """`model` with its layers stacked under a `ScannedLayers` (the caller's per-layer
    arrays are released leaf by leaf as their stacked copy is placed)."""
    reason = scan_refusal(model.config)
    if reason is not None:
        raise ValueError(f"cannot scan this model's layers: {reason}")
    module = model.module()
    layers = list(module.layers)
    layer_def, template = nnx.split(layers[0])
    states = [nnx.split(layer)[1] for layer in layers]
    flat = [dict(nnx.to_flat_state(s)) for s in states]
    rules = model.rules

    def stack(path, var: nnx.Variable):
        axes = (LAYERS_AXIS, *var.get_metadata()["axes"])
        parts = [f[path].get_value() for f in flat]
        value = jax.jit(lambda *p: jnp.stack(p), out_shardings=rules.sharding(axes))(*parts)
        for part in parts:
            part.delete()
        return var.replace(value, axes=axes)

    stacked = nnx.from_flat_state(
        [(path, stack(path, var)) for path, var in nnx.to_flat_state(template)]
    )
    module.layers = ScannedLayers(nnx.merge(layer_def, stacked), len(layers))
    graphdef, params = nnx.split(module)
    return dataclasses.replace(model, graphdef=graphdef, params=params)


def is_scanned(module: nnx.Module) -> bool:
    return isinstance(getattr(module, "layers", None), ScannedLayers)
