"""The MoE layers' expert compute on a mesh: expert parallelism inside `shard_map`.

Each device holds `experts / expert` experts (their hidden dimension split on `tensor`
too). Activations are replicated over the `expert` and `tensor` axes in this layout
(only `data` and `sequence` split tokens), so dispatch needs no collective: every device
already holds every token of its shard, computes the slots routed to its own experts
with the routing-following grouped compute, and one `psum` over expert × tensor
combines the partial outputs — the all-reduce a row-parallel dense MLP already pays
over `tensor`. See docs/design.md ("Mixture of experts") for why not all-to-all.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from meshserve.meshes import ShardingRules
from meshserve.models.moe import EXPERT_IN_AXES, EXPERT_OUT_AXES, ExpertsFn, grouped_experts

TOKEN_AXES = ("batch", "seq", None)

# Compute per backend, all taking (x, ids, weights, gate, up, down, first_expert).
IMPLS = ("grouped",)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """An `ExpertsFn` that runs `compute` per device on its own experts and psums."""

    mesh: Mesh
    w_in: PartitionSpec
    w_out: PartitionSpec
    expert_axes: tuple[str, ...]  # mesh axes the experts dimension is split over
    reduce_axes: tuple[str, ...]  # expert × tensor: where partial outputs are summed
    rules: ShardingRules
    compute: ExpertsFn = grouped_experts

    @classmethod
    def create(cls, rules: ShardingRules) -> ExpertParallel:
        return cls(
            mesh=rules.mesh,
            w_in=rules.spec(EXPERT_IN_AXES),
            w_out=rules.spec(EXPERT_OUT_AXES),
            expert_axes=rules.mesh_axes(("experts",)),
            reduce_axes=rules.mesh_axes(("experts", "expert_mlp")),
            rules=rules,
        )

    def __call__(self, x, expert_ids, weights, gate, up, down):
        if self.mesh.size == 1:
            return self.compute(x, expert_ids, weights, gate, up, down)
        tokens = self.rules.spec(TOKEN_AXES, x.shape)

        def local(x, ids, w, gate, up, down):
            first = 0
            if self.expert_axes:
                first = jax.lax.axis_index(self.expert_axes) * gate.shape[0]
            y = self.compute(x, ids, w, gate, up, down, first_expert=first)
            return jax.lax.psum(y, self.reduce_axes) if self.reduce_axes else y

        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(tokens, tokens, tokens, self.w_in, self.w_in, self.w_out),
            out_specs=tokens,
            check_vma=False,
        )(x, expert_ids, weights, gate, up, down)


def experts_backend(rules: ShardingRules) -> ExpertsFn:
    """The expert compute for a model placed with `rules`."""
    return ExpertParallel.create(rules)


class RoutingCounter:
    """An `ExpertsFn` wrapper that also counts, per MoE layer, the token slots routed to
    each expert, for real tokens only (`real` [data, tokens]: padding rows and finished
    decode rows compute but are not traffic). Built inside one trace and read after the
    forward pass of that trace: `counts()` is [data, moe_layers, experts] int32, kept per
    data shard so that counting adds no collective over `data`."""

    def __init__(self, inner: ExpertsFn, num_experts: int, real: jax.Array):
        self._inner = inner
        self._num = num_experts
        self._real = real
        self._layers: list[jax.Array] = []

    def __call__(self, x, expert_ids, weights, gate, up, down):
        onehot = jax.nn.one_hot(expert_ids, self._num, dtype=jnp.int32)  # [d, t, k, E]
        real = self._real.astype(jnp.int32)[..., None, None]
        self._layers.append(jnp.sum(onehot * real, axis=(1, 2)))
        return self._inner(x, expert_ids, weights, gate, up, down)

    def counts(self) -> jax.Array:
        return jnp.stack(self._layers, axis=1)


def device_tokens(counts: np.ndarray, expert_devices: int) -> np.ndarray:
    """[layers, experts] slot counts → [layers, expert_devices]: device d holds experts
    [d·E/X, (d+1)·E/X) (the contiguous split of the `experts` dimension)."""
    layers, experts = counts.shape
    return counts.reshape(layers, expert_devices, experts // expert_devices).sum(-1)


def hotspot_ratios(counts: np.ndarray, expert_devices: int) -> np.ndarray:
    """Per layer: the busiest expert device's slots ÷ the mean over expert devices (1 is
    perfectly balanced, `expert_devices` is everything on one device; NaN: no tokens)."""
    per_device = device_tokens(counts, expert_devices).astype(np.float64)
    mean = per_device.mean(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, per_device.max(-1) / mean, np.nan)


def routing_stats(counts: np.ndarray, expert_devices: int) -> dict:
    """EngineStats' MoE fields from the engine's cumulative [moe_layers, experts] counts
    (none for a dense model, whose counts have no layers)."""
    if not counts.size:
        return {}
    return dict(expert_tokens=counts.copy(), expert_devices=expert_devices,
                expert_hotspot_ratios=hotspot_ratios(counts, expert_devices))
