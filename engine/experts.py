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
