"""Dense-cache generation: one batch, one fixed-size KV cache per sequence.

The simple path used for parity checks against `transformers`; the paged engine is the
serving path.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshserve.engine.experts import experts_backend
from meshserve.meshes import use_rules
from meshserve.models.dense_attention import DenseAttention, init_dense_cache
from meshserve.models.layers import Matmul, plain_matmul
from meshserve.models.loading import ShardedModel
from meshserve.models.moe import ExpertsFn


def _bucket(n: int, minimum: int = 8) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (an EOS/stop id) or "length"


class DenseGenerator:
    """Prefill and token-by-token decode of one right-padded batch."""

    def __init__(
        self, model: ShardedModel, matmul: Matmul = plain_matmul, experts: ExpertsFn | None = None
    ):
        """matmul: the projection matmul `model`'s weights were placed for; experts: the
        MoE layers' expert compute (default: expert parallel over the model's mesh)."""
        self.model = model
        self._windows = model.config.sliding_windows
        experts = experts or experts_backend(model.rules)

        def forward(params, tokens, positions, cache):
            module = nnx.merge(model.graphdef, params)
            attention = DenseAttention(positions, self._windows)
            return module(tokens, positions, cache, attention, matmul, experts)

        self._forward = jax.jit(forward, donate_argnums=(3,))
        self._new_cache = jax.jit(
            functools.partial(init_dense_cache, model.config, dtype=model.dtype),
            static_argnums=(0, 1),
        )

    def _run(self, fn, *args):
        with use_rules(self.model.rules):
            return fn(*args)

    def prefill_logits(self, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits at every position of each prompt, computed as one padded batch."""
        length = _bucket(max(len(p) for p in prompts))
        tokens = np.zeros((len(prompts), length), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
        cache = self._run(self._new_cache, len(prompts), length)
        logits, _ = self._run(self._forward, self.model.params, tokens, positions, cache)
        logits = np.asarray(logits)
        return [logits[i, : len(p)] for i, p in enumerate(prompts)]

    def generate(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] = (),
    ) -> Generation:
        cfg = self.model.config
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) + max_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model length {cfg.max_position_embeddings}"
            )
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})"
            )
        max_len = _bucket(len(prompt) + max_tokens)
        cache = self._run(self._new_cache, 1, max_len)
        prefill_len = _bucket(len(prompt))
        tokens = np.zeros((1, prefill_len), np.int32)
        tokens[0, : len(prompt)] = prompt
        positions = np.arange(prefill_len, dtype=np.int32)[None]
        logits, cache = self._run(self._forward, self.model.params, tokens, positions, cache)
        last = logits[0, len(prompt) - 1]
        key = jax.random.key(seed)
        out, logprobs = [], []
        stops = set(stop_token_ids)
        for step in range(max_tokens):
            key, sub = jax.random.split(key)
            token, logprob = _sample(last, sub, temperature)
            token = int(token)
            out.append(token)
            logprobs.append(float(logprob))
            if token in stops:
                return Generation(out, logprobs, "stop")
            if step + 1 == max_tokens:
                break
            pos = np.array([[len(prompt) + step]], np.int32)
            step_logits, cache = self._run(
                self._forward, self.model.params, np.array([[token]], np.int32), pos, cache
            )
            last = step_logits[0, 0]
        return Generation(out, logprobs, "length")


@functools.partial(jax.jit, static_argnums=(2,))
def _sample(logits: jax.Array, key: jax.Array, temperature: float):
    logp = jax.nn.log_softmax(logits)
    if temperature == 0.0:
        token = jnp.argmax(logits)
    else:
        token = jax.random.categorical(key, logits / temperature)
    return token, logp[token]
