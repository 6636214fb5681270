"""The compiled engine step: one ragged mixed step, or K decode steps in one loop.

Inputs are bucketed ([data, tokens], [data, seqs]) so a handful of compilations serve
every batch composition. The KV cache and the per-slot token statistics are donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from engine.packing import model_context
from engine.paged_attention import CACHE_AXES, AttentionSpecs, PagedAttention
from engine.sampler import SamplingBatch, sample
from meshes import ShardingRules
from models.loading import ShardedModel
from pallas_kernels import row_reductions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Host-built arrays; leading dims [data, ...]. T = token bucket, S = seq bucket."""

    tokens: jax.Array  # [D, T] i32
    positions: jax.Array  # [D, T] i32
    token_slot: jax.Array  # [D, T] i32 slot of each token's sequence (max_seqs for padding)
    token_is_output: jax.Array  # [D, T] bool: the token was generated (counts for penalties)
    cu_q_lens: jax.Array  # [D, S + 1]
    kv_lens: jax.Array  # [D, S]
    page_indices: jax.Array  # [D, S, P]
    num_seqs: jax.Array  # [D, 1]
    slot_ids: jax.Array  # [D, S] slot of each batch row
    reset_slots: jax.Array  # [D, max_seqs] bool: clear statistics of newly admitted slots
    stop_ids: jax.Array  # [D, S, max_stop_ids] (-1 padding)
    remaining: jax.Array  # [D, S] tokens this row may still produce in this call
    sampling: SamplingBatch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutputs:
    tokens: jax.Array  # [K, D, S]
    logprobs: jax.Array  # [K, D, S]
    top_ids: jax.Array  # [K, D, S, N]
    top_logprobs: jax.Array  # [K, D, S, N]
    steps: jax.Array  # scalar: iterations actually run


def _record_tokens(counts, seen, inp: StepInputs, tokens, first):
    """Reset new slots (on the first iteration only), then count the tokens fed this
    step into their slot's rows."""
    reset = inp.reset_slots & first
    any_reset = jnp.any(reset)
    counts = jax.lax.cond(any_reset, lambda: jnp.where(reset[..., None], 0, counts), lambda: counts)
    seen = jax.lax.cond(any_reset, lambda: jnp.where(reset[..., None], False, seen), lambda: seen)
    data = jnp.arange(tokens.shape[0])[:, None]
    counts = counts.at[data, inp.token_slot, tokens].add(
        inp.token_is_output.astype(counts.dtype), mode="drop"
    )
    seen = seen.at[data, inp.token_slot, tokens].set(True, mode="drop")
    return counts, seen


class StepFunctions:
    """Jitted step and decode loop for one model on one mesh, with a compile counter."""

    def __init__(self, model: ShardedModel, specs: AttentionSpecs, num_top: int, decode_steps: int):
        self.model = model
        self.rules: ShardingRules = model.rules
        self._specs = specs
        self._num_top = num_top
        self._decode_steps = decode_steps
        # The kernel where the packed matmul runs (one CPU device: GSPMD cannot partition a
        # custom call), the reference elsewhere.
        fast = model.packed and row_reductions.available()
        self._argmax_log_norm = (
            row_reductions.argmax_log_norm if fast else row_reductions.argmax_log_norm_reference
        )
        self._mixed = jax.jit(self._mixed_impl, donate_argnums=(1, 2, 3))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1, 2, 3))

    @property
    def compiles(self) -> int:
        """Executables compiled so far: one per distinct input signature *and* input
        shardings (a Python-side trace counter would miss sharding-only recompiles)."""
        return self._mixed._cache_size() + self._decode._cache_size()

    def _forward_sample(
        self,
        params,
        kv,
        counts,
        seen,
        inp: StepInputs,
        tokens,
        positions,
        kv_lens,
        gen_index,
        first,
        rope=None,
    ):
        module = nnx.merge(self.model.graphdef, params)
        attention = PagedAttention(
            kv_lens, inp.page_indices, inp.cu_q_lens, inp.num_seqs, self._specs
        )
        counts, seen = _record_tokens(counts, seen, inp, tokens, first)
        hidden, kv = module.hidden(tokens, positions, kv, attention, rope)
        last = jnp.maximum(inp.cu_q_lens[:, 1:] - 1, 0)
        rows = jnp.take_along_axis(hidden, last[..., None], axis=1)
        logits = module.logits(rows)
        data = jnp.arange(counts.shape[0])[:, None]
        batch = dataclasses.replace(inp.sampling, gen_index=gen_index)
        out = sample(
            logits,
            batch,
            lambda: (counts[data, inp.slot_ids], seen[data, inp.slot_ids]),
            self._num_top,
            self._argmax_log_norm,
        )
        return kv, counts, seen, out

    def _mixed_impl(self, params, kv, counts, seen, inp: StepInputs):
        kv, counts, seen, (tok, lp, top_ids, top_lp) = self._forward_sample(
            params,
            kv,
            counts,
            seen,
            inp,
            inp.tokens,
            inp.positions,
            inp.kv_lens,
            inp.sampling.gen_index,
            True,
        )
        out = StepOutputs(tok[None], lp[None], top_ids[None], top_lp[None], jnp.int32(1))
        return (*self._pin_state(kv, counts, seen), out)

    def _decode_impl(self, params, kv, counts, seen, inp: StepInputs):
        """Up to K decode steps; a row stops at a stop id or after `remaining` tokens, and
        from then on rewrites its own last slot so it never touches pages it lacks."""
        k = self._decode_steps
        d, s = inp.kv_lens.shape
        n = self._num_top
        valid = jnp.arange(s)[None, :] < inp.num_seqs
        outputs = StepOutputs(
            jnp.zeros((k, d, s), jnp.int32),
            jnp.zeros((k, d, s), jnp.float32),
            jnp.zeros((k, d, s, n), jnp.int32),
            jnp.zeros((k, d, s, n), jnp.float32),
            jnp.int32(0),
        )

        module = nnx.merge(self.model.graphdef, params)

        # The RoPE tables ride in the carry, each computed once per iteration: inside the
        # model XLA would evaluate cos/sin again for every head of every layer.
        def body(carry):
            i, kv, counts, seen, tokens, kv_lens, rope, done, out = carry
            kv, counts, seen, (tok, lp, top_ids, top_lp) = self._forward_sample(
                params,
                kv,
                counts,
                seen,
                inp,
                tokens,
                kv_lens - 1,
                kv_lens,
                inp.sampling.gen_index + i,
                i == 0,
                rope,
            )
            stopped = jnp.any(tok[..., None] == inp.stop_ids, axis=-1)
            done = done | stopped | (i + 1 >= inp.remaining)
            kv_lens = jnp.where(done, kv_lens, kv_lens + 1)
            out = StepOutputs(
                out.tokens.at[i].set(tok),
                out.logprobs.at[i].set(lp),
                out.top_ids.at[i].set(top_ids),
                out.top_logprobs.at[i].set(top_lp),
                i + 1,
            )
            return i + 1, kv, counts, seen, tok, kv_lens, module.rope(kv_lens - 1), done, out

        def cond(carry):
            i, *_, done, _ = carry
            return (i < k) & jnp.any(valid & ~done)

        rope = module.rope(inp.kv_lens - 1)
        carry = (jnp.int32(0), kv, counts, seen, inp.tokens, inp.kv_lens, rope, ~valid, outputs)
        _, kv, counts, seen, _, _, _, _, out = jax.lax.while_loop(cond, body, carry)
        return (*self._pin_state(kv, counts, seen), out)

    def _pin_state(self, kv, counts, seen):
        """Return the donated state in exactly the shardings it was created with: else
        GSPMD may pick others (counts split over vocab, say), and the next call sees new
        input shardings and compiles again — warm-up would not cover real traffic."""
        kv = [self.rules.constrain(layer, CACHE_AXES) for layer in kv]
        stats = ("cache_batch", None, None)
        return kv, self.rules.constrain(counts, stats), self.rules.constrain(seen, stats)

    def run(self, kv, counts, seen, inp: StepInputs, decode: bool):
        fn: Callable = self._decode if decode else self._mixed
        with model_context(self.model):
            return fn(self.model.params, kv, counts, seen, inp)
