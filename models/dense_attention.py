"""A dense per-sequence KV cache and the attention that uses it (the simple path).

The paged engine uses ragged paged attention instead; this one serves parity tests and
the offline single-request path.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from meshserve.meshes import constrain
from meshserve.models.config import ModelConfig

DenseLayerCache = tuple[jax.Array, jax.Array]  # k, v: [batch, max_len, kv_heads, head_dim]


def init_dense_cache(
    cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32
) -> list[DenseLayerCache]:
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    axes = ("cache_batch", "cache_seq", "kv_heads", "head_dim")
    return [
        (constrain(jnp.zeros(shape, dtype), axes), constrain(jnp.zeros(shape, dtype), axes))
        for _ in range(cfg.num_layers)
    ]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseAttention:
    """Writes the step's K/V at `positions`, then attends causally to earlier positions.

    Right-padded rows are fine: a padding token writes beyond its row's real length,
    where no real query looks until a real token has overwritten that slot.
    """

    positions: jax.Array  # [batch, seq] int32
    windows: tuple[int | None, ...] = dataclasses.field(metadata=dict(static=True))

    def __call__(self, layer, q, k, v, cache: DenseLayerCache):
        k_cache, v_cache = cache
        batch, seq, heads, dim = q.shape
        kv_heads = k.shape[2]
        rows = jnp.arange(batch)[:, None]
        k_cache = k_cache.at[rows, self.positions].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[rows, self.positions].set(v.astype(v_cache.dtype), mode="drop")
        qg = q.reshape(batch, seq, kv_heads, heads // kv_heads, dim).astype(jnp.float32)
        scores = jnp.einsum("bskgd,btkd->bkgst", qg, k_cache.astype(jnp.float32))
        scores = scores / math.sqrt(dim)
        key_pos = jnp.arange(k_cache.shape[1])
        visible = key_pos[None, None, :] <= self.positions[:, :, None]
        window = self.windows[layer] if self.windows else None
        if window is not None:
            visible &= key_pos[None, None, :] > self.positions[:, :, None] - window
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgst,btkd->bskgd", probs, v_cache.astype(jnp.float32))
        return out.reshape(batch, seq, heads, dim).astype(q.dtype), (k_cache, v_cache)
