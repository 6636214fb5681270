"""The one place where logical axis names meet physical mesh axes.

Models, kernels and the engine name every dimension logically ('embed', 'heads',
'batch', ...). A `ShardingRules` object, built for one mesh and one model, maps those
names to mesh axes. Nothing outside this package spells a mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = Sequence[str | None]

# Megatron-style: attention heads and the MLP hidden dimension split over `tensor`
# (column-parallel in, row-parallel out); batches over `data`; experts over `expert`;
# long prompts over `sequence`.
DEFAULT_RULES: Mapping[str, str | None] = {
    # parameters
    "vocab": "tensor",
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    # activations
    "batch": "data",
    "seq": "sequence",
    # caches: each data shard owns its own page pool; pages hold kv heads split on tensor
    "cache_batch": "data",
    "cache_seq": None,
    "cache_pages": "data",
    "page_slot": None,
    "kv_channels": "tensor",
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical-axis → mesh-axis mapping for one mesh and one model."""

    mesh: Mesh
    mapping: Mapping[str, str | None]
    # Logical axes that had to be replicated because the model dimension does not divide.
    replicated: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(
        cls,
        mesh: Mesh,
        dims: Mapping[str, int] | None = None,
        overrides: Mapping[str, str | None] | None = None,
    ) -> ShardingRules:
        """Rules for `mesh`; a logical axis whose size (in `dims`) does not divide its
        mesh axis is replicated instead, and the reason is recorded."""
        mapping = dict(DEFAULT_RULES)
        mapping.update(overrides or {})
        replicated = {}
        for name, size in (dims or {}).items():
            axis = mapping.get(name)
            if axis is None:
                continue
            ways = mesh.shape[axis]
            if size % ways:
                mapping[name] = None
                replicated[name] = f"{name}={size} does not divide {axis}={ways}"
        return cls(mesh=mesh, mapping=mapping, replicated=replicated)

    def axis_size(self, logical: str) -> int:
        """How many ways `logical` is split on this mesh."""
        axis = self.mapping.get(logical)
        return 1 if axis is None else self.mesh.shape[axis]

    def mesh_axes(self, logical: Sequence[str]) -> tuple[str, ...]:
        """The mesh axes (split more than one way) that the `logical` axes map to: what a
        collective inside `shard_map` reduces or indexes over, named for the caller."""
        out = []
        for name in logical:
            axis = self.mapping.get(name)
            if axis is not None and self.mesh.shape[axis] > 1 and axis not in out:
                out.append(axis)
        return tuple(out)

    def spec(self, axes: LogicalAxes, shape: tuple[int, ...] | None = None) -> PartitionSpec:
        """PartitionSpec for `axes`; with `shape`, a dimension that does not divide its
        mesh axis (a batch of 1 on data=2, say) stays replicated."""
        used: set[str] = set()
        out = []
        for i, name in enumerate(axes):
            axis = None if name is None else self.mapping.get(name)
            if name is not None and name not in self.mapping:
                raise KeyError(f"unknown logical axis {name!r}")
            if axis is not None and (axis in used or self.mesh.shape[axis] == 1):
                axis = None
            if axis is not None and shape is not None and shape[i] % self.mesh.shape[axis]:
                axis = None
            if axis is not None:
                used.add(axis)
            out.append(axis)
        # Canonical form: XLA hands back P() for P(None, None); jit caches by spec, so an
        # array created with one form and returned with the other would recompile.
        while out and out[-1] is None:
            out.pop()
        return PartitionSpec(*out)

    def sharding(self, axes: LogicalAxes, shape: tuple[int, ...] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def replicated_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def constrain(self, x: jax.Array, axes: LogicalAxes) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape))


_CURRENT: contextvars.ContextVar[ShardingRules | None] = contextvars.ContextVar(
    "meshserve_sharding_rules", default=None
)


@contextlib.contextmanager
def use_rules(rules: ShardingRules | None) -> Iterator[ShardingRules | None]:
    """Make `rules` the ones `constrain` uses while tracing inside this block."""
    token = _CURRENT.set(rules)
    try:
        yield rules
    finally:
        _CURRENT.reset(token)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Pin an activation's layout by logical names; no-op outside `use_rules`."""
    rules = _CURRENT.get()
    if rules is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"logical axes {tuple(axes)} do not match rank {x.ndim}")
    return rules.constrain(x, axes)
