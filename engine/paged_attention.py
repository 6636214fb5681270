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

from meshserve.meshes import ShardingRules
from meshserve.models.config import ModelConfig
from meshserve.pallas_kernels.ragged_paged_attention import ragged_paged_attention, resolve_impl

# Pages of all data shards in one axis: shard d owns rows [d*N, (d+1)*N) and its page
# tables hold local ids. Each device then sees exactly the [N, ...] array the kernels
# take, and on one device nothing slices the cache (a slice or reshape inside the decode
# loop makes XLA copy the whole cache every step).
CACHE_AXES = ("cache_pages", "page_slot", "kv_channels", "head_dim")


def cache_shape(cfg: ModelConfig, data: int, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (data * num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)


def init_paged_cache(
    cfg: ModelConfig, rules: ShardingRules, data: int, num_pages: int, page_size: int, dtype
) -> list[jax.Array]:
    """One [data*pages, page_size, 2*kv_heads, head_dim] array per layer, K/V interleaved."""
    shape = cache_shape(cfg, data, num_pages, page_size)
    sharding = rules.sharding(CACHE_AXES, shape)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return [make() for _ in range(cfg.num_layers)]


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

    @classmethod
    def create(cls, rules: ShardingRules, cfg: ModelConfig, impl: str | None) -> AttentionSpecs:
        return cls(
            mesh=rules.mesh,
            q=rules.spec(("batch", None, "heads", "head_dim")),
            cache=rules.spec(CACHE_AXES),
            meta=rules.spec(("batch",)),
            windows=cfg.sliding_windows,
            impl=impl,
            manual=resolve_impl(impl) != "reference",
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
        window = s.windows[layer] if s.windows else None
        attend = functools.partial(ragged_paged_attention, sliding_window=window, impl=s.impl)
        meta = (self.kv_lens, self.page_indices, self.cu_q_lens, self.num_seqs)
        data = q.shape[0]

        def one_shard(q, k, v, pages, *meta):
            # The token side has a leading data axis of 1; the pages are already local.
            out, pages = attend(q[0], k[0], v[0], pages, *(m[0] for m in meta))
            return out[None], pages

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
