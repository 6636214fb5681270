"""The compiled engine step: one ragged mixed step, or K decode steps in one loop.

Inputs are bucketed ([data, tokens], [data, seqs]) so a handful of compilations serve
every batch composition. The KV cache and the per-slot token statistics are donated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshserve.engine.experts import RoutingCounter, experts_backend
from meshserve.engine.packing import single_cpu_device
from meshserve.engine.paged_attention import CACHE_AXES, AttentionSpecs, PagedAttention
from meshserve.engine.sampler import SamplingBatch, sample
from meshserve.meshes import ShardingRules, use_rules
from meshserve.models.layers import Matmul, plain_matmul
from meshserve.models.loading import ShardedModel
from meshserve.models.moe import ExpertsFn
from meshserve.pallas_kernels import row_reductions


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
    # Decode loop chained behind the previous one (planned before its results were read):
    # the row of that call's outputs whose last token this row feeds, else -1.
    prev_row: jax.Array  # [D, S] i32
    sampling: SamplingBatch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutputs:
    tokens: jax.Array  # [K, D, S]
    logprobs: jax.Array  # [K, D, S]
    top_ids: jax.Array  # [K, D, S, N]
    top_logprobs: jax.Array  # [K, D, S, N]
    steps: jax.Array  # scalar: iterations actually run
    last_tokens: jax.Array  # [D, S] each row's last sampled token (what a chained call feeds)
    stopped: jax.Array  # [D, S] the row met a stop id (or was padding, or started stopped)
    # MoE models only (None otherwise, so dense programs are unchanged): token slots of
    # real tokens routed to each expert in this call, [D, moe_layers, experts] i32.
    expert_tokens: jax.Array | None = None


def _count(counts, seen, slot, tokens, fed):
    data = jnp.arange(tokens.shape[0])[:, None]
    counts = counts.at[data, slot, tokens].add(fed.astype(counts.dtype), mode="drop")
    return counts, seen.at[data, slot, tokens].set(True, mode="drop")


def _record_tokens(rules: ShardingRules, counts, seen, inp: StepInputs, tokens, first):
    """Reset new slots (on the first iteration only), then count the tokens fed this
    step into their slot's rows."""
    reset = inp.reset_slots & first
    any_reset = jnp.any(reset)
    counts = jax.lax.cond(any_reset, lambda: jnp.where(reset[..., None], 0, counts), lambda: counts)
    seen = jax.lax.cond(any_reset, lambda: jnp.where(reset[..., None], False, seen), lambda: seen)
    args = (counts, seen, inp.token_slot, tokens, inp.token_is_output)
    if rules.mesh.size == 1:
        return _count(*args)
    # Per data shard in shard_map: left to GSPMD, the scatter's indices were split over
    # the other axes too and put back with permutes, an all-gather and an all-reduce of
    # the whole table per step (docs/benchmarks.md, the MoE layouts).
    stats = rules.spec(("cache_batch", None, None), counts.shape)
    rows = rules.spec(("cache_batch", None), tokens.shape)
    return jax.shard_map(_count, mesh=rules.mesh, in_specs=(stats, stats, rows, rows, rows),
                         out_specs=(stats, stats), check_vma=False)(*args)


class StepFunctions:
    """Jitted step and decode loop for one model on one mesh, with a compile counter."""

    def __init__(
        self,
        model: ShardedModel,
        specs: AttentionSpecs,
        num_top: int,
        decode_steps: int,
        matmul: Matmul = plain_matmul,
        experts: ExpertsFn | None = None,
    ):
        self.model = model
        self._matmul = matmul
        self._experts = experts or experts_backend(model.rules)
        self.rules: ShardingRules = model.rules
        self._specs = specs
        self._num_top = num_top
        self._decode_steps = decode_steps
        # The CPU kernel on one CPU device (GSPMD cannot partition a custom call), the
        # reference elsewhere.
        fast = single_cpu_device(model.rules.mesh) and row_reductions.available()
        self._argmax_log_norm = (
            row_reductions.argmax_log_norm if fast else row_reductions.argmax_log_norm_reference
        )
        self._mixed = jax.jit(self._mixed_impl, donate_argnums=(1, 2, 3))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1, 2, 3))
        self._zeros: dict[tuple, tuple[jax.Array, jax.Array]] = {}
        self._num_experts = model.config.num_experts if model.config.moe_layers else 0

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
        real,
        rope=None,
    ):
        """real [D, T]: the tokens that are traffic (MoE routing counts only them)."""
        module = nnx.merge(self.model.graphdef, params)
        experts = self._experts
        if self._num_experts:
            experts = RoutingCounter(experts, self._num_experts, real)
        attention = PagedAttention(
            kv_lens, inp.page_indices, inp.cu_q_lens, inp.num_seqs, self._specs
        )
        counts, seen = _record_tokens(self.rules, counts, seen, inp, tokens, first)
        hidden, kv = module.hidden(
            tokens, positions, kv, attention, rope, self._matmul, experts
        )
        last = jnp.maximum(inp.cu_q_lens[:, 1:] - 1, 0)
        rows = jnp.take_along_axis(hidden, last[..., None], axis=1)
        logits = module.logits(rows, self._matmul)
        data = jnp.arange(counts.shape[0])[:, None]
        batch = dataclasses.replace(inp.sampling, gen_index=gen_index)
        out = sample(
            logits,
            batch,
            lambda: (counts[data, inp.slot_ids], seen[data, inp.slot_ids]),
            self._num_top,
            self._argmax_log_norm,
        )
        if self._num_experts:
            out = (*out, self.rules.constrain(experts.counts(), ("batch", None, None)))
        return kv, counts, seen, out

    def _mixed_impl(self, params, kv, counts, seen, inp: StepInputs):
        kv, counts, seen, (tok, lp, top_ids, top_lp, *routed) = self._forward_sample(
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
            inp.token_slot < counts.shape[1],  # padding tokens have slot max_seqs
        )
        stopped = jnp.ones(tok.shape, bool)  # a mixed step is never chained on
        out = StepOutputs(
            tok[None], lp[None], top_ids[None], top_lp[None], jnp.int32(1), tok, stopped,
            *routed,
        )
        return (*self._pin_state(kv, counts, seen), self._pin_rows(out))

    def _decode_impl(
        self, params, kv, counts, seen, inp: StepInputs, prev_tokens, prev_stopped
    ):
        """Up to K decode steps; a row stops at a stop id or after `remaining` tokens, and
        from then on rewrites its own last slot so it never touches pages it lacks.

        A chained row (prev_row >= 0) feeds the last token of that row of the previous
        call (`prev_tokens`, on device) and starts stopped if that row met a stop id there.
        (A row that only used up its `remaining` is not chained on: the host knows it ends.)"""
        k = self._decode_steps
        d, s = inp.kv_lens.shape
        n = self._num_top
        valid = jnp.arange(s)[None, :] < inp.num_seqs
        chained = inp.prev_row >= 0
        src = jnp.maximum(inp.prev_row, 0)
        tokens = jnp.where(
            chained, jnp.take_along_axis(prev_tokens, src, axis=1), inp.tokens[:, :s]
        )
        stopped_before = chained & jnp.take_along_axis(prev_stopped, src, axis=1)
        outputs = StepOutputs(
            jnp.zeros((k, d, s), jnp.int32),
            jnp.zeros((k, d, s), jnp.float32),
            jnp.zeros((k, d, s, n), jnp.int32),
            jnp.zeros((k, d, s, n), jnp.float32),
            jnp.int32(0),
            tokens,
            ~valid | stopped_before,
            self._no_routing(d) if self._num_experts else None,
        )

        module = nnx.merge(self.model.graphdef, params)

        # The RoPE tables ride in the carry, each computed once per iteration: inside the
        # model XLA would evaluate cos/sin again for every head of every layer.
        def body(carry):
            i, kv, counts, seen, tokens, kv_lens, rope, done, out = carry
            kv, counts, seen, (tok, lp, top_ids, top_lp, *routed) = self._forward_sample(
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
                ~done,  # finished rows rewrite their last slot: not traffic
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
                tok,
                out.stopped | stopped,
                out.expert_tokens + routed[0] if routed else None,
            )
            return i + 1, kv, counts, seen, tok, kv_lens, module.rope(kv_lens - 1), done, out

        def cond(carry):
            i, *_, done, _ = carry
            return (i < k) & jnp.any(valid & ~done)

        rope = module.rope(inp.kv_lens - 1)
        done = outputs.stopped
        carry = (jnp.int32(0), kv, counts, seen, tokens, inp.kv_lens, rope, done, outputs)
        _, kv, counts, seen, _, _, _, _, out = jax.lax.while_loop(cond, body, carry)
        return (*self._pin_state(kv, counts, seen), self._pin_rows(out))

    def _no_routing(self, data: int) -> jax.Array:
        layers = len(self.model.config.moe_layers)
        zeros = jnp.zeros((data, layers, self._num_experts), jnp.int32)
        return self.rules.constrain(zeros, ("batch", None, None))

    def _pin_state(self, kv, counts, seen):
        """Return the donated state in exactly the shardings it was created with: else
        GSPMD may pick others (counts split over vocab, say), and the next call sees new
        input shardings and compiles again — warm-up would not cover real traffic."""
        kv = [self.rules.constrain(layer, CACHE_AXES) for layer in kv]
        stats = ("cache_batch", None, None)
        return kv, self.rules.constrain(counts, stats), self.rules.constrain(seen, stats)

    def _pin_rows(self, out: StepOutputs) -> StepOutputs:
        """Per-row outputs in the shardings of host-placed [data, seqs] inputs, so a call
        chained on them compiles the same program as one fed from the host."""
        rows = ("batch", None)
        return dataclasses.replace(
            out,
            last_tokens=self.rules.constrain(out.last_tokens, rows),
            stopped=self.rules.constrain(out.stopped, rows),
        )

    def run(self, kv, counts, seen, inp: StepInputs, decode: bool, prev=None):
        """One call. `prev` (decode only): the previous call's (last_tokens, stopped), which
        rows with prev_row >= 0 continue from; None when no row does."""
        fn, args = self._call(kv, counts, seen, inp, decode, prev)
        with use_rules(self.rules):
            return fn(*args)

    def lower(self, kv, counts, seen, inp: StepInputs, decode: bool) -> jax.stages.Lowered:
        """The program `run` executes for these arguments, lowered (to inspect it)."""
        fn, args = self._call(kv, counts, seen, inp, decode, None)
        with use_rules(self.rules):
            return fn.lower(*args)

    def _call(self, kv, counts, seen, inp: StepInputs, decode: bool, prev):
        if not decode:
            return self._mixed, (self.model.params, kv, counts, seen, inp)
        prev = prev if prev is not None else self._no_prev(inp)
        return self._decode, (self.model.params, kv, counts, seen, inp, *prev)

    def _no_prev(self, inp: StepInputs):
        shape = np.shape(inp.kv_lens)
        if shape not in self._zeros:
            sharding = self.rules.sharding(("batch", None), shape)
            self._zeros[shape] = (
                jax.device_put(np.zeros(shape, np.int32), sharding),
                jax.device_put(np.zeros(shape, bool), sharding),
            )
        return self._zeros[shape]
