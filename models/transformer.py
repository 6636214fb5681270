"""The decoder, written once for Llama, Mistral, Qwen2/3 and the MoE families (Mixtral,
Qwen3-MoE)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshserve.meshes import constrain
from meshserve.models.config import ModelConfig, rope_inverse_frequencies
from meshserve.models.layers import (
    AttentionFn,
    DecoderLayer,
    Matmul,
    RMSNorm,
    dense,
    param,
    plain_matmul,
    projection,
    rope_cos_sin,
)
from meshserve.models.moe import ExpertsFn, grouped_experts
from meshserve.models.scan import ScannedLayers


class Transformer(nnx.Module):
    """tokens/positions [batch, seq] → hidden states → logits.

    The KV cache is a list (one entry per layer) owned by the caller and threaded through
    `attention`, so dense, paged and kernel-backed caches share this one model. With its
    layers stacked (`models.scan.stack_layers`) the list holds one entry for all layers
    and `attention` gets the layer index as a traced scalar.
    """

    def __init__(
        self, cfg: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs, init_std: float = 0.02
    ):
        init = nnx.initializers.normal(init_std)
        self.config = cfg
        self.embed = param(rngs, init, (cfg.vocab_size, cfg.hidden_size), dtype, ("vocab", "embed"))
        self.layers = nnx.List(
            [DecoderLayer(cfg, i, dtype, rngs, init) for i in range(cfg.num_layers)]
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = projection(
                rngs, init, (cfg.hidden_size, cfg.vocab_size), dtype, ("embed", "vocab")
            )

    def hidden(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: Sequence[Any],
        attention: AttentionFn,
        rope: tuple[jax.Array, jax.Array] | None = None,
        matmul: Matmul = plain_matmul,
        experts: ExpertsFn = grouped_experts,
    ) -> tuple[jax.Array, list[Any]]:
        """rope: `self.rope(positions)` if the caller has it already. XLA fuses cos/sin
        into every layer's RoPE and evaluates them there per head, so a decode loop that
        computes them once per step outside this function saves that work.
        matmul: how the projections are multiplied (the caller placed their weights).
        experts: how MoE layers run their experts (`models.moe.ExpertsFn`)."""
        x = jnp.take(self.embed[...], tokens, axis=0)
        x = constrain(x, ("batch", "seq", "embed"))
        cos, sin = self.rope(positions) if rope is None else rope
        if isinstance(self.layers, ScannedLayers):  # models.scan: one stacked cache
            x, stacked = self.layers(x, cos, sin, cache[0], attention, matmul, experts)
            return self.final_norm(x), [stacked]
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, layer_cache = layer(x, cos, sin, layer_cache, attention, matmul, experts)
            new_cache.append(layer_cache)
        return self.final_norm(x), new_cache

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """RoPE cos/sin tables for `positions` (shape positions.shape + [head_dim])."""
        return rope_cos_sin(positions, self._inv_freq())

    def _inv_freq(self) -> jax.Array:
        # A trace-time constant, not a parameter: checkpoints never carry it.
        return jnp.asarray(np.array(rope_inverse_frequencies(self.config), np.float32))

    def logits(self, hidden: jax.Array, matmul: Matmul = plain_matmul) -> jax.Array:
        """f32 logits for hidden states of any leading shape."""
        if self.config.tie_word_embeddings:
            out = jnp.einsum("...e,ve->...v", hidden, self.embed[...])
        else:
            out = dense(hidden, self.lm_head, matmul)
        return out.astype(jnp.float32)

    def __call__(self, tokens, positions, cache, attention: AttentionFn,
                 matmul: Matmul = plain_matmul, experts: ExpertsFn = grouped_experts):
        hidden, cache = self.hidden(tokens, positions, cache, attention, matmul=matmul,
                                    experts=experts)
        return self.logits(hidden, matmul), cache
