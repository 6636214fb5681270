"""Building blocks of the decoder: norms, rotary embeddings, attention and MLP projections.

Every parameter carries its logical axes in the `axes` metadata; `meshes.ShardingRules`
turns them into shardings. Activations are pinned with `meshes.constrain`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from meshserve.meshes import constrain
from meshserve.models.config import ModelConfig
from meshserve.models.moe import ExpertsFn, MoEBlock, grouped_experts

Initializer = Callable[..., jax.Array]


class AttentionFn(Protocol):
    """Attention with a KV cache the caller owns (dense, paged, kernel-backed...).

    q: [batch, seq, heads, head_dim] after RoPE; k, v: [batch, seq, kv_heads, head_dim].
    Returns the attention output shaped like q and the updated cache of this layer.
    """

    def __call__(
        self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, cache: Any
    ) -> tuple[jax.Array, Any]: ...


class Matmul(Protocol):
    """The projection matmul the caller hands the model, as it hands it `AttentionFn`.

    x: [M, K]; w: a projection weight (a `projection` parameter, K·N elements) as the
    caller placed it. Returns x times w as [M, N].
    """

    def __call__(self, x: jax.Array, w: jax.Array, k: int, n: int) -> jax.Array: ...


def plain_matmul(x: jax.Array, w: jax.Array, k: int, n: int) -> jax.Array:
    return x @ w.reshape(k, n)


def dense(x: jax.Array, w: nnx.Param, matmul: Matmul = plain_matmul) -> jax.Array:
    """x [..., *w.shape[:contract]] times the projection w -> [..., *w.shape[contract:]],
    as one [M, K] x [K, N] matmul (free reshapes of row-major arrays: with several
    contracting dims XLA:CPU transposed a weight copy on every call)."""
    contract = w.get_metadata()["contract"]
    value = w[...]
    k, n = math.prod(value.shape[:contract]), math.prod(value.shape[contract:])
    lead = x.shape[: x.ndim - contract]
    y = matmul(x.reshape(-1, k), value, k, n)
    return y.reshape(*lead, *value.shape[contract:])


def param(rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], dtype, axes) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), axes=tuple(axes))


def projection(
    rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], dtype, axes, contract: int = 1
) -> nnx.Param:
    """A weight the model only ever applies through `dense`, contracting its first
    `contract` dims (metadata a caller's `Matmul` may rely on)."""
    return nnx.Param(init(rngs.params(), shape, dtype), axes=tuple(axes), contract=contract)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs, axis: str = "embed"):
        # Random norm weights around 1 make test models sensitive to every weight.
        self.weight = param(
            rngs,
            lambda k, s, d: (1.0 + 0.1 * jax.random.normal(k, s)).astype(d),
            (dim,),
            dtype,
            (axis,),
        )
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape positions.shape + [head_dim], HF's concatenated-halves layout."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [..., seq, heads, head_dim]; cos/sin: [..., seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs: nnx.Rngs, init: Initializer):
        e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.layer = layer
        self.q_proj = projection(rngs, init, (e, h, d), dtype, ("embed", "heads", "head_dim"))
        self.k_proj = projection(rngs, init, (e, k, d), dtype, ("embed", "kv_heads", "head_dim"))
        self.v_proj = projection(rngs, init, (e, k, d), dtype, ("embed", "kv_heads", "head_dim"))
        self.o_proj = projection(
            rngs, init, (h, d, e), dtype, ("heads", "head_dim", "embed"), contract=2
        )
        if cfg.qkv_bias:
            self.q_bias = param(rngs, init, (h, d), dtype, ("heads", "head_dim"))
            self.k_bias = param(rngs, init, (k, d), dtype, ("kv_heads", "head_dim"))
            self.v_bias = param(rngs, init, (k, d), dtype, ("kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs, axis="head_dim")
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs, axis="head_dim")
        self.qkv_bias = cfg.qkv_bias
        self.qk_norm = cfg.qk_norm

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        cache: Any,
        attention: AttentionFn,
        matmul: Matmul = plain_matmul,
    ) -> tuple[jax.Array, Any]:
        q = dense(x, self.q_proj, matmul)
        k = dense(x, self.k_proj, matmul)
        v = dense(x, self.v_proj, matmul)
        if self.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        out, cache = attention(self.layer, q, k, v, cache)
        out = constrain(out.astype(x.dtype), ("batch", "seq", "heads", "head_dim"))
        y = dense(out, self.o_proj, matmul)
        return constrain(y, ("batch", "seq", "embed")), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, init: Initializer):
        e, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = projection(rngs, init, (e, i), dtype, ("embed", "mlp"))
        self.up_proj = projection(rngs, init, (e, i), dtype, ("embed", "mlp"))
        self.down_proj = projection(rngs, init, (i, e), dtype, ("mlp", "embed"))

    def __call__(self, x: jax.Array, matmul: Matmul = plain_matmul) -> jax.Array:
        gate = dense(x, self.gate_proj, matmul)
        up = dense(x, self.up_proj, matmul)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return constrain(dense(hidden, self.down_proj, matmul), ("batch", "seq", "embed"))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs: nnx.Rngs, init: Initializer):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        self.attn = Attention(cfg, layer, dtype, rngs, init)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        self.sparse = cfg.is_moe(layer)
        self.mlp = MoEBlock(cfg, dtype, rngs, init) if self.sparse else MLP(cfg, dtype, rngs, init)

    def __call__(self, x, cos, sin, cache, attention: AttentionFn, matmul: Matmul = plain_matmul,
                 experts: ExpertsFn = grouped_experts):
        h, cache = self.attn(self.input_norm(x), cos, sin, cache, attention, matmul)
        x = x + h
        normed = self.post_attn_norm(x)
        y = self.mlp(normed, experts) if self.sparse else self.mlp(normed, matmul)
        return x + y, cache
