"""Host-side assembly of one step's bucketed input arrays from a plan."""

from __future__ import annotations

import numpy as np

from meshserve.engine.config import EngineConfig
from meshserve.engine.sampler import SamplingBatch
from meshserve.engine.scheduler import StepPlan
from meshserve.engine.step import StepInputs


def build_inputs(
    plan: StepPlan,
    cfg: EngineConfig,
    pages_per_seq: int,
    pad_page: int,
    tokens_bucket: int | None = None,
    seqs_bucket: int | None = None,
) -> StepInputs:
    """numpy arrays shaped [data, bucket...]; padding rows and tokens write nothing.
    Buckets come from the plan unless both are given (warm-up compiles every bucket)."""
    d = len(plan.shards)
    if tokens_bucket and seqs_bucket:
        t, s = tokens_bucket, seqs_bucket
    else:
        seqs = max(len(rows) for rows in plan.shards)
        used = max(sum(r.num_new for r in rows) for rows in plan.shards)
        t, s = cfg.buckets(plan.decode, seqs, used)
    tokens = np.zeros((d, t), np.int32)
    positions = np.zeros((d, t), np.int32)
    token_slot = np.full((d, t), cfg.max_seqs, np.int32)
    is_output = np.zeros((d, t), bool)
    cu = np.zeros((d, s + 1), np.int32)
    kv_lens = np.zeros((d, s), np.int32)
    pages = np.full((d, s, pages_per_seq), pad_page, np.int32)
    num_seqs = np.zeros((d, 1), np.int32)
    slot_ids = np.zeros((d, s), np.int32)
    reset = np.zeros((d, cfg.max_seqs), bool)
    stop_ids = np.full((d, s, cfg.max_stop_ids), -1, np.int32)
    remaining = np.ones((d, s), np.int32)
    prev_row = np.full((d, s), -1, np.int32)
    f32 = lambda fill: np.full((d, s), fill, np.float32)  # noqa: E731
    temperature, top_p, min_p = f32(0.0), f32(1.0), f32(0.0)
    rep, pres, freq = f32(1.0), f32(0.0), f32(0.0)
    top_k = np.zeros((d, s), np.int32)
    seed_lo, seed_hi = np.zeros((d, s), np.uint32), np.zeros((d, s), np.uint32)
    gen_index = np.zeros((d, s), np.int32)
    any_logprobs = False
    for shard, rows in enumerate(plan.shards):
        offset = 0
        num_seqs[shard, 0] = len(rows)
        for i, item in enumerate(rows):
            seq, n = item.seq, item.num_new
            # A chained decode row runs after `ahead` tokens still on device: its input
            # token comes from there (prev_row), the rest from what the host knows.
            start = seq.num_computed + item.ahead
            if item.prev_row >= 0:
                prev_row[shard, i] = item.prev_row
            elif n == 1:
                tokens[shard, offset] = seq.token(start)
            else:
                tokens[shard, offset : offset + n] = (seq.prompt_ids + seq.output_ids)[
                    start : start + n
                ]
            positions[shard, offset : offset + n] = np.arange(start, start + n)
            token_slot[shard, offset : offset + n] = seq.slot
            is_output[shard, offset : offset + n] = np.arange(start, start + n) >= len(
                seq.prompt_ids
            )
            offset += n
            cu[shard, i + 1] = offset
            kv_lens[shard, i] = start + n
            pages[shard, i, : len(seq.pages)] = seq.pages
            slot_ids[shard, i] = seq.slot
            if seq.fresh_slot and not item.ahead:
                reset[shard, seq.slot] = True
            ids = seq.stop_ids[: cfg.max_stop_ids]
            stop_ids[shard, i, : len(ids)] = ids
            remaining[shard, i] = item.max_steps
            p = seq.params
            temperature[shard, i], top_p[shard, i], min_p[shard, i] = (
                p.temperature,
                p.top_p,
                p.min_p,
            )
            top_k[shard, i] = p.top_k
            rep[shard, i], pres[shard, i], freq[shard, i] = (
                p.repetition_penalty,
                p.presence_penalty,
                p.frequency_penalty,
            )
            seed_lo[shard, i] = seq.seed & 0xFFFFFFFF
            seed_hi[shard, i] = (seq.seed >> 32) & 0xFFFFFFFF
            gen_index[shard, i] = len(seq.output_ids) + item.ahead
            any_logprobs |= p.logprobs > 0
        cu[shard, len(rows) + 1 :] = offset
    live = temperature > 0
    sampling = SamplingBatch(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=rep,
        presence_penalty=pres,
        frequency_penalty=freq,
        seed_lo=seed_lo,
        seed_hi=seed_hi,
        gen_index=gen_index,
        any_random=np.bool_(live.any()),
        any_filter=np.bool_((live & ((top_k > 0) | (top_p < 1))).any()),
        any_penalty=np.bool_(((rep != 1) | (pres != 0) | (freq != 0)).any()),
        any_logprobs=np.bool_(any_logprobs),
    )
    return StepInputs(
        tokens=tokens,
        positions=positions,
        token_slot=token_slot,
        token_is_output=is_output,
        cu_q_lens=cu,
        kv_lens=kv_lens,
        page_indices=pages,
        num_seqs=num_seqs,
        slot_ids=slot_ids,
        reset_slots=reset,
        stop_ids=stop_ids,
        remaining=remaining,
        prev_row=prev_row,
        sampling=sampling,
    )
