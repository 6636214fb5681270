"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): router, top-k, expert compute.

The block routes (router in f32, softmax, top-k, optional renormalisation, exactly as
each family defines it) and hands the expert computation to an `ExpertsFn` the caller
passes in, as it passes attention and the projection matmul: the pure-JAX oracle below
(`dense_experts`, every expert on every token), the routing-following grouped compute
(`grouped_experts`, only the selected experts' weights are read), or the engine's
expert-parallel wrapper around either inside `shard_map`.

Dropless: every token reaches its k experts; nothing here has a capacity.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from meshserve.meshes import constrain
from meshserve.models.config import ModelConfig

EXPERT_IN_AXES = ("experts", "embed", "expert_mlp")
EXPERT_OUT_AXES = ("experts", "expert_mlp", "embed")


class ExpertsFn(Protocol):
    """x: [batch, seq, embed]; expert_ids, weights: [batch, seq, k] (global expert ids,
    combine weights). gate/up: [experts, embed, hidden], down: [experts, hidden, embed].
    Returns sum_j weights[..., j] * expert_{ids[..., j]}(x) as [batch, seq, embed]."""

    def __call__(
        self,
        x: jax.Array,
        expert_ids: jax.Array,
        weights: jax.Array,
        gate: jax.Array,
        up: jax.Array,
        down: jax.Array,
    ) -> jax.Array: ...


def route(
    x: jax.Array, router: jax.Array, k: int, normalize: bool
) -> tuple[jax.Array, jax.Array]:
    """Top-k experts and combine weights per token, in f32: softmax over all experts,
    top k, then (normalize) divided by their sum — Mixtral's and Qwen3-MoE's order."""
    logits = jnp.einsum("...e,ex->...x", x.astype(jnp.float32), router.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    top, ids = jax.lax.top_k(probs, k)
    if normalize:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), top


def _expert_mlp(x, gate, up, down):
    h = jax.nn.silu(x @ gate) * (x @ up)
    return h @ down


def dense_experts(x, expert_ids, weights, gate, up, down, first_expert=0) -> jax.Array:
    """Reference: every expert on every token, combined with one-hot weights. Cost grows
    with the expert count (what a routing-unaware implementation pays); the tests' oracle.
    first_expert: global id of gate[0] (experts outside this range contribute nothing)."""
    num = gate.shape[0]
    onehot = jax.nn.one_hot(expert_ids - first_expert, num, dtype=jnp.float32)
    combine = jnp.einsum("...kx,...k->...x", onehot, weights.astype(jnp.float32))
    h = jax.nn.silu(jnp.einsum("...e,xei->...xi", x, gate)) * jnp.einsum(
        "...e,xei->...xi", x, up
    )
    y = jnp.einsum("...xi,xie->...xe", h, down)
    return jnp.einsum("...xe,...x->...e", y.astype(jnp.float32), combine).astype(x.dtype)


def tile_rows(slots: int, experts: int) -> int:
    """Rows per tile of the grouped compute: about the mean rows an expert gets, at least
    8 and at most 128 (a power of two, so shapes stay few)."""
    mean = max(1, slots // max(1, experts))
    return min(128, max(8, 1 << (mean - 1).bit_length()))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Token slots sorted by expert into tiles of `rows` rows (one expert per tile, each
    expert's slots padded to whole tiles): the layout of a grouped matmul."""

    xp: jax.Array  # [max_tiles * rows, embed] the tokens of each padded row (0 if padding)
    src: jax.Array  # [max_tiles * rows] slot of each padded row (slots: padding)
    tile_expert: jax.Array  # [max_tiles] local expert of each tile
    rows_used: jax.Array  # [max_tiles] real rows in each tile
    num_tiles: jax.Array  # scalar: tiles holding any slot (the rest are never computed)


def plan_tiles(xs, expert_ids, num: int, first_expert, rows: int) -> TilePlan:
    """xs [tokens, embed], expert_ids [tokens, k] global ids; experts outside
    [first_expert, first_expert + num) (another device's) get no tile."""
    slots = expert_ids.size
    local = expert_ids.reshape(-1) - first_expert
    key = jnp.where((local >= 0) & (local < num), local, num)  # `num`: not ours
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=num + 1)[:num]
    tiles = (sizes + rows - 1) // rows
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    slot_start = jnp.cumsum(sizes) - sizes
    # Padded position of every sorted slot: its expert's first tile plus its rank.
    sorted_key = key[order]
    safe = jnp.minimum(sorted_key, num - 1)
    rank = jnp.arange(slots) - slot_start[safe]
    dest = jnp.where(sorted_key < num, tile_start[safe] * rows + rank, -1)
    max_tiles = math.ceil(slots / rows) + num  # static bound
    src = jnp.full((max_tiles * rows,), slots, jnp.int32).at[dest].set(
        order.astype(jnp.int32), mode="drop")
    valid = src < slots
    k = expert_ids.shape[-1]
    xp = jnp.where(valid[:, None], xs[jnp.where(valid, src // k, 0)], 0).astype(xs.dtype)
    tile = jnp.arange(max_tiles)
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, tile, side="right"), num - 1)
    rows_used = jnp.clip(sizes[tile_expert] - (tile - tile_start[tile_expert]) * rows, 0, rows)
    return TilePlan(xp, src, tile_expert.astype(jnp.int32), rows_used.astype(jnp.int32),
                    tile_end[-1])


def combine_tiles(plan: TilePlan, yp, weights, tokens: int) -> jax.Array:
    """Sum every real row's output, times its slot's weight, into its token ([tokens,
    embed], f32). Padding rows are selected away, not multiplied: a kernel may leave
    them unspecified (NaN included)."""
    k = weights.shape[-1]
    slots = tokens * k
    valid = plan.src < slots
    src = jnp.where(valid, plan.src, 0)
    w = weights.reshape(-1)[src]
    contrib = jnp.where(valid[:, None], yp.astype(jnp.float32) * w[:, None], 0.0)
    return jnp.zeros((tokens, yp.shape[-1]), jnp.float32).at[src // k].add(contrib)


def grouped_experts(
    x, expert_ids, weights, gate, up, down, first_expert=0, rows: int | None = None
) -> jax.Array:
    """Routing-following compute: token slots sorted by expert into tiles of `rows` rows,
    each tile one expert's MLP, the loop running only over tiles that hold tokens — so a
    decode step reads the selected experts' weights, not all of them. Slots routed to an
    expert outside [first_expert, first_expert + experts) (another device's) are skipped.
    The pure-JAX form of a grouped matmul (Megablox gmm / ragged_dot)."""
    shape = x.shape
    xs = x.reshape(-1, shape[-1])
    rows = rows or tile_rows(expert_ids.size, gate.shape[0])
    plan = plan_tiles(xs, expert_ids, gate.shape[0], first_expert, rows)

    def body(j, out):
        e = plan.tile_expert[j]
        xt = jax.lax.dynamic_slice_in_dim(plan.xp, j * rows, rows)
        yt = _expert_mlp(xt, gate[e], up[e], down[e])
        return jax.lax.dynamic_update_slice_in_dim(out, yt.astype(out.dtype), j * rows, 0)

    yp = jax.lax.fori_loop(0, plan.num_tiles, body, jnp.zeros_like(plan.xp))
    return combine_tiles(plan, yp, weights, xs.shape[0]).astype(x.dtype).reshape(shape)


class GroupMatmul(Protocol):
    """lhs [rows, k] sorted by group, rhs [groups, k, n], group_sizes [groups] →
    [rows, n]: row r times rhs[group of r]; rows past sum(group_sizes) are unspecified
    (`jax.lax.ragged_dot`'s contract, and Megablox `gmm`'s)."""

    def __call__(self, lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array: ...


def sorted_experts(
    x, expert_ids, weights, gate, up, down, first_expert=0, *, group_matmul: GroupMatmul,
    row_multiple: int = 1,
) -> jax.Array:
    """Expert compute as three grouped matmuls over the token slots sorted by expert:
    the form an accelerator's grouped-GEMM (ragged_dot on GPU, Megablox gmm on TPU) runs
    without padding each expert to whole tiles. Slots of experts outside
    [first_expert, first_expert + experts) sort last, outside every group, and are
    selected away with the unspecified rows past the groups (`row_multiple` pads the row
    count for kernels that tile it)."""
    shape, k, num = x.shape, expert_ids.shape[-1], gate.shape[0]
    xs = x.reshape(-1, shape[-1])
    local = expert_ids.reshape(-1) - first_expert
    key = jnp.where((local >= 0) & (local < num), local, num)
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=num + 1)[:num].astype(jnp.int32)
    slots = order.size
    padded = -(-slots // row_multiple) * row_multiple
    rows = jnp.pad(order, (0, padded - slots), constant_values=slots)
    valid = rows < slots
    lhs = jnp.where(valid[:, None], xs[jnp.where(valid, rows, 0) // k], 0).astype(x.dtype)
    h = jax.nn.silu(group_matmul(lhs, gate, sizes)) * group_matmul(lhs, up, sizes)
    y = group_matmul(h.astype(x.dtype), down, sizes)
    mine = valid & (key[jnp.where(valid, rows, 0)] < num)
    src = jnp.where(mine, rows, 0)
    w = weights.reshape(-1)[src]
    contrib = jnp.where(mine[:, None], y.astype(jnp.float32) * w[:, None], 0.0)
    out = jnp.zeros((xs.shape[0], shape[-1]), jnp.float32).at[src // k].add(contrib)
    return out.astype(x.dtype).reshape(shape)


class MoEBlock(nnx.Module):
    """Router + experts of one sparse layer. Expert weights are plain parameters (not
    `projection`s): the caller's `ExpertsFn` reads them, never the projection matmul."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, init):
        e, n, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.router = nnx.Param(init(rngs.params(), (e, n), dtype), axes=("embed", None))
        self.gate_proj = nnx.Param(init(rngs.params(), (n, e, i), dtype), axes=EXPERT_IN_AXES)
        self.up_proj = nnx.Param(init(rngs.params(), (n, e, i), dtype), axes=EXPERT_IN_AXES)
        self.down_proj = nnx.Param(init(rngs.params(), (n, i, e), dtype), axes=EXPERT_OUT_AXES)
        self.k = cfg.experts_per_token
        self.normalize = cfg.norm_topk_prob

    def __call__(self, x: jax.Array, experts: ExpertsFn) -> jax.Array:
        ids, weights = route(x, self.router[...], self.k, self.normalize)
        y = experts(x, ids, weights, self.gate_proj[...], self.up_proj[...], self.down_proj[...])
        return constrain(y, ("batch", "seq", "embed"))
