"""The model's attention over the paged KV cache, one ragged batch per data shard.

Each device runs the ragged paged attention kernel (TPU, GPU, or the C++ one on CPU) on
its own data shard's batch and its own kv heads inside `shard_map`, the way the kernels
want it; the pure-JAX reference runs under GSPMD.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from meshserve.engine.context_parallel import local_partial_attention
from meshserve.meshes import ShardingRules
from meshserve.models.config import ModelConfig
from meshserve.pallas_kernels.ragged_paged_attention import ragged_paged_attention, resolve_impl
from meshserve.pallas_kernels.ragged_paged_attention.dispatch import chosen_impl
from meshserve.pallas_kernels.ragged_paged_attention.reference import (
    merge_partials,
    write_kv_pages,
)

# Pages of all data shards in one axis: shard d owns rows [d*N, (d+1)*N) and its page
# tables hold local ids. Each device then sees exactly the [N, ...] array the kernels
# take, and on one device nothing slices the cache (a slice or reshape inside the decode
# loop makes XLA copy the whole cache every step).
# Context parallelism (`kv_split` > 1, S ways): within its data shard, page p lives on
# split device p % S at local row p // S (rows [s*N/S, (s+1)*N/S) of the shard belong to
# device s). The allocator hands a sequence consecutive ids, so its pages go round-robin:
# every device holds ~1/S of every sequence's KV whatever its length, and a decode step
# reads the same amount on each. Contiguous blocks would leave short sequences on one
# device and make that device the whole step's critical path.
CACHE_AXES = ("cache_pages", "page_slot", "kv_channels", "head_dim")


def cache_shape(cfg: ModelConfig, data: int, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (data * num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)


def init_paged_cache(
    cfg: ModelConfig, rules: ShardingRules, data: int, num_pages: int, page_size: int, dtype,
    stacked: bool = False,
) -> list[jax.Array]:
    """One [data*pages, page_size, 2*kv_heads, head_dim] array per layer, K/V interleaved.

    stacked (scanned layers, models.scan): one [data*layers*pages, ...] array instead.
    Data shard d owns rows [d*L*N, (d+1)*L*N); within them layer l's page p is row
    l*N + p, so a layer's pages are addressed by offsetting page ids (`layer_pages`) and
    every kernel, and the context-parallel round-robin split (N is a multiple of the
    split), work on it unchanged."""
    layers = 1 if stacked else cfg.num_layers
    per_array = num_pages * (cfg.num_layers if stacked else 1)
    shape = cache_shape(cfg, data, per_array, page_size)
    sharding = rules.sharding(CACHE_AXES, shape)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return [make() for _ in range(layers)]


def layer_pages(page_indices: jax.Array, layer: jax.Array, num_pages: int,
                num_layers: int) -> jax.Array:
    """Shard-local page ids of one layer of a stacked cache. Ids outside [0, num_pages)
    (padding) stay outside [0, num_layers*num_pages), so they still write nothing."""
    offset = jnp.where(page_indices < 0, 0,
                       jnp.where(page_indices >= num_pages, num_layers - 1, layer))
    return page_indices + offset * num_pages


@dataclasses.dataclass(frozen=True)
class AttentionSpecs:
    """Static description of how the attention's inputs are laid out on the mesh."""

    mesh: jax.sharding.Mesh
    q: PartitionSpec
    cache: PartitionSpec
    meta: PartitionSpec
    windows: tuple[int | None, ...]
    impl: str | None
    # Kernels (custom calls GSPMD cannot partition) run per device inside shard_map; the
    # reference runs under GSPMD.
    manual: bool
    # The mesh axis each sequence's pages are split over, and how many ways (1: none).
    kv_axis: str | None = None
    kv_ways: int = 1
    # q/k/v/out with their token dimension split as the model's activations are ("seq").
    q_tokens: PartitionSpec | None = None
    # Layers in one stacked cache (scanned layers; 0: one cache array per layer).
    stacked_layers: int = 0

    @classmethod
    def create(cls, rules: ShardingRules, cfg: ModelConfig, impl: str | None,
               stacked: bool = False) -> AttentionSpecs:
        return cls(
            mesh=rules.mesh,
            q=rules.spec(("batch", None, "heads", "head_dim")),
            cache=rules.spec(CACHE_AXES),
            meta=rules.spec(("batch",)),
            windows=cfg.sliding_windows,
            impl=impl,
            manual=resolve_impl(impl) != "reference",
            kv_axis=rules.mesh_axis("kv_split"),
            kv_ways=rules.axis_size("kv_split"),
            q_tokens=rules.spec(("batch", "seq", "heads", "head_dim")),
            stacked_layers=cfg.num_layers if stacked else 0,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedAttention:
    kv_lens: jax.Array  # [data, seqs]
    page_indices: jax.Array  # [data, seqs, pages_per_seq]
    cu_q_lens: jax.Array  # [data, seqs + 1]
    num_seqs: jax.Array  # [data, 1]
    specs: AttentionSpecs = dataclasses.field(metadata=dict(static=True))

    def __call__(self, layer, q, k, v, cache):
        s = self.specs
        data = q.shape[0]
        page_indices = self.page_indices
        if s.stacked_layers:  # a traced layer index (models.scan): uniform windows
            window = s.windows[0] if s.windows else None
            pages_per_layer = cache.shape[0] // (data * s.stacked_layers)
            page_indices = layer_pages(page_indices, layer, pages_per_layer, s.stacked_layers)
        else:
            window = s.windows[layer] if s.windows else None
        attend = functools.partial(ragged_paged_attention, sliding_window=window, impl=s.impl)
        meta = (self.kv_lens, page_indices, self.cu_q_lens, self.num_seqs)

        def one_shard(q, k, v, pages, *meta):
            # The token side has a leading data axis of 1; the pages are already local.
            out, pages = attend(q[0], k[0], v[0], pages, *(m[0] for m in meta))
            return out[None], pages

        if s.kv_ways > 1:
            m = s.meta
            # Tokens arrive split over the KV axis as the projections left them (one packed
            # all-gather inside beats GSPMD's three), unless the bucket does not divide.
            split = (s.q_tokens is not None and len(s.q_tokens) > 1
                     and s.q_tokens[1] == s.kv_axis and q.shape[1] % s.kv_ways == 0)
            qs = s.q_tokens if split else s.q
            return jax.shard_map(
                functools.partial(_split_shard, window=window, axis=s.kv_axis, ways=s.kv_ways,
                                  split_tokens=split, impl=s.impl),
                mesh=s.mesh,
                in_specs=(qs, qs, qs, s.cache, m, m, m, m),
                out_specs=(qs, s.cache),
                check_vma=False,
            )(q, k, v, cache, *meta)
        if s.mesh.size == 1:
            return one_shard(q, k, v, cache, *meta)
        if s.manual:  # kernels: each device runs its own shard's batch and kv heads
            m = s.meta
            return jax.shard_map(
                one_shard,
                mesh=s.mesh,
                in_specs=(s.q, s.q, s.q, s.cache, m, m, m, m),
                out_specs=(s.q, s.cache),
                check_vma=False,
            )(q, k, v, cache, *meta)
        if data == 1:
            return one_shard(q, k, v, cache, *meta)
        # Several data shards under GSPMD (the CPU path): batch them with vmap.
        pages = cache.reshape(data, -1, *cache.shape[1:])
        out, pages = jax.vmap(attend)(q, k, v, pages, *meta)
        return out, pages.reshape(cache.shape)


def _split_shard(q, k, v, pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, window, axis,
                 ways, split_tokens, impl):
    """One device of a KV split: write the tokens whose pages it owns, attend every query
    over the keys it holds, then merge the partials of all `ways` devices exactly.

    The local part is the selected kernel's page-mask + log-sum-exp path, or where the
    reference would run, the pure-JAX `context_parallel.local_partial_attention`, which
    visits only the device's own pages. With `split_tokens` each device holds 1/ways of
    the step's tokens: one all-gather of q|k|v brings all of them, and one all-to-all
    sends each device the partials (out | lse) of its own tokens, which it merges.
    Otherwise q/k/v arrive whole and one all-gather of (out | lse) lets every device
    merge all tokens."""
    if split_tokens:
        hq, hkv = q.shape[2], k.shape[2]
        qkv = jax.lax.all_gather(jnp.concatenate([q, k, v], axis=2), axis, axis=1, tiled=True)
        q, k, v = qkv[:, :, :hq], qkv[:, :, hq : hq + hkv], qkv[:, :, hq + hkv :]
    q, k, v = q[0], k[0], v[0]
    kv_lens, table, cu_q_lens, num_seqs = kv_lens[0], page_indices[0], cu_q_lens[0], num_seqs[0]
    owned = table % ways == jax.lax.axis_index(axis)
    local = table // ways
    if chosen_impl(impl, q, pages) != "reference":
        # Owned entries hold local rows; the kernel never reads (or writes through) others.
        out, lse, pages = ragged_paged_attention(
            q, k, v, pages, kv_lens, local, cu_q_lens, num_seqs, sliding_window=window,
            impl=impl, page_mask=owned, return_lse=True,
        )
    else:
        # Pages of other devices get an out-of-range id: kv_slot_mapping drops their writes.
        write = jnp.where(owned, local, pages.shape[0])
        pages = write_kv_pages(k, v, pages, kv_lens, write, cu_q_lens, num_seqs)
        out, lse = local_partial_attention(
            q, pages, kv_lens, table, cu_q_lens, num_seqs, ways=ways,
            index=jax.lax.axis_index(axis), sliding_window=window,
        )
    packed = jnp.concatenate([out, lse[..., None]], axis=-1)
    if split_tokens:  # [ways, T/ways, ...]: row d goes to device d, which gets its tokens
        packed = packed.reshape(ways, -1, *packed.shape[1:])
        parts = jax.lax.all_to_all(packed, axis, split_axis=0, concat_axis=0)
    else:
        parts = jax.lax.all_gather(packed, axis)
    out = merge_partials(parts[..., :-1], parts[..., -1])
    return out.astype(q.dtype)[None], pages
