"""One device's share of attention under context parallelism: every query of the step
over the keys of the pages this device owns, visiting only those pages.

The reference's `page_mask` gives the same numbers but still walks every page of each
sequence (masking the others), so each of S devices did the whole attention's work:
S times the FLOPs of one device in all, for prefill and decode alike. Here each
sequence's page table is compacted to its owned columns first, and a (sequence, query
block) pair loops over the owned pages inside its causal range only: ~1/S of the work
per device, and with pages round-robin (page p on device p mod S) every device gets
~1/S of every causal triangle, so prefill stays balanced without reordering tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from meshserve.pallas_kernels.ragged_paged_attention.reference import (
    MASK_VALUE,
    build_work_list,
    cdiv,
    default_block_sizes,
)


def _cu_q_lens(cu_q_lens: jax.Array, num_seqs: jax.Array) -> jax.Array:
    # Entries past num_seqs may hold anything: pin them to the total, as the reference.
    idx = jnp.arange(cu_q_lens.shape[0])
    return jnp.where(idx <= num_seqs[0], cu_q_lens, cu_q_lens[num_seqs[0]])


def owned_columns(table: jax.Array, ways: int, index: jax.Array):
    """Per sequence, the page-table columns whose page lives on device `index` (page p
    on p % ways), in order, then the rest: (column [S, P], local row [S, P], owned
    columns before each column [S, P + 1])."""
    num_cols = table.shape[1]
    owned = table % ways == index
    col = jnp.arange(num_cols, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(owned, col, num_cols + col), axis=1).astype(jnp.int32)
    local = jnp.take_along_axis(table, order, axis=1) // ways
    before = jnp.concatenate(
        [jnp.zeros((table.shape[0], 1), jnp.int32),
         jnp.cumsum(owned, axis=1, dtype=jnp.int32)], axis=1)
    return order, local, before


def local_partial_attention(q, kv_pages, kv_lens, table, cu_q_lens, num_seqs, *, ways: int,
                            index: jax.Array, sliding_window: int | None):
    """Causal attention of every query over this device's pages: (out [T, Hq, D] f32
    normalised over those keys, lse [T, Hq] f32, MASK_VALUE where a row saw none), the
    partial `reference.merge_partials` combines exactly. `kv_pages` holds the local rows
    (global page p at row p // ways) with the step's K/V already written."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_combined, _ = kv_pages.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    max_seqs = table.shape[0]
    sm_scale = 1.0 / math.sqrt(head_dim)
    block_q, keys_per_block = default_block_sizes(num_tokens, max_seqs, group)
    order, local, before = owned_columns(table, ways, index)
    pages_per_seq = table.shape[1]
    split = 1
    if keys_per_block < page_size and page_size % keys_per_block == 0:
        # Big pages: sub-pages of keys_per_block slots keep one step's gather in cache.
        split = page_size // keys_per_block
        kv_pages = kv_pages.reshape(num_pages * split, keys_per_block, num_combined, head_dim)
        sub = jnp.arange(split, dtype=jnp.int32)
        order = (order[:, :, None] * split + sub).reshape(max_seqs, -1)
        local = (local[:, :, None] * split + sub).reshape(max_seqs, -1)
        num_pages, page_size = kv_pages.shape[0], keys_per_block
    sub_cols = order.shape[1]
    pages_per_block = max(1, min(sub_cols, keys_per_block // page_size))
    keys = pages_per_block * page_size

    work = build_work_list(kv_lens, cu_q_lens, num_seqs, num_tokens, block_q)
    num_blocks = work.blk_start.shape[0] - 1
    pair_ok = work.pair_seq >= 0
    seq = jnp.maximum(work.pair_seq, 0)
    blk = work.pair_blk
    cu = _cu_q_lens(cu_q_lens, num_seqs)
    q_start, q_end, kv_len = cu[seq], cu[seq + 1], kv_lens[seq]
    first_tok = blk * block_q
    rows_lo = jnp.maximum(q_start, first_tok)
    rows_hi = jnp.minimum(q_end, first_tok + block_q)
    qpos_lo = kv_len - (q_end - q_start) + (rows_lo - q_start)
    qpos_hi = qpos_lo + (rows_hi - rows_lo) - 1
    # The pair's causal range in page-table columns, then in owned (sub-)columns.
    page_size_full = page_size * split
    if sliding_window is None:
        page_lo = jnp.zeros_like(qpos_lo)
    else:
        page_lo = jnp.maximum(qpos_lo - sliding_window + 1, 0) // page_size_full
    page_hi = jnp.clip(qpos_hi // page_size_full, -1, pages_per_seq - 1)
    j_lo = before[seq, jnp.clip(page_lo, 0, pages_per_seq)] * split
    j_hi = before[seq, page_hi + 1] * split
    n_blocks = jnp.where(pair_ok, cdiv(jnp.maximum(j_hi - j_lo, 0), pages_per_block), 0)
    n_iter = jnp.max(n_blocks)

    pad = num_blocks * block_q - num_tokens
    q_blocks = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(
        num_blocks, block_q, num_kv_heads, group, head_dim)
    rows = block_q * group
    qp = (q_blocks[blk].astype(jnp.float32).transpose(0, 2, 1, 3, 4)
          .reshape(-1, num_kv_heads, rows, head_dim))
    tok = first_tok[:, None] + jnp.arange(block_q)[None, :]
    row_ok = pair_ok[:, None] & (tok >= rows_lo[:, None]) & (tok < rows_hi[:, None])
    qpos = (kv_len - (q_end - q_start) - q_start)[:, None] + tok
    row_ok = jnp.repeat(row_ok, group, axis=1)
    qpos = jnp.repeat(qpos, group, axis=1)

    num_p = qp.shape[0]
    m0 = jnp.full((num_p, num_kv_heads, rows), MASK_VALUE, jnp.float32)
    acc0 = jnp.zeros((num_p, num_kv_heads, rows, head_dim), jnp.float32)

    def body(j, carry):
        m, denom, acc = carry
        cols = j_lo[:, None] + j * pages_per_block + jnp.arange(pages_per_block)[None, :]
        col_ok = pair_ok[:, None] & (cols < j_hi[:, None])
        cols = jnp.clip(cols, 0, sub_cols - 1)
        ids = jnp.clip(jnp.where(col_ok, local[seq[:, None], cols], 0), 0, num_pages - 1)
        blk_kv = kv_pages[ids].reshape(num_p, keys, num_kv_heads, 2, head_dim)
        blk_kv = blk_kv.transpose(0, 2, 3, 1, 4).astype(jnp.float32)
        # Key positions come from the pages' own columns, not from the compacted order.
        kpos = (order[seq[:, None], cols][:, :, None] * page_size
                + jnp.arange(page_size)).reshape(num_p, keys)
        key_ok = jnp.repeat(col_ok, page_size, axis=1) & (kpos < kv_len[:, None])
        vb = jnp.where(key_ok[:, None, :, None], blk_kv[:, :, 1], 0.0)
        s = jnp.einsum("nhrd,nhkd->nhrk", qp, blk_kv[:, :, 0]) * sm_scale
        mask = key_ok[:, None, :] & row_ok[:, :, None] & (kpos[:, None, :] <= qpos[:, :, None])
        if sliding_window is not None:
            mask = mask & (kpos[:, None, :] > qpos[:, :, None] - sliding_window)
        mask = mask[:, None]
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("nhrk,nhkd->nhrd", p, vb)
        return m_new, alpha * denom + p.sum(axis=-1), alpha[..., None] * acc + pv

    m, denom, acc = jax.lax.fori_loop(0, n_iter, body, (m0, jnp.zeros_like(m0), acc0))
    seen = denom > 0.0
    out = acc / jnp.where(seen, denom, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), MASK_VALUE)
    out = jnp.concatenate([out, lse[..., None]], axis=-1)
    out = jnp.where(row_ok[:, None, :, None], out, 0.0)
    out = out.reshape(num_p, num_kv_heads, block_q, group, head_dim + 1).transpose(0, 2, 1, 3, 4)
    out = out.reshape(num_p, block_q, num_q_heads, head_dim + 1)
    # Each valid row belongs to one pair (padding rows come out 0 on every device).
    dest = jnp.where(pair_ok, blk, num_blocks)
    merged = jnp.zeros((num_blocks, block_q, num_q_heads, head_dim + 1), jnp.float32)
    merged = merged.at[dest].add(out, mode="drop")
    merged = merged.reshape(num_blocks * block_q, num_q_heads, head_dim + 1)[:num_tokens]
    return merged[..., :-1], merged[..., -1]
