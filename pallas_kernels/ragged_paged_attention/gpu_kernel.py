"""Ragged paged attention as a Pallas GPU kernel (Triton lowering).

The K/V cache write is a separate jitted scatter (``reference.write_kv_pages``) that runs
before the kernel; the kernel only reads pages. Fusing it is not done: Triton has no
grid-wide barrier, and the programs that read a page holding the step's new tokens (every
query block of a prefill, the last KV split of a decode) are not the ones that would write
it, so the write would race with those reads. The scatter moves T x 2 x Hkv x D elements,
at decode ~1/context of the bytes the kernel reads.

Grid: (pairs, kv heads, kv splits). A pair is one sequence intersected with one block of
``block_q`` consecutive tokens (``reference.build_work_list``), so decode batches get one
pair per sequence and long prefills are split into query blocks that run in parallel. A
program's query tile is the ``block_q * group`` rows of its block and kv head (token-major,
the group's heads minor, zero rows up to ``tile_rows`` >= 16 for tl.dot); it keeps their
online-softmax state in registers, walks its split of the pair's pages in blocks of
``pages_per_block`` (page ids gathered from the page table, pages gathered from the cache),
and stores only its own rows with a masked store. Padding rows are never stored by any
program and are zeroed afterwards. With several KV splits (decode, see
``gpu_block_sizes``) each split stores an f32 partial and its log-sum-exp, merged exactly
in XLA after the kernel.

Only pages inside each pair's causal / sliding-window range are read; page-table slots past
the range are replaced by the pair's first page (which its sequence owns) and masked.
With a page mask (context parallelism) a program walks its slice of the sequence's
held-page list (``reference.local_page_lists``) and also stores each row's log-sum-exp.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from meshserve.pallas_kernels.ragged_paged_attention import reference, validation
from meshserve.pallas_kernels.ragged_paged_attention.gpu_block_sizes import choose_gpu_blocks

MASK_VALUE = reference.MASK_VALUE


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check_triton_shapes(rows: int, keys: int, pages: int, page_size: int, head_dim: int):
    # Triton tensors need power-of-two extents and tl.dot needs every dim >= 16.
    problems = []
    for name, val in (
        ("query rows per block (queries * group)", rows),
        ("keys per block (pages * page_size)", keys),
        ("kv pages per block", pages),
        ("page_size", page_size),
        ("head_dim", head_dim),
    ):
        if not _is_pow2(val):
            problems.append(f"{name}={val} is not a power of two")
    for name, val in (
        ("query rows per block", rows),
        ("keys per block", keys),
        ("head_dim", head_dim),
    ):
        if val < 16:
            problems.append(f"{name}={val} < 16 (tl.dot minimum)")
    if problems:
        raise ValueError(
            "GPU ragged paged attention: "
            + "; ".join(problems)
            + " (interpret mode has no such limits)"
        )


def _kernel(*refs, local: bool, partial: bool, **options):
    """Unpacks the refs; `local` (a page mask given): the local page lists ride after the
    page table; `partial` (a page mask or several KV splits): the log-sum-exp is a second
    output."""
    lse_ref = cols_ref = before_ref = None
    if partial:
        *refs, lse_ref = refs
    if local:
        *meta, cols_ref, before_ref, q_ref, k_ref, v_ref, o_ref = refs
    else:
        *meta, q_ref, k_ref, v_ref, o_ref = refs
    _attend(*meta, q_ref, k_ref, v_ref, o_ref, cols_ref, before_ref, lse_ref, **options)


def _attend(
    pair_seq_ref,  # [NP] sequence of each pair, -1 for unused entries
    pair_blk_ref,  # [NP] query block of each pair
    kv_lens_ref,  # [S]
    cu_q_lens_ref,  # [S + 1]
    page_indices_ref,  # [S, P] page table, or with a mask the owned pages (LocalPages.pages)
    q_ref,  # [NB * R, D] query tiles of this kv head (R = tile_rows)
    k_ref,  # [N, page_size, D] K channel of this kv head
    v_ref,  # [N, page_size, D] V channel of this kv head
    o_ref,  # [NB * R, D] this kv split's output
    cols_ref,  # None, or [S, P] page-table column of each owned page (LocalPages.cols)
    before_ref,  # None, or [S, P + 1] owned pages before each column (LocalPages.before)
    lse_ref,  # None, or [NB * R] log-sum-exp of each row over this split's keys
    *,
    block_q: int,
    group: int,
    tile_rows: int,
    pages_per_block: int,
    kv_splits: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    pid = pl.program_id(0)
    page_size, head_dim = k_ref.shape[1], k_ref.shape[2]
    rows = tile_rows
    keys = pages_per_block * page_size
    seq = pair_seq_ref[pid]
    valid = seq >= 0
    seq = jnp.maximum(seq, 0)
    blk = pair_blk_ref[pid]
    first_tok = blk * block_q
    q_start = cu_q_lens_ref[seq]
    q_end = cu_q_lens_ref[seq + 1]
    kv_len = kv_lens_ref[seq]
    row_lo = jnp.maximum(q_start, first_tok) - first_tok
    row_hi = jnp.minimum(q_end, first_tok + block_q) - first_tok
    qpos_base = kv_len - (q_end - q_start) - q_start + first_tok
    qpos_hi = qpos_base + row_hi - 1
    if sliding_window is None:
        page_lo = jnp.int32(0)
    else:
        page_lo = lax.div(jnp.maximum(qpos_base + row_lo - sliding_window + 1, 0), page_size)
    last_col = page_indices_ref.shape[1] - 1
    page_lo = jnp.minimum(page_lo, last_col)  # only matters for corrupt inputs: stay in bounds
    page_hi = jnp.minimum(lax.div(jnp.maximum(qpos_hi, 0), page_size), last_col)
    if cols_ref is None:
        # Walk page-table columns [page_lo, page_hi].
        list_lo, list_end = page_lo, page_hi + 1
    else:
        # Walk the owned pages whose columns are in [page_lo, page_hi]: a slice of the list.
        list_lo, list_end = before_ref[seq, page_lo], before_ref[seq, page_hi + 1]
    num_kv_blocks = jnp.where(
        valid, lax.div(list_end - list_lo + pages_per_block - 1, pages_per_block), 0
    )
    first_page = page_indices_ref[seq, page_lo if cols_ref is None else
                                  jnp.minimum(list_lo, last_col)]

    row = lax.broadcasted_iota(jnp.int32, (rows,), 0)
    row_tok = lax.div(row, group)
    # Rows past block_q * group are the zero rows that fill a tile up to tl.dot's minimum.
    row_ok = valid & (row < block_q * group) & (row_tok >= row_lo) & (row_tok < row_hi)
    qpos = qpos_base + row_tok
    q = q_ref[pl.ds(pl.multiple_of(blk * rows, rows), rows), :]

    def body(j, carry):
        m, denom, acc = carry
        col0 = list_lo + j * pages_per_block
        cols = col0 + lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0)
        col_ok = cols < list_end
        ids = plt.load(page_indices_ref.at[seq, pl.ds(col0, pages_per_block)], mask=col_ok, other=0)
        # Clamped so a corrupt table cannot fault (validate_dynamic reports it in debug mode).
        ids = jnp.clip(jnp.where(col_ok, ids, first_page), 0, k_ref.shape[0] - 1)
        k = k_ref[ids].reshape(keys, head_dim)
        v = v_ref[ids].reshape(keys, head_dim)
        if cols_ref is None:
            kpos = col0 * page_size + lax.broadcasted_iota(jnp.int32, (keys,), 0)
        else:
            # Owned pages are not adjacent: each page's keys start at its own column. Slots
            # past the list get a column past every query, so every test below masks them.
            page_cols = plt.load(cols_ref.at[seq, pl.ds(col0, pages_per_block)], mask=col_ok,
                                 other=reference.LOCAL_COL_PAD)
            page_cols = jnp.where(col_ok, page_cols, reference.LOCAL_COL_PAD)
            slot = lax.broadcasted_iota(jnp.int32, (pages_per_block, page_size), 1)
            kpos = (page_cols[:, None] * page_size + slot).reshape(keys)
        # Keys past the pair's last query are masked for every row; zero V so stale NaNs in
        # partially written pages cannot leak through 0 * NaN.
        v = jnp.where((kpos <= qpos_hi)[:, None], v, jnp.zeros_like(v))
        s = (
            lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            * sm_scale
        )
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        mask = row_ok[:, None] & (kpos[None, :] <= qpos[:, None])
        if sliding_window is not None:
            mask = mask & (kpos[None, :] > qpos[:, None] - sliding_window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l_new = alpha * denom + jnp.sum(p, axis=1)
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return m_new, l_new, alpha[:, None] * acc + pv

    m0 = jnp.full((rows,), MASK_VALUE, jnp.float32)
    l0 = jnp.zeros((rows,), jnp.float32)
    acc0 = jnp.zeros((rows, head_dim), jnp.float32)
    blk_lo, blk_hi = 0, num_kv_blocks
    if kv_splits > 1:
        # Split s walks kv blocks [s * chunk, (s + 1) * chunk) of this pair; the last splits
        # of a short sequence are empty and store out 0, lse MASK_VALUE.
        chunk = lax.div(num_kv_blocks + kv_splits - 1, kv_splits)
        blk_lo = jnp.minimum(pl.program_id(2) * chunk, num_kv_blocks)
        blk_hi = jnp.minimum(blk_lo + chunk, num_kv_blocks)
    m, denom, acc = lax.fori_loop(blk_lo, blk_hi, body, (m0, l0, acc0))
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[:, None]
    tile = pl.ds(pl.multiple_of(blk * rows, rows), rows)
    plt.store(o_ref.at[tile, :], out.astype(o_ref.dtype), mask=row_ok[:, None])
    if lse_ref is not None:
        # No key seen (no owned page in range): MASK_VALUE, which merge_partials weighs 0.
        lse = jnp.where(denom > 0.0, m + jnp.log(jnp.where(denom > 0.0, denom, 1.0)), MASK_VALUE)
        plt.store(lse_ref.at[tile], lse, mask=row_ok)


def _tile_queries(q: jax.Array, num_kv_heads: int, blocks: int, block_q: int,
                  tile_rows: int) -> jax.Array:
    """[T, Hq, D] -> [Hkv, blocks * tile_rows, D]: tile b holds tokens [b * block_q, ...)
    x the group's heads (token-major), then zero rows up to tile_rows."""
    q = reference.group_queries_by_kv_head(q, num_kv_heads, blocks * block_q)
    hkv, _, d = q.shape
    q = q.reshape(hkv, blocks, -1, d)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, tile_rows - q.shape[2]), (0, 0)))
    return q.reshape(hkv, blocks * tile_rows, d)


def _untile(x: jax.Array, num_tokens: int, group: int, block_q: int, tile_rows: int):
    """[..., Hkv, blocks * tile_rows, D] -> [..., T, Hq, D], the inverse of _tile_queries."""
    *lead, hkv, rows, d = x.shape
    x = x.reshape(*lead, hkv, rows // tile_rows, tile_rows, d)[..., : block_q * group, :]
    x = x.reshape(*lead, hkv, -1, group, d)
    x = jnp.moveaxis(x, -4, -3)  # [..., tokens, Hkv, G, D]
    return x.reshape(*lead, x.shape[-4], hkv * group, d)[..., :num_tokens, :, :]


def _merge_splits(outs: jax.Array, lses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact merge of per-split partials ([K, T, Hq, D] f32, [K, T, Hq]): softmax weights
    exp(lse_k - max) (``reference.merge_partials``) and the merged log-sum-exp, MASK_VALUE
    where no split saw a key."""
    top = jnp.maximum(lses.max(axis=0), MASK_VALUE)
    total = jnp.exp(lses - top).sum(axis=0)
    lse = jnp.where(top > MASK_VALUE, top + jnp.log(jnp.where(total > 0.0, total, 1.0)),
                    MASK_VALUE)
    return reference.merge_partials(outs, lses), lse


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "num_queries_per_block",
        "num_kv_pages_per_block",
        "num_kv_splits",
        "num_warps",
        "num_stages",
        "interpret",
        "return_lse",
    ),
)
def ragged_paged_attention_gpu(
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
    num_queries_per_block: int | None = None,
    num_kv_pages_per_block: int | None = None,
    num_kv_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
    page_mask: jax.Array | None = None,
    return_lse: bool = False,
) -> tuple[jax.Array, ...]:
    """GPU ragged paged attention; contract of ``dispatch.ragged_paged_attention``.

    Block sizes and the number of KV splits default to ``gpu_block_sizes.choose_gpu_blocks``.
    With ``page_mask`` the kernel walks each sequence's owned pages as a compacted list
    (``reference.local_page_lists``), so unowned pages are never read."""
    args = (q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    validation.validate_static(*args, **options)  # trace time only
    page_mask = validation.lse_page_mask(page_mask, page_indices, return_lse)
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_pages.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    max_seqs, pages_per_seq = page_indices.shape
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    bq, rows, bp, splits = choose_gpu_blocks(
        num_tokens=num_tokens,
        max_seqs=max_seqs,
        num_kv_heads=num_kv_heads,
        group=group,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        num_queries_per_block=num_queries_per_block,
        num_kv_pages_per_block=num_kv_pages_per_block,
        num_kv_splits=num_kv_splits,
    )
    if not interpret:
        _check_triton_shapes(rows, bp * page_size, bp, page_size, head_dim)

    local = page_mask is not None
    partial = local or splits > 1  # f32 partials with their log-sum-exp
    num_pages = kv_pages.shape[0]
    # Unowned pages get an out-of-range id: their tokens' writes are dropped.
    write_table = jnp.where(page_mask, page_indices, num_pages) if local else page_indices
    kv_pages = reference.write_kv_pages(k, v, kv_pages, kv_lens, write_table, cu_q_lens, num_seqs)
    work = reference.build_work_list(kv_lens, cu_q_lens, num_seqs, num_tokens, bq)
    num_pairs = work.pair_seq.shape[0]
    num_blocks = work.blk_start.shape[0] - 1
    q_tiles = _tile_queries(q, num_kv_heads, num_blocks, bq, rows)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda p, h, s, nd=x.ndim: (0,) * nd)

    if local:
        lists = reference.local_page_lists(page_mask, page_indices)
        metadata = (work.pair_seq, work.pair_blk, kv_lens, cu_q_lens, lists.pages, lists.cols,
                    lists.before)
    else:
        metadata = (work.pair_seq, work.pair_blk, kv_lens, cu_q_lens, page_indices)
    tiled = (num_blocks * rows, head_dim)
    out_specs = pl.BlockSpec((None, None, *tiled), lambda p, h, s: (s, h, 0, 0))
    out_shape = jax.ShapeDtypeStruct((splits, num_kv_heads, *tiled),
                                     jnp.float32 if partial else q.dtype)
    if partial:  # f32 partials: the merge's accuracy should not depend on q's dtype
        out_specs = [out_specs, pl.BlockSpec((None, None, tiled[0]), lambda p, h, s: (s, h, 0))]
        out_shape = [out_shape, jax.ShapeDtypeStruct(out_shape.shape[:3], jnp.float32)]
    kernel = functools.partial(
        _kernel,
        local=local,
        partial=partial,
        block_q=bq,
        group=group,
        tile_rows=rows,
        pages_per_block=bp,
        kv_splits=splits,
        sm_scale=float(sm_scale),
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    out = pl.pallas_call(
        kernel,
        grid=(num_pairs, num_kv_heads, splits),
        in_specs=[
            *(whole(x) for x in metadata),
            pl.BlockSpec((None, *tiled), lambda p, h, s: (h, 0, 0)),
            # Same cache twice: K lives in channel 2h, V in channel 2h + 1.
            pl.BlockSpec((num_pages, page_size, None, head_dim),
                         lambda p, h, s: (0, 0, 2 * h, 0)),
            pl.BlockSpec((num_pages, page_size, None, head_dim),
                         lambda p, h, s: (0, 0, 2 * h + 1, 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="meshserve_ragged_paged_attention_gpu",
    )(*metadata, q_tiles, kv_pages, kv_pages)
    valid = reference.token_metadata(kv_lens, cu_q_lens, num_seqs, num_tokens).valid
    lse = None
    if partial:
        out, lse = out
        lse = _untile(lse[..., None], num_tokens, group, bq, rows)[..., 0]
        # No program stores padding rows; their memory is uninitialised.
        lse = jnp.where(valid[:, None], lse, MASK_VALUE)
    out = _untile(out, num_tokens, group, bq, rows)
    out = jnp.where(valid[:, None, None], out, jnp.zeros_like(out))
    if splits > 1:
        out, lse = _merge_splits(out, lse)
    else:
        out, lse = out[0], None if lse is None else lse[0]
    if local:
        return out, lse, kv_pages
    return out.astype(q.dtype), kv_pages
