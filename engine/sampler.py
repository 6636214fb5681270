"""Per-row sampling on device: greedy, temperature, top-k, top-p, min-p, penalties,
seeded randomness and top-n logprobs, all in one batch.

Expensive parts (penalties, the vocabulary sort for top-k/top-p, random noise, top-n)
sit behind `lax.cond` on batch-wide flags, so a greedy batch pays only for an argmax.
Randomness depends only on (request seed, index of the token being generated), so a
seeded request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from meshserve.pallas_kernels.row_reductions import argmax_log_norm_reference, first_argmax

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """One row per sequence of the batch (leading dims [data, seqs])."""

    temperature: jax.Array  # f32; 0 = greedy
    top_p: jax.Array  # f32; 1 = off
    top_k: jax.Array  # i32; 0 = off
    min_p: jax.Array  # f32; 0 = off
    repetition_penalty: jax.Array  # f32; 1 = off
    presence_penalty: jax.Array  # f32; 0 = off
    frequency_penalty: jax.Array  # f32; 0 = off
    seed_lo: jax.Array  # u32 halves of the request's 64-bit seed
    seed_hi: jax.Array
    gen_index: jax.Array  # i32 index of the token being sampled within its request
    # Batch-wide switches (scalars) computed on the host.
    any_random: jax.Array
    any_filter: jax.Array
    any_penalty: jax.Array
    any_logprobs: jax.Array


def _row_keys(batch: SamplingBatch) -> jax.Array:
    def key(lo, hi, idx):
        k = jax.random.fold_in(jax.random.key(0x5EED), lo)
        return jax.random.fold_in(jax.random.fold_in(k, hi), idx)

    flat = [x.reshape(-1) for x in (batch.seed_lo, batch.seed_hi, batch.gen_index)]
    return jax.vmap(key)(*flat)


def _penalised(logits, batch: SamplingBatch, counts, seen):
    rp = batch.repetition_penalty[..., None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    counts = counts.astype(jnp.float32)
    logits = logits - batch.frequency_penalty[..., None] * counts
    return logits - batch.presence_penalty[..., None] * (counts > 0)


def _filtered_sample(scaled, batch: SamplingBatch, gumbel):
    """top-k and top-p over the sorted vocabulary, then Gumbel-max."""
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(scaled.shape[-1])
    top_k = batch.top_k[..., None]
    keep = (top_k == 0) | (rank < top_k)
    sorted_logits = jnp.where(keep, sorted_logits, NEG_INF)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    keep &= (before < batch.top_p[..., None]) | (rank == 0)
    sorted_logits = jnp.where(keep, sorted_logits, NEG_INF)
    noise = jnp.take_along_axis(gumbel, order, axis=-1)
    choice = first_argmax(sorted_logits + noise)
    return jnp.take_along_axis(order, choice[..., None], axis=-1)[..., 0]


def _random_sample(logits, batch: SamplingBatch):
    temp = jnp.where(batch.temperature > 0, batch.temperature, 1.0)[..., None]
    scaled = logits / temp
    probs = jax.nn.softmax(scaled, axis=-1)
    min_p = batch.min_p[..., None] * jnp.max(probs, axis=-1, keepdims=True)
    scaled = jnp.where(probs >= min_p, scaled, NEG_INF)
    keys = _row_keys(batch)
    vocab = logits.shape[-1]
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(keys)
    gumbel = gumbel.reshape(logits.shape)
    return jax.lax.cond(
        batch.any_filter,
        lambda: _filtered_sample(scaled, batch, gumbel),
        lambda: first_argmax(scaled + gumbel),
    )


def sample(logits: jax.Array, batch: SamplingBatch, statistics, num_top: int,
           argmax_log_norm: Callable = argmax_log_norm_reference):
    """logits [..., V] f32 → (tokens, chosen logprobs, top ids, top logprobs).

    Logprobs are the model's own (before penalties and temperature), as in vLLM.
    statistics() gives (counts, seen) rows like logits: how often each token was
    generated so far, and which tokens appeared in prompt or output. It is called only
    inside the penalty branch, so batches without penalties never gather them.
    argmax_log_norm: pallas_kernels.row_reductions' kernel or its reference.
    """
    # Only the normaliser is needed for the chosen token; full log-probabilities only for
    # top-n, inside its branch. The greedy token of unpenalised logits comes with it.
    raw = logits
    raw_greedy, log_norm = argmax_log_norm(raw)

    def penalised():
        out = _penalised(raw, batch, *statistics())
        return out, first_argmax(out)

    logits, greedy = jax.lax.cond(batch.any_penalty, penalised, lambda: (raw, raw_greedy))
    random = jax.lax.cond(batch.any_random, lambda: _random_sample(logits, batch), lambda: greedy)
    tokens = jnp.where(batch.temperature > 0, random, greedy).astype(jnp.int32)
    chosen = jnp.take_along_axis(raw, tokens[..., None], axis=-1)[..., 0] - log_norm
    shape = (*logits.shape[:-1], num_top)

    def top_n():
        values, ids = jax.lax.top_k(raw, num_top)
        return values - log_norm[..., None], ids

    top_lp, top_ids = jax.lax.cond(
        batch.any_logprobs,
        top_n,
        lambda: (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32)),
    )
    return tokens, chosen, top_ids.astype(jnp.int32), top_lp
