"""Pure-JAX ragged paged attention: the semantic reference and the CPU serving path.

Everything here is vectorised over sequences with static maximum shapes, so a single
compilation serves every batch composition of a given bucket (lengths are traced values).

Layout reminders (see ``dispatch.ragged_paged_attention`` for the full contract):
  q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_pages: [N, page_size, 2 * Hkv, D] with K of kv head h
  at channel 2h and V at 2h + 1; kv_lens: [S]; page_indices: [S, P]; cu_q_lens: [S + 1];
  num_seqs: [1].

The attention works on "pairs": a pair is the intersection of one sequence with one block of
``block_q`` consecutive tokens. Tokens are sorted by sequence, so the number of pairs is at
most ``num_blocks + max_seqs`` and every pair only reads pages of its own sequence. With
``block_q == 1`` a pair is a single token, which is the right shape for decode; larger blocks
cut the page-gather traffic of prefill by ``block_q``x at the cost of masked FLOPs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from meshserve.pallas_kernels.ragged_paged_attention import validation

# Finite so that fully-masked rows never produce inf - inf = NaN in the online softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def cdiv(a: Any, b: int) -> Any:
    """Ceiling division for Python ints and integer arrays alike."""
    return (a + b - 1) // b


class TokenMetadata(NamedTuple):
    """Per-token view of a ragged batch (all arrays are [T])."""

    seq: jax.Array  # sequence owning the token (clamped to a valid row for padding)
    pos: jax.Array  # absolute position of the token inside its sequence
    valid: jax.Array  # False for padding tokens (index >= cu_q_lens[num_seqs])


def _effective_cu_q_lens(cu_q_lens: jax.Array, num_seqs: jax.Array) -> jax.Array:
    # Entries past num_seqs are padding and may hold anything; pinning them to the total
    # makes the array monotone so searchsorted stays meaningful.
    n = num_seqs[0]
    idx = jnp.arange(cu_q_lens.shape[0])
    return jnp.where(idx <= n, cu_q_lens, cu_q_lens[n])


def token_metadata(
    kv_lens: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int
) -> TokenMetadata:
    """Maps every token slot of the bucket to (sequence, position, valid)."""
    max_seqs = kv_lens.shape[0]
    cu = _effective_cu_q_lens(cu_q_lens, num_seqs)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, max_seqs - 1)
    valid = t < cu[num_seqs[0]]
    q_start = cu[seq]
    q_len = cu[seq + 1] - q_start
    pos = kv_lens[seq] - q_len + (t - q_start)
    return TokenMetadata(seq=seq, pos=pos, valid=valid)


def kv_slot_mapping(
    kv_pages_shape: tuple[int, ...],
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    num_tokens: int,
) -> tuple[jax.Array, jax.Array]:
    """(page, slot) each token's K/V goes to; page == num_pages for tokens writing nothing."""
    num_pages, page_size = kv_pages_shape[0], kv_pages_shape[1]
    pages_per_seq = page_indices.shape[1]
    meta = token_metadata(kv_lens, cu_q_lens, num_seqs, num_tokens)
    col = meta.pos // page_size
    ok = meta.valid & (meta.pos >= 0) & (col < pages_per_seq)
    page = page_indices[meta.seq, jnp.clip(col, 0, pages_per_seq - 1)]
    ok = ok & (page >= 0) & (page < num_pages)
    # An out-of-range page id plus mode="drop" turns padding writes into no-ops.
    page = jnp.where(ok, page, num_pages).astype(jnp.int32)
    slot = jnp.where(ok, meta.pos % page_size, 0).astype(jnp.int32)
    return page, slot


def interleave_kv(k: jax.Array, v: jax.Array, dtype: DTypeLike) -> jax.Array:
    """[T, Hkv, D] x2 -> [T, 2 * Hkv, D] with K of head h at 2h and V at 2h + 1."""
    t, h, d = k.shape
    return jnp.stack([k, v], axis=2).reshape(t, 2 * h, d).astype(dtype)


def group_queries_by_kv_head(q: jax.Array, num_kv_heads: int, padded: int) -> jax.Array:
    """[T, Hq, D] -> [Hkv, padded * G, D]: one kv head's query rows form one 2-D tile."""
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    q = jnp.pad(q, ((0, padded - num_tokens), (0, 0), (0, 0)))
    q = q.reshape(padded, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    return q.reshape(num_kv_heads, padded * group, head_dim)


def ungroup_queries(out: jax.Array, num_tokens: int, num_q_heads: int) -> jax.Array:
    """Inverse of ``group_queries_by_kv_head``, dropping the padding tokens."""
    num_kv_heads, rows, head_dim = out.shape
    group = num_q_heads // num_kv_heads
    out = out.reshape(num_kv_heads, rows // group, group, head_dim).transpose(1, 0, 2, 3)
    return out.reshape(rows // group, num_q_heads, head_dim)[:num_tokens]


@jax.jit
def write_kv_pages(
    k: jax.Array,
    v: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
) -> jax.Array:
    """Writes the step's new K/V of every valid token into its page slot; returns the pages.

    Padding tokens and tokens whose slot is not covered by the page table write nothing. Inside
    a caller's jit with kv_pages donated this is an in-place scatter.
    """
    page, slot = kv_slot_mapping(
        kv_pages.shape, kv_lens, page_indices, cu_q_lens, num_seqs, k.shape[0]
    )
    new_kv = interleave_kv(k, v, kv_pages.dtype)
    return kv_pages.at[page, slot].set(new_kv, mode="drop")


class WorkList(NamedTuple):
    """(sequence x query block) pairs; the static length is ``max_pairs(...)``."""

    pair_seq: jax.Array  # [NP] sequence of the pair, -1 for unused entries
    pair_blk: jax.Array  # [NP] query block of the pair (0 for unused entries)
    blk_start: jax.Array  # [NB + 1] pairs of block b are blk_start[b]:blk_start[b + 1]
    num_pairs: jax.Array  # [1]


def max_pairs(num_tokens: int, max_seqs: int, block_q: int) -> int:
    num_blocks = cdiv(num_tokens, block_q)
    # Each block contributes one pair plus one per sequence boundary inside it, and a pair
    # owns at least one token.
    return max(1, min(num_blocks + max_seqs - 1, num_blocks * block_q))


def build_work_list(
    kv_lens: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int, block_q: int
) -> WorkList:
    """Enumerates the (sequence, query block) pairs of a ragged batch, vectorised."""
    max_seqs = kv_lens.shape[0]
    num_blocks = cdiv(num_tokens, block_q)
    padded = num_blocks * block_q
    np_ = max_pairs(num_tokens, max_seqs, block_q)
    meta = token_metadata(kv_lens, cu_q_lens, num_seqs, padded)
    t = jnp.arange(padded, dtype=jnp.int32)
    prev_seq = jnp.concatenate([jnp.full((1,), -1, jnp.int32), meta.seq[:-1]])
    is_new = meta.valid & ((t % block_q == 0) | (meta.seq != prev_seq))
    pair_id = jnp.cumsum(is_new.astype(jnp.int32)) - 1
    target = jnp.where(is_new, pair_id, np_)
    pair_seq = jnp.full((np_,), -1, jnp.int32).at[target].set(meta.seq, mode="drop")
    pair_blk = jnp.zeros((np_,), jnp.int32).at[target].set(t // block_q, mode="drop")
    per_blk = is_new.reshape(num_blocks, block_q).sum(axis=1, dtype=jnp.int32)
    blk_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(per_blk)])
    num_pairs = blk_start[-1:]
    return WorkList(pair_seq, pair_blk, blk_start.astype(jnp.int32), num_pairs)


def default_block_sizes(num_tokens: int, max_seqs: int, q_per_kv: int) -> tuple[int, int]:
    """(block_q, keys_per_block) for the reference on XLA:CPU.

    Decode-shaped buckets: one token per pair and small key blocks (the gathered block stays
    in cache). Otherwise ~64 query rows per pair: fewer pairs means fewer page gathers, and
    64x64 dots are where XLA:CPU gets most of its FLOP/s (measured on 2 cores).
    """
    if num_tokens <= max_seqs:
        return 1, 16
    return max(1, 64 // q_per_kv), 64


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "sliding_window", "soft_cap", "block_q", "keys_per_block", "return_lse"
    ),
)
def ragged_paged_attention_reference(
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
    block_q: int | None = None,
    keys_per_block: int | None = None,
    page_mask: jax.Array | None = None,
    return_lse: bool = False,
) -> tuple[jax.Array, ...]:
    """Reference ragged paged attention; same contract as ``dispatch.ragged_paged_attention``.

    ``block_q`` (query tokens per pair) and ``keys_per_block`` (keys per loop step) only trade
    speed; the defaults come from ``default_block_sizes``.
    """
    args = (q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    validation.validate_static(*args, **options)  # trace time only
    write_table, read_table = page_indices, page_indices
    page_mask = validation.lse_page_mask(page_mask, page_indices, return_lse)
    if page_mask is not None:
        # Unowned pages: an out-of-range id drops the write; reads of them are masked.
        write_table = jnp.where(page_mask, page_indices, kv_pages.shape[0])
        read_table = jnp.where(page_mask, page_indices, 0)
    kv_pages = write_kv_pages(k, v, kv_pages, kv_lens, write_table, cu_q_lens, num_seqs)
    out = paged_attention_from_pages(
        q,
        kv_pages,
        kv_lens,
        read_table,
        cu_q_lens,
        num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        block_q=block_q,
        keys_per_block=keys_per_block,
        page_mask=page_mask,
        return_lse=return_lse,
    )
    if return_lse:
        return (*out, kv_pages)
    return out, kv_pages


class LocalPages(NamedTuple):
    """A page mask as per-sequence lists of the pages a device holds, for kernels that walk
    the page table: column j of a row is the j-th owned page in table order."""

    pages: jax.Array  # [S, P] page ids of the owned pages, 0 past the owned ones
    cols: jax.Array  # [S, P] their page-table columns, LOCAL_COL_PAD past the owned ones
    before: jax.Array  # [S, P + 1] owned pages in columns < c: the list slice of columns [a, b)
    # is pages[before[a]:before[b]]


# Past every real column, so key positions built from it fail every causal test (and
# LOCAL_COL_PAD * page_size stays far from int32 overflow).
LOCAL_COL_PAD = 1 << 20


def local_page_lists(page_mask: jax.Array, page_indices: jax.Array) -> LocalPages:
    """Compacts ``page_mask`` ([S, P] bool) into ``LocalPages`` (stable: table order kept)."""
    max_seqs, pages_per_seq = page_indices.shape
    cols = jnp.broadcast_to(jnp.arange(pages_per_seq, dtype=jnp.int32), page_indices.shape)
    # Owned columns first, in column order: sort by (not owned, column).
    order = jnp.argsort(jnp.where(page_mask, cols, cols + pages_per_seq), axis=1)
    owned = jnp.take_along_axis(page_mask, order, axis=1)
    pages = jnp.where(owned, jnp.take_along_axis(page_indices, order, axis=1), 0)
    local_cols = jnp.where(owned, order, LOCAL_COL_PAD).astype(jnp.int32)
    counts = jnp.cumsum(page_mask.astype(jnp.int32), axis=1)
    before = jnp.concatenate([jnp.zeros((max_seqs, 1), jnp.int32), counts], axis=1)
    return LocalPages(pages.astype(jnp.int32), local_cols, before)


def paged_attention_from_pages(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float | None,
    sliding_window: int | None,
    soft_cap: float | None,
    block_q: int | None,
    keys_per_block: int | None,
    page_mask: jax.Array | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Causal attention of the queries over pages that already hold the step's K/V.

    `page_mask` ([S, P] bool): only keys in pages marked True count (a device holding some
    of a sequence's pages attends over those). `return_lse`: also return each row's
    log-sum-exp of its scores, [T, Hq] f32 (MASK_VALUE where a row saw no key), and the
    output in f32, so partial attentions over disjoint key sets merge exactly
    (`merge_partials`)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_combined, _ = kv_pages.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    max_seqs, pages_per_seq = page_indices.shape
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    default_q, default_keys = default_block_sizes(num_tokens, max_seqs, group)
    block_q = block_q or default_q
    keys_per_block = keys_per_block or default_keys
    if keys_per_block < page_size and page_size % keys_per_block == 0:
        # Big pages: view each as `split` contiguous sub-pages (a free reshape) so one loop
        # step still gathers only keys_per_block slots and the working set stays in cache.
        split = page_size // keys_per_block
        kv_pages = kv_pages.reshape(num_pages * split, keys_per_block, num_combined, head_dim)
        page_indices = (page_indices[:, :, None] * split + jnp.arange(split)).reshape(
            max_seqs, pages_per_seq * split
        )
        if page_mask is not None:
            page_mask = jnp.repeat(page_mask, split, axis=1)
        num_pages, page_size, pages_per_seq = (
            kv_pages.shape[0],
            keys_per_block,
            pages_per_seq * split,
        )
    pages_per_block = max(1, min(pages_per_seq, keys_per_block // page_size))
    keys = pages_per_block * page_size

    work = build_work_list(kv_lens, cu_q_lens, num_seqs, num_tokens, block_q)
    num_blocks = work.blk_start.shape[0] - 1
    pair_ok = work.pair_seq >= 0
    seq = jnp.maximum(work.pair_seq, 0)
    blk = work.pair_blk
    cu = _effective_cu_q_lens(cu_q_lens, num_seqs)
    q_start, q_end, kv_len = cu[seq], cu[seq + 1], kv_lens[seq]
    first_tok = blk * block_q
    rows_lo = jnp.maximum(q_start, first_tok)  # first token of the pair
    rows_hi = jnp.minimum(q_end, first_tok + block_q)  # one past its last token
    qpos_lo = kv_len - (q_end - q_start) + (rows_lo - q_start)
    qpos_hi = qpos_lo + (rows_hi - rows_lo) - 1
    if sliding_window is None:
        page_lo = jnp.zeros_like(qpos_lo)
    else:
        page_lo = jnp.maximum(qpos_lo - sliding_window + 1, 0) // page_size
    page_hi = jnp.minimum(qpos_hi // page_size, pages_per_seq - 1)
    n_blocks = jnp.where(pair_ok, cdiv(page_hi - page_lo + 1, pages_per_block), 0)
    n_iter = jnp.max(n_blocks)
    first_page = page_indices[seq, jnp.clip(page_lo, 0, pages_per_seq - 1)]

    # Per-pair query rows and their positions.
    pad = num_blocks * block_q - num_tokens
    q_blocks = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(
        num_blocks, block_q, num_kv_heads, group, head_dim
    )
    rows = block_q * group
    # [NP, Hkv, Bq * G, D]: batch dims (pair, kv head) leading so the dots need no transposes.
    qp = (
        q_blocks[blk]
        .astype(jnp.float32)
        .transpose(0, 2, 1, 3, 4)
        .reshape(-1, num_kv_heads, rows, head_dim)
    )
    tok = first_tok[:, None] + jnp.arange(block_q)[None, :]
    row_ok = pair_ok[:, None] & (tok >= rows_lo[:, None]) & (tok < rows_hi[:, None])
    qpos = (kv_len - (q_end - q_start) - q_start)[:, None] + tok
    row_ok = jnp.repeat(row_ok, group, axis=1)  # [NP, Bq * G], row r is token r // G
    qpos = jnp.repeat(qpos, group, axis=1)

    num_p = qp.shape[0]
    m0 = jnp.full((num_p, num_kv_heads, rows), MASK_VALUE, jnp.float32)
    l0 = jnp.zeros_like(m0)
    acc0 = jnp.zeros((num_p, num_kv_heads, rows, head_dim), jnp.float32)

    def body(j, carry):
        m, denom, acc = carry
        cols = page_lo[:, None] + j * pages_per_block + jnp.arange(pages_per_block)[None, :]
        col_ok = pair_ok[:, None] & (cols <= page_hi[:, None])
        if page_mask is not None:
            col_ok = col_ok & page_mask[seq[:, None], jnp.clip(cols, 0, pages_per_seq - 1)]
        ids = page_indices[seq[:, None], jnp.clip(cols, 0, pages_per_seq - 1)]
        # Columns past a pair's range re-read its first page (one its sequence owns) and are
        # masked; clamping keeps a corrupt table from indexing outside the cache.
        ids = jnp.clip(jnp.where(col_ok, ids, first_page[:, None]), 0, num_pages - 1)
        # Gather only this block's pages of each pair: [NP, Hkv, 2, keys, D].
        blk_kv = kv_pages[ids].reshape(num_p, keys, num_kv_heads, 2, head_dim)
        blk_kv = blk_kv.transpose(0, 2, 3, 1, 4).astype(jnp.float32)
        kpos = (cols[:, :, None] * page_size + jnp.arange(page_size)).reshape(num_p, keys)
        key_ok = jnp.repeat(col_ok, page_size, axis=1) & (kpos < kv_len[:, None])
        # Slots past kv_len may hold stale or NaN data; 0 * NaN would poison the sum.
        vb = jnp.where(key_ok[:, None, :, None], blk_kv[:, :, 1], 0.0)
        s = jnp.einsum("nhrd,nhkd->nhrk", qp, blk_kv[:, :, 0]) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        mask = key_ok[:, None, :] & row_ok[:, :, None] & (kpos[:, None, :] <= qpos[:, :, None])
        if sliding_window is not None:
            mask = mask & (kpos[:, None, :] > qpos[:, :, None] - sliding_window)
        mask = mask[:, None]  # [NP, 1, Bq * G, K]
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l_new = alpha * denom + p.sum(axis=-1)
        pv = jnp.einsum("nhrk,nhkd->nhrd", p, vb)
        return m_new, l_new, alpha[..., None] * acc + pv

    m, denom, acc = jax.lax.fori_loop(0, n_iter, body, (m0, l0, acc0))
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]  # rows without keys are padding: 0
    if return_lse:
        # The lse rides as one more channel through the per-pair merge below.
        lse = jnp.where(denom > 0.0, m + jnp.log(jnp.where(denom > 0.0, denom, 1.0)), MASK_VALUE)
        out = jnp.concatenate([out, lse[..., None]], axis=-1)
        head_dim += 1
    # Rows of other sequences in this block are zero (their p is 0), unless one of this
    # sequence's values is inf or NaN (0 * inf): they must not leak into those rows.
    out = jnp.where(row_ok[:, None, :, None], out, 0.0)
    out = out.reshape(num_p, num_kv_heads, block_q, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = out.reshape(num_p, block_q, num_q_heads, head_dim)
    # Every valid token row is owned by exactly one pair; unused pairs go to a dropped block.
    dest = jnp.where(pair_ok, blk, num_blocks)
    merged = jnp.zeros((num_blocks, block_q, num_q_heads, head_dim), jnp.float32)
    merged = merged.at[dest].add(out, mode="drop")
    merged = merged.reshape(num_blocks * block_q, num_q_heads, head_dim)[:num_tokens]
    if return_lse:
        # Padding tokens saw no key either: "no contribution", like a row without keys.
        valid = token_metadata(kv_lens, cu_q_lens, num_seqs, num_tokens).valid
        return merged[..., :-1], jnp.where(valid[:, None], merged[..., -1], MASK_VALUE)
    return merged.astype(q.dtype)


def merge_partials(outs: jax.Array, lses: jax.Array) -> jax.Array:
    """Exact softmax attention from partials over disjoint key sets (flash-decoding).

    outs: [K, ..., D] each part's normalised output; lses: [K, ...] its log-sum-exp
    (MASK_VALUE where the part saw no key). out = sum_k exp(lse_k - lse) out_k with
    lse = logsumexp_k lse_k; rows no part saw come out 0 (their outs are 0)."""
    # A part with no keys gets exp(MASK - top) = 0 unless all do; the floor makes -inf
    # (another convention for "no keys") give weight 0 instead of exp(-inf + inf) = NaN.
    top = jnp.maximum(lses.max(axis=0), MASK_VALUE)
    w = jnp.exp(lses - top)
    total = w.sum(axis=0)
    return (w[..., None] * outs).sum(axis=0) / jnp.where(total > 0.0, total, 1.0)[..., None]
