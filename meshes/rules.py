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
# A logical axis maps to no mesh axis, one, or several (major to minor).
MeshAxes = str | tuple[str, ...] | None

# Megatron-style: attention heads and the MLP hidden dimension split over `tensor`
# (column-parallel in, row-parallel out); batches over `data`; experts over `expert`;
# long prompts over `sequence`.
DEFAULT_RULES: Mapping[str, MeshAxes] = {
    # parameters
    "vocab": "tensor",
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    # the leading axis of scanned (stacked) layer weights: every device holds every layer
    "layers": None,
    # activations
    "batch": "data",
    "seq": "sequence",
    # caches: each data shard owns its own page pool; pages hold kv heads split on tensor
    "cache_batch": "data",
    "cache_seq": None,
    # Pages also split over `sequence` (context parallelism): data shard d's page p lives
    # on its sequence device p % S, so each device holds ~1/S of every sequence's KV.
    "cache_pages": ("data", "sequence"),
    # The mesh axis one sequence's KV pages are split over (attention merges across it).
    "kv_split": "sequence",
    "page_slot": None,
    "kv_channels": "tensor",
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical-axis → mesh-axis mapping for one mesh and one model."""

    mesh: Mesh
    mapping: Mapping[str, MeshAxes]
    # Logical axes that had to be replicated because the model dimension does not divide.
    replicated: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(
        cls,
        mesh: Mesh,
        dims: Mapping[str, int] | None = None,
        overrides: Mapping[str, MeshAxes] | None = None,
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
            ways = _ways(mesh, axis)
            if size % ways:
                mapping[name] = None
                replicated[name] = f"{name}={size} does not divide {axis}={ways}"
        return cls(mesh=mesh, mapping=mapping, replicated=replicated)

    def axis_size(self, logical: str) -> int:
        """How many ways `logical` is split on this mesh."""
        return _ways(self.mesh, self.mapping.get(logical))

    def mesh_axis(self, logical: str) -> str | None:
        """The single mesh axis `logical` splits over, or None where it is not split (a
        collective or axis_index inside shard_map names it this way)."""
        axis = self.mapping.get(logical)
        if isinstance(axis, tuple):
            raise ValueError(f"logical axis {logical!r} maps to several mesh axes {axis}")
        return None if axis is None or self.mesh.shape[axis] == 1 else axis

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
        out: list[MeshAxes] = []
        for i, name in enumerate(axes):
            axis = None if name is None else self.mapping.get(name)
            if name is not None and name not in self.mapping:
                raise KeyError(f"unknown logical axis {name!r}")
            # Of several mesh axes keep the unused ones that split (size > 1); one left is
            # spelled as a plain name so specs stay as they were before tuples existed.
            parts = (axis,) if isinstance(axis, str) else (axis or ())
            parts = tuple(a for a in parts if a not in used and self.mesh.shape[a] > 1)
            axis = None if not parts else parts[0] if len(parts) == 1 else parts
            if axis is not None and shape is not None and shape[i] % _ways(self.mesh, axis):
                axis = None
            if axis is not None:
                used.update(parts)
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


def _ways(mesh: Mesh, axis: MeshAxes) -> int:
    if axis is None:
        return 1
    if isinstance(axis, str):
        return mesh.shape[axis]
    ways = 1
    for a in axis:
        ways *= mesh.shape[a]
    return ways


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
