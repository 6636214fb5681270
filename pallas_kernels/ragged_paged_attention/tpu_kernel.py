"""Ragged paged attention as a Pallas Mosaic TPU kernel, with the K/V cache write fused in.

Grid: (kv-head blocks, query blocks). Query block b holds ``block_q`` consecutive tokens of the
ragged batch; the (sequence x query block) "pairs" that intersect it come from a work list
built in XLA before the call (``reference.build_work_list``) and are scalar-prefetched, as are
the lengths, the page table and cu_q_lens.

Per grid step:
  1. The block's new K/V rows go HBM -> HBM into their page slots: each run of a pair's tokens
     on one page as one DMA per set bit of its length. Query blocks run in order, so every key
     position a query may attend to (<= its own position) has been written by this or an
     earlier step before any page is read.
  2. For each pair, stream its pages HBM -> VMEM in blocks of ``num_kv_pages_per_block``,
     double-buffered (the next block, possibly of the next pair, is in flight while the current
     one is being used), with an online softmax per kv head over the pair's query rows. Rows of
     other pairs are fully masked, which leaves their running state bit-for-bit unchanged, so no
     masked stores are needed. Once the step's last block has arrived, the next step's write
     (1.) is done and its first K/V block started, so it lands while this step finishes.
  3. Normalise and store the output block.

The pages input is aliased to the pages output (in-place update when the caller donates).
Only pages inside each pair's causal / sliding-window range are ever DMA'd.

With a page mask (context parallelism: this device holds some of each sequence's pages)
step 1 skips tokens on pages it does not hold, step 2 walks the pair's slice of the
sequence's held-page list (``reference.local_page_lists``) instead of table columns, and
the output is f32 plus a log-sum-exp per row, so partials merge exactly.

Written for TPU interpret mode as well as Mosaic: no masked ``pltpu.store`` (state updates
store ``where``-merged values); only the K/V read (``tpu_kv_layout``) differs between them.
q and out are [num_kv_heads, T * group, head_dim], so a kv head's query rows are one 2-D tile.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from meshserve.pallas_kernels.ragged_paged_attention import reference, tpu_block_sizes, validation
from meshserve.pallas_kernels.ragged_paged_attention.tpu_block_sizes import choose_block_sizes
from meshserve.pallas_kernels.ragged_paged_attention.tpu_kv_layout import load_kv

MASK_VALUE = reference.MASK_VALUE
_LANES = tpu_block_sizes.LANES


class _Pair(NamedTuple):
    seq: Any
    row_lo: Any  # first row (token offset inside the query block) of the pair
    row_hi: Any  # one past its last row
    qpos_base: Any  # position of the token at row 0, as if it belonged to the pair's sequence
    qpos_hi: Any  # position of the pair's last token
    page_lo: Any  # first page-table column the pair needs
    page_hi: Any  # last page-table column the pair needs
    num_kv_blocks: Any
    list_lo: Any  # with a page mask: first entry of the owned-page list the pair needs
    list_end: Any  # one past its last


def _kernel(*refs, split: bool, **options):
    """Unpacks the refs; `split` (a page mask given): three more scalar-prefetch arrays
    (the owned-page lists) and a log-sum-exp output."""
    lists = lse_ref = None
    if split:
        *scalars, lp, lc, lb, q_ref, new_kv_ref, pages_in, o_ref, pages_ref, lse_ref = refs[:14]
        lists = (lp, lc, lb)
        scratch = refs[14:]
    else:
        *scalars, q_ref, new_kv_ref, pages_in, o_ref, pages_ref = refs[:10]
        scratch = refs[10:]
    _attend(*scalars, q_ref, new_kv_ref, pages_in, o_ref, pages_ref, *scratch,
            lists=lists, lse_ref=lse_ref, **options)


def _attend(
    # Scalar prefetch (SMEM).
    kv_lens_ref,
    page_indices_ref,  # [max_seqs * pages_per_seq], flat: 2-D SMEM arrays pad their rows;
    # with a page mask the owned pages' ids and -1 elsewhere (only writes use it then)
    cu_q_lens_ref,
    pair_seq_ref,
    blk_start_ref,
    # Inputs.
    q_ref,  # [Hb, Bq * G, D]
    new_kv_ref,  # HBM [Bq * num_q_blocks, 2 * H, D]: read by the write DMAs only
    _pages_in_ref,  # aliased to pages_ref; all access goes through the output ref
    # Outputs.
    o_ref,  # [Hb, Bq * G, D]
    pages_ref,  # HBM [N, page_size, 2 * H, D]
    # Scratch.
    kv_buf,  # [2, Bp * page_size, 2 * Hb, D]
    read_sems,  # DMA semaphores, one per buffer
    write_sem,  # DMA semaphore for the cache write
    start_slot_ref,  # SMEM [1]: the buffer holding this step's first K/V block
    m_ref,  # [Hb, Bq * G, 128] running max, broadcast along lanes
    l_ref,  # [Hb, Bq * G, 128] running denominator
    acc_ref,  # [Hb, Bq * G, D] running numerator
    *,
    # With a page mask: the flat LocalPages (pages, cols [S * P], before [S * (P + 1)])
    # and the [Hb, Bq * G, 128] log-sum-exp output; else None.
    lists,
    lse_ref,
    block_q: int,
    group: int,
    pages_per_block: int,
    pages_per_seq: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    mosaic: bool,
):
    heads_blk, q_blk = pl.program_id(0), pl.program_id(1)
    num_heads_per_blk, rows, head_dim = q_ref.shape
    chans = 2 * num_heads_per_blk
    chan_start = heads_blk * chans
    num_pages, page_size = pages_ref.shape[0], pages_ref.shape[1]
    keys = pages_per_block * page_size
    pair_lo = blk_start_ref[q_blk]
    pair_hi = blk_start_ref[q_blk + 1]

    def page_id(seq, col):
        # Clamped so a corrupt table can never fault the DMA engine (validate_dynamic
        # reports such tables in debug mode).
        col = jnp.clip(col, 0, pages_per_seq - 1)
        return jnp.clip(page_indices_ref[seq * pages_per_seq + col], 0, num_pages - 1)

    def pair_info(p, blk=q_blk) -> _Pair:
        first_tok = blk * block_q
        seq = pair_seq_ref[p]
        q_start = cu_q_lens_ref[seq]
        q_end = cu_q_lens_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        t_lo = jnp.maximum(q_start, first_tok)
        t_hi = jnp.minimum(q_end, first_tok + block_q)
        qpos_base = kv_len - (q_end - q_start) - q_start + first_tok
        qpos_lo = qpos_base + (t_lo - first_tok)
        qpos_hi = qpos_base + (t_hi - first_tok) - 1
        if sliding_window is None:
            page_lo = jnp.int32(0)
        else:
            page_lo = lax.div(jnp.maximum(qpos_lo - sliding_window + 1, 0), page_size)
        page_hi = lax.div(jnp.maximum(qpos_hi, 0), page_size)
        if lists is None:
            list_lo = list_end = None
            n_pages = page_hi - page_lo + 1
        else:
            # The owned pages with columns in [page_lo, page_hi] are one slice of the list.
            before = lists[2]
            list_lo = before[seq * (pages_per_seq + 1) + jnp.clip(page_lo, 0, pages_per_seq)]
            list_end = before[seq * (pages_per_seq + 1) + jnp.clip(page_hi + 1, 0, pages_per_seq)]
            n_pages = list_end - list_lo
        # At least one block per pair, even one with nothing to read: its fully masked
        # step leaves the state unchanged and keeps the pipeline's bookkeeping simple.
        n_blocks = jnp.maximum(lax.div(n_pages - 1 + pages_per_block, pages_per_block), 1)
        row_lo, row_hi = t_lo - first_tok, t_hi - first_tok
        return _Pair(seq, row_lo, row_hi, qpos_base, qpos_hi, page_lo, page_hi, n_blocks,
                     list_lo, list_end)

    # 1. Cache write: a pair's new tokens fill one run of slots per page; a run of n goes out
    # as one DMA per set bit of n (sizes are static). All start, then all are waited.
    run_sizes = [1 << b for b in range(page_size.bit_length() - 1, -1, -1)]

    def write_block(blk, fn):
        def pair_body(p, carry):
            info = pair_info(p, blk)
            pos_lo = info.qpos_base + info.row_lo
            pos_end = info.qpos_base + info.row_hi  # one past the pair's last position
            col_lo = lax.div(pos_lo, page_size)
            col_end = lax.div(pos_end - 1 + page_size, page_size)

            def page_body(col, carry2):
                start = jnp.maximum(pos_lo, col * page_size)
                n = jnp.minimum(pos_end, (col + 1) * page_size) - start
                row, slot = start - info.qpos_base, start - col * page_size
                page = page_id(info.seq, col)
                for size in run_sizes:
                    off = n & ~(2 * size - 1)  # tokens already covered by the larger pieces
                    copy = pltpu.make_async_copy(
                        new_kv_ref.at[pl.ds(blk * block_q + row + off, size),
                                      pl.ds(chan_start, chans)],
                        pages_ref.at[page, pl.ds(slot + off, size), pl.ds(chan_start, chans)],
                        write_sem.at[0],
                    )
                    todo = (n & size) != 0
                    if lists is not None:  # another device holds the page: it writes the run
                        raw = page_indices_ref[info.seq * pages_per_seq
                                               + jnp.clip(col, 0, pages_per_seq - 1)]
                        todo = todo & (raw >= 0)
                    pl.when(todo)(lambda copy=copy: fn(copy))
                return carry2

            return lax.fori_loop(col_lo, col_end, page_body, carry)

        lax.fori_loop(blk_start_ref[blk], blk_start_ref[blk + 1], pair_body, 0)

    def write_and_wait(blk):
        write_block(blk, lambda copy: copy.start())
        write_block(blk, lambda copy: copy.wait())

    # 2. Attention.
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def list_entry(ref, info: _Pair, j):
        return ref[info.seq * pages_per_seq + jnp.clip(j, 0, pages_per_seq - 1)]

    def kv_copies(info: _Pair, kv_blk, slot, fn):
        for i in range(pages_per_block):
            if lists is None:  # entry: a page-table column
                entry = info.page_lo + kv_blk * pages_per_block + i
                ok = entry <= info.page_hi
            else:  # entry: a position in the sequence's owned-page list
                entry = info.list_lo + kv_blk * pages_per_block + i
                ok = entry < info.list_end

            @pl.when(ok)
            def _(entry=entry, i=i):
                if lists is None:
                    page = page_id(info.seq, entry)
                else:
                    page = jnp.clip(list_entry(lists[0], info, entry), 0, num_pages - 1)
                src = pages_ref.at[page, :, pl.ds(chan_start, chans)]
                dst = kv_buf.at[slot, pl.ds(i * page_size, page_size)]
                fn(pltpu.make_async_copy(src, dst, read_sems.at[slot]))

    def key_base(info: _Pair, kv_blk, shape, axis):
        """Key position minus its index in the block, per element of `shape` (keys on
        `axis`): owned pages are not adjacent, so each page's keys start at its column."""
        iota = lax.broadcasted_iota(jnp.int32, shape, axis)
        base = None
        for i in range(pages_per_block):
            j = info.list_lo + kv_blk * pages_per_block + i
            # Entries past the pair's slice of the list: a column past every query.
            col = jnp.where(j < info.list_end, list_entry(lists[1], info, j),
                            reference.LOCAL_COL_PAD)
            start = (col - i) * page_size
            base = jnp.full(shape, start) if base is None else jnp.where(
                iota >= i * page_size, start, base)
        return base

    def compute(info: _Pair, kv_blk, slot):
        if lists is None:
            first_key = (info.page_lo + kv_blk * pages_per_block) * page_size
        else:
            first_key = key_base(info, kv_blk, (rows, keys), 1)
        # Row r is token r // group of the block. Conditions on floor(r / group) are written
        # as conditions on r (x <= r // g  <=>  x * g <= r) to avoid vector integer division.
        row = lax.broadcasted_iota(jnp.int32, (rows, keys), 0)
        rel = first_key - info.qpos_base + lax.broadcasted_iota(jnp.int32, (rows, keys), 1)
        mask = (row >= info.row_lo * group) & (row < info.row_hi * group) & (row >= rel * group)
        if sliding_window is not None:
            mask = mask & (row < (rel + sliding_window) * group)
        # Keys past the pair's last query were not fetched (or are beyond kv_len): zero V so a
        # stale NaN cannot leak through 0 * NaN.
        if lists is not None:
            first_key = key_base(info, kv_blk, (keys, head_dim), 0)
        v_ok = first_key + lax.broadcasted_iota(jnp.int32, (keys, head_dim), 0) <= info.qpos_hi
        for h in range(num_heads_per_blk):
            q = q_ref[h]
            k, v = load_kv(kv_buf, slot, h, keys, mosaic=mosaic)
            v = jnp.where(v_ok, v.astype(jnp.float32), 0.0).astype(v.dtype)
            s = (
                lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                * sm_scale
            )
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(mask, s, MASK_VALUE)
            m_prev = jnp.max(m_ref[h], axis=1, keepdims=True)
            l_prev = jnp.max(l_ref[h], axis=1, keepdims=True)
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            m_ref[h] = jnp.broadcast_to(m_new, (rows, _LANES))
            l_ref[h] = jnp.broadcast_to(
                alpha * l_prev + jnp.sum(p, axis=1, keepdims=True), (rows, _LANES)
            )
            acc_ref[h] = alpha * acc_ref[h] + pv

    # Cross-step prefetch (a head block's query blocks run in order on one core): after this
    # step's last read, the next step's write (it may touch pages just read), then its first
    # K/V block, which lands while this step finishes. Step 0 of a head block starts cold.
    def prepare_next_step(slot):
        @pl.when(q_blk + 1 < pl.num_programs(1))
        def _():
            write_and_wait(q_blk + 1)
            first = blk_start_ref[q_blk + 1]

            @pl.when(first < blk_start_ref[q_blk + 2])
            def _():
                kv_copies(pair_info(first, q_blk + 1), 0, slot, lambda c: c.start())

            start_slot_ref[0] = slot

    @pl.when(q_blk == 0)
    def _():
        write_and_wait(0)
        start_slot_ref[0] = 0

        @pl.when(pair_lo < pair_hi)
        def _():
            kv_copies(pair_info(pair_lo), 0, 0, lambda c: c.start())

    slot0 = start_slot_ref[0]

    def body(state):
        p, kv_blk, slot = state
        info = pair_info(p)
        last = kv_blk + 1 >= info.num_kv_blocks
        next_p = jnp.where(last, p + 1, p)
        next_blk = jnp.where(last, 0, kv_blk + 1)
        next_slot = 1 - slot

        @pl.when(next_p < pair_hi)
        def _():
            kv_copies(pair_info(next_p), next_blk, next_slot, lambda c: c.start())

        kv_copies(info, kv_blk, slot, lambda c: c.wait())

        pl.when(next_p >= pair_hi)(lambda: prepare_next_step(next_slot))

        compute(info, kv_blk, slot)
        return next_p, next_blk, next_slot

    lax.while_loop(lambda s: s[0] < pair_hi, body, (pair_lo, jnp.int32(0), slot0))

    pl.when(pair_lo >= pair_hi)(lambda: prepare_next_step(slot0))  # padding steps hand over

    # 3. Rows that no pair touched (padding) have l == 0 and come out as zeros.
    for h in range(num_heads_per_blk):
        denom = jnp.max(l_ref[h], axis=1, keepdims=True)
        if lse_ref is not None:
            # No key seen (no owned page in range): MASK_VALUE, which merge_partials weighs 0.
            m = jnp.max(m_ref[h], axis=1, keepdims=True)
            lse = jnp.where(denom > 0.0, m + jnp.log(jnp.where(denom > 0.0, denom, 1.0)),
                            MASK_VALUE)
            lse_ref[h] = jnp.broadcast_to(lse, (rows, _LANES))
        denom = jnp.where(denom == 0.0, 1.0, denom)
        o_ref[h] = (acc_ref[h] / denom).astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "num_kv_pages_per_block",
        "num_queries_per_block",
        "num_kv_heads_per_block",
        "vmem_limit_bytes",
        "interpret",
        "return_lse",
    ),
)
def ragged_paged_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
    num_kv_heads_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret: Any = False,
    page_mask: jax.Array | None = None,
    return_lse: bool = False,
) -> tuple[jax.Array, ...]:
    """TPU ragged paged attention with fused K/V write; contract of ``dispatch``.

    ``interpret`` may be True or a ``pltpu.InterpretParams`` to run on CPU. With
    ``page_mask`` the kernel walks each sequence's owned pages as a compacted list
    (``reference.local_page_lists``): unowned pages are neither written nor DMA'd.
    """
    args = (q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    validation.validate_static(*args, **options)  # trace time only
    page_mask = validation.lse_page_mask(page_mask, page_indices, return_lse)
    split = page_mask is not None
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_pages.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    max_seqs, pages_per_seq = page_indices.shape
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    sizes = choose_block_sizes(
        num_tokens=num_tokens,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        q_dtype=q.dtype,
        kv_dtype=kv_pages.dtype,
        num_kv_pages_per_block=num_kv_pages_per_block,
        num_queries_per_block=num_queries_per_block,
        num_kv_heads_per_block=num_kv_heads_per_block,
        vmem_limit_bytes=vmem_limit_bytes,
        return_lse=split,
    )
    bp, bq, hb = sizes[:3]
    num_blocks = reference.cdiv(num_tokens, bq)
    padded = num_blocks * bq
    work = reference.build_work_list(kv_lens, cu_q_lens, num_seqs, num_tokens, bq)
    # Unused entries are never visited; 0 keeps them in range for SMEM reads anyway.
    pair_seq = jnp.maximum(work.pair_seq, 0)

    q_heads = reference.group_queries_by_kv_head(q, num_kv_heads, padded)
    new_kv = reference.interleave_kv(k, v, kv_pages.dtype)
    new_kv = jnp.pad(new_kv, ((0, padded - num_tokens), (0, 0), (0, 0)))
    rows = bq * group

    kernel = functools.partial(
        _kernel,
        split=split,
        block_q=bq,
        group=group,
        pages_per_block=bp,
        pages_per_seq=pages_per_seq,
        sm_scale=float(sm_scale),
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        mosaic=not interpret,
    )
    q_spec = pl.BlockSpec((hb, rows, head_dim), lambda h, b, *_: (h, b, 0))
    scalars = (kv_lens, page_indices.reshape(-1), cu_q_lens, pair_seq, work.blk_start)
    out_specs = [q_spec, pl.BlockSpec(memory_space=pl.ANY)]
    out_shape = [
        jax.ShapeDtypeStruct(q_heads.shape, q.dtype),
        jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype),
    ]
    if split:
        local = reference.local_page_lists(page_mask, page_indices)
        write_table = jnp.where(page_mask, page_indices, -1).reshape(-1)
        scalars = (kv_lens, write_table, cu_q_lens, pair_seq, work.blk_start,
                   *(x.reshape(-1) for x in local))
        # f32 partials (the merge's accuracy should not depend on q's dtype) and an lse
        # block as wide as the lanes, like the running max.
        out_specs.append(pl.BlockSpec((hb, rows, _LANES), lambda h, b, *_: (h, b, 0)))
        out_shape[0] = jax.ShapeDtypeStruct(q_heads.shape, jnp.float32)
        out_shape.append(jax.ShapeDtypeStruct((*q_heads.shape[:2], _LANES), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=(num_kv_heads // hb, num_blocks),
        in_specs=[
            q_spec,
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((2, bp * page_size, 2 * hb, head_dim), kv_pages.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SemaphoreType.DMA((1,)),
            pltpu.SMEM((1,), jnp.int32),
            pltpu.VMEM((hb, rows, _LANES), jnp.float32),
            pltpu.VMEM((hb, rows, _LANES), jnp.float32),
            pltpu.VMEM((hb, rows, head_dim), jnp.float32),
        ],
    )
    outs = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        # kv_pages follows the scalar-prefetch operands, q and new_kv.
        input_output_aliases={len(scalars) + 2: 1},
        compiler_params=pltpu.CompilerParams(
            # Head blocks touch disjoint channels, so they may run on separate cores; query
            # blocks must run in order: later blocks read what earlier ones wrote, and each
            # step hands the next its cache write and first K/V block.
            dimension_semantics=("parallel", "arbitrary"),
            vmem_limit_bytes=sizes.vmem_limit_bytes,
        ),
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        name="meshserve_ragged_paged_attention",
    )(*scalars, q_heads, new_kv, kv_pages)
    out, kv_pages = reference.ungroup_queries(outs[0], num_tokens, num_q_heads), outs[1]
    if split:
        lse = reference.ungroup_queries(outs[2][..., :1], num_tokens, num_q_heads)[..., 0]
        return out, lse, kv_pages
    return out, kv_pages
