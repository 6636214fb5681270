"""The MoE layers' expert compute on a mesh: expert parallelism inside `shard_map`.

Each device holds `experts / expert` experts (their hidden dimension split on `tensor`
too). Activations are replicated over the `expert` and `tensor` axes in this layout
(only `data` and `sequence` split tokens), so dispatch needs no collective: every device
already holds every token of its shard, computes the slots routed to its own experts
with the routing-following grouped compute, and one `psum` over expert × tensor
combines the partial outputs — the all-reduce a row-parallel dense MLP already pays
over `tensor`. The measured alternative (`dispatch="all_to_all"`, or
$MESHSERVE_EXPERTS_DISPATCH) splits the tokens over the expert devices and moves them
with `lax.all_to_all`; docs/design.md ("Mixture of experts") has why psum is the default.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from meshserve.meshes import ShardingRules
from meshserve.models.moe import (
    EXPERT_IN_AXES,
    EXPERT_OUT_AXES,
    ExpertsFn,
    grouped_experts,
    sorted_experts,
)

TOKEN_AXES = ("batch", "seq", None)

IMPL_ENV_VAR = "MESHSERVE_EXPERTS_IMPL"
# Compute per backend, all taking (x, ids, weights, gate, up, down, first_expert):
# the pure-JAX tiled loop (CPU), XLA's ragged_dot (GPU's grouped GEMM), Megablox gmm
# (TPU; "megablox-interpret" runs it in the Pallas interpreter, for tests on CPU).
IMPLS = ("grouped", "ragged_dot", "megablox", "megablox-interpret")
DEFAULT_BY_PLATFORM = {"cpu": "grouped", "gpu": "ragged_dot", "cuda": "ragged_dot",
                       "rocm": "ragged_dot", "tpu": "megablox"}


def _ragged_dot(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)


def _gmm_tile(dim: int, widest: int) -> int:
    """The widest power-of-two tile (≥ 128, ≤ widest) dividing `dim`, else `dim` whole:
    Mosaic wants lane tiles that are multiples of 128 or the full dimension."""
    tile = widest
    while tile >= 128:
        if dim % tile == 0:
            return tile
        tile //= 2
    return dim


def _megablox(interpret: bool, rows: int):
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    def group_matmul(lhs, rhs, group_sizes):
        tiling = (rows, _gmm_tile(lhs.shape[1], 512), _gmm_tile(rhs.shape[2], 512))
        return gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32,
                   tiling=tiling, interpret=interpret)

    return group_matmul


def expert_compute(impl: str) -> ExpertsFn:
    """The per-device expert compute named `impl` (one of IMPLS)."""
    if impl == "grouped":
        return grouped_experts
    if impl == "ragged_dot":
        return functools.partial(sorted_experts, group_matmul=_ragged_dot)
    if impl in ("megablox", "megablox-interpret"):
        rows = 128  # Megablox's row tile; the sorted slots are padded to a multiple
        return functools.partial(sorted_experts, row_multiple=rows,
                                 group_matmul=_megablox(impl.endswith("interpret"), rows))
    raise ValueError(f"unknown experts implementation {impl!r}; choose from {IMPLS}")


def default_impl(mesh: Mesh) -> str:
    """$MESHSERVE_EXPERTS_IMPL, else the mesh's platform's grouped GEMM."""
    chosen = os.environ.get(IMPL_ENV_VAR, "").strip()
    if chosen:
        if chosen not in IMPLS:
            raise ValueError(f"{IMPL_ENV_VAR}={chosen!r}: choose from {IMPLS}")
        return chosen
    platform = mesh.devices.flat[0].platform
    return DEFAULT_BY_PLATFORM.get(platform, "grouped")


DISPATCH_ENV_VAR = "MESHSERVE_EXPERTS_DISPATCH"
# How tokens reach their experts' devices and come back (docs/design.md, "Mixture of
# experts", has the measured comparison): "psum" (every device already holds every token;
# one all-reduce over expert × tensor combines) or "all_to_all" (tokens split over the
# expert devices, all-to-all there and back, an all-gather restores the replicated
# activations attention here expects).
DISPATCHES = ("psum", "all_to_all")


def default_dispatch() -> str:
    """$MESHSERVE_EXPERTS_DISPATCH, else psum (the one chosen by measuring)."""
    chosen = os.environ.get(DISPATCH_ENV_VAR, "").strip() or "psum"
    if chosen not in DISPATCHES:
        raise ValueError(f"{DISPATCH_ENV_VAR}={chosen!r}: choose from {DISPATCHES}")
    return chosen


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """An `ExpertsFn` that runs `compute` per device on its own experts, dispatching and
    combining by `dispatch` (one of DISPATCHES)."""

    mesh: Mesh
    w_in: PartitionSpec
    w_out: PartitionSpec
    expert_axes: tuple[str, ...]  # mesh axes the experts dimension is split over
    reduce_axes: tuple[str, ...]  # expert × tensor: where partial outputs are summed
    tensor_axes: tuple[str, ...]  # expert_mlp's: where one expert's partials are summed
    rules: ShardingRules
    compute: ExpertsFn = grouped_experts
    dispatch: str = "psum"

    @classmethod
    def create(cls, rules: ShardingRules, compute: ExpertsFn = grouped_experts,
               dispatch: str = "psum") -> ExpertParallel:
        if dispatch not in DISPATCHES:
            raise ValueError(f"unknown expert dispatch {dispatch!r}; choose from {DISPATCHES}")
        expert_axes = rules.mesh_axes(("experts",))
        if len(expert_axes) > 1:
            raise ValueError(f"experts split over several mesh axes {expert_axes}")
        return cls(
            compute=compute,
            mesh=rules.mesh,
            w_in=rules.spec(EXPERT_IN_AXES),
            w_out=rules.spec(EXPERT_OUT_AXES),
            expert_axes=expert_axes,
            reduce_axes=rules.mesh_axes(("experts", "expert_mlp")),
            tensor_axes=tuple(a for a in rules.mesh_axes(("expert_mlp",))
                              if a not in expert_axes),
            rules=rules,
            dispatch=dispatch,
        )

    def __call__(self, x, expert_ids, weights, gate, up, down):
        if self.mesh.size == 1:
            return self.compute(x, expert_ids, weights, gate, up, down)
        tokens = self.rules.spec(TOKEN_AXES, x.shape)
        a2a = self.dispatch == "all_to_all" and bool(self.expert_axes)

        def local(x, ids, w, gate, up, down):
            if a2a:
                return self._all_to_all(x, ids, w, gate, up, down)
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

    def _all_to_all(self, x, ids, w, gate, up, down):
        """Per device: its 1/X of the tokens (X expert devices), each sent once to every
        expert device that owns one of its k experts, computed there, sent back.

        Capacity: a fixed `rows` = the source's token count per (source, destination)
        pair. A token goes to a device at most once (with the ids and weights of all its
        k slots; the destination computes only the slots of its own experts), so no pair
        can ever need more: dropless at every size, nothing to count. Static shapes make
        `all_to_all` move the whole capacity whatever the routing (a ragged all-to-all
        would move only the rows used; XLA:CPU cannot run one)."""
        (axis,) = self.expert_axes
        ways = self.mesh.shape[axis]
        local_experts = gate.shape[0]
        shape, k = x.shape, ids.shape[-1]
        xs, ids, w = x.reshape(-1, shape[-1]), ids.reshape(-1, k), w.reshape(-1, k)
        n = xs.shape[0]
        rows = -(-n // ways)
        pad = rows * ways - n
        me = jax.lax.axis_index(axis)

        def mine(a, fill):  # attention ran replicated over `expert`: take this one's slice
            a = jnp.pad(a, ((0, pad), (0, 0)), constant_values=fill)
            return jax.lax.dynamic_slice_in_dim(a, me * rows, rows)

        xs, ids, w = mine(xs, 0), mine(ids, -1), mine(w, 0)
        dest = jnp.where(ids >= 0, ids // local_experts, -1)  # [rows, k]
        needed = jnp.any(dest[None] == jnp.arange(ways)[:, None, None], axis=-1)  # [ways, rows]
        send_x = jnp.where(needed[..., None], xs[None], 0).astype(x.dtype)
        # A row a device does not need is blanked (ids -1: no expert's); a needed row
        # keeps all k slots, the receiver skips those of other devices' experts.
        send_ids = jnp.where(needed[..., None], ids[None], -1)
        send_w = jnp.where(needed[..., None], w[None], 0)
        # Ids travel as f32 beside the weights (exact below 2^24): one all-to-all, not two.
        routing = jnp.concatenate([send_ids.astype(jnp.float32), send_w.astype(jnp.float32)], -1)
        recv_x = jax.lax.all_to_all(send_x.reshape(ways * rows, -1), axis, 0, 0, tiled=True)
        recv_r = jax.lax.all_to_all(routing.reshape(ways * rows, -1), axis, 0, 0, tiled=True)
        recv_ids = recv_r[:, :k].astype(jnp.int32)
        recv_w = recv_r[:, k:].astype(w.dtype)
        y = self.compute(recv_x[None], recv_ids[None], recv_w[None], gate, up, down,
                         first_expert=me * local_experts)[0]
        back = jax.lax.all_to_all(y, axis, 0, 0, tiled=True)  # [ways * rows, embed]
        out = jnp.sum(back.reshape(ways, rows, -1).astype(jnp.float32), axis=0)
        if self.tensor_axes:
            out = jax.lax.psum(out, self.tensor_axes)
        out = jax.lax.all_gather(out.astype(x.dtype), axis, axis=0, tiled=True)
        return out[:n].reshape(shape)


def experts_backend(rules: ShardingRules, impl: str | None = None,
                    dispatch: str | None = None) -> ExpertsFn:
    """The expert compute for a model placed with `rules`: `impl` (default: by platform,
    see `default_impl`) on each device's own experts, dispatched by `dispatch` (default:
    `default_dispatch`)."""
    return ExpertParallel.create(rules, expert_compute(impl or default_impl(rules.mesh)),
                                 dispatch or default_dispatch())


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
