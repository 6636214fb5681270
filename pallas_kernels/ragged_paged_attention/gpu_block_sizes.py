"""Static block sizes and KV splits of the GPU kernel, chosen once per compiled shape.

Decode (flash-decoding): a decode bucket has one program per (sequence, kv head), which on a
132-SM GPU leaves most SMs idle at small batches, and one program streams a whole long
context alone. Splitting each sequence's pages into ``kv_splits`` contiguous ranges, each
walked by its own program that emits a partial output and its log-sum-exp, multiplies the
programs; an exact log-sum-exp merge in XLA combines them. The rule:

    kv_splits = min(MAX_KV_SPLITS,
                    kv blocks of the longest context // kv blocks of MIN_KEYS_PER_SPLIT keys,
                    next_pow2(ceil(TARGET_PROGRAMS / (max_seqs * num_kv_heads))))

(at least 1), for decode-shaped buckets (num_tokens <= max_seqs) only: prefill buckets
already have a program per query block. A split never walks fewer than MIN_KEYS_PER_SPLIT
keys of a context that long, so the merge (splits x the output, in f32) stays small beside
the KV it saves time on; per pair the split length is ceil(its kv blocks / kv_splits), so a
short sequence in a long bucket just leaves its last splits empty.

Query tiles: rows are token-major, the ``group`` query heads that share a kv head minor, so
the heads of one token always sit in one tile and share the K/V loads. ``tl.dot`` needs at
least 16 rows: a decode tile is the group of one token, zero rows up to 16 (``tile_rows``);
prefill tiles hold ``block_q`` tokens x the group (64 rows by default).
"""

from __future__ import annotations

from typing import NamedTuple

MMA_MIN_ROWS = 16  # tl.dot's smallest M
PREFILL_ROWS = 64
KEYS_PER_BLOCK = 64
# About 8 programs per SM on a 132-SM H100/H200: enough to hide the page-gather latency.
TARGET_PROGRAMS = 1024
MAX_KV_SPLITS = 16
MIN_KEYS_PER_SPLIT = 256


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _pow2_ceil(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class GpuBlocks(NamedTuple):
    block_q: int  # query tokens per tile
    tile_rows: int  # rows of a query tile: block_q * group real rows, zeros up to this
    pages_per_block: int  # pages per step of a program's KV loop
    kv_splits: int  # programs per (pair, kv head), each over its own range of the pages


def choose_kv_splits(
    *, max_seqs: int, num_kv_heads: int, page_size: int, pages_per_seq: int, pages_per_block: int
) -> int:
    """The module docstring's rule."""
    kv_blocks = _cdiv(pages_per_seq, pages_per_block)
    min_blocks = max(1, _cdiv(MIN_KEYS_PER_SPLIT, pages_per_block * page_size))
    by_length = kv_blocks // min_blocks
    by_occupancy = _pow2_ceil(_cdiv(TARGET_PROGRAMS, max_seqs * num_kv_heads))
    return max(1, min(MAX_KV_SPLITS, by_length, by_occupancy))


def choose_gpu_blocks(
    *,
    num_tokens: int,
    max_seqs: int,
    num_kv_heads: int,
    group: int,
    page_size: int,
    pages_per_seq: int,
    num_queries_per_block: int | None = None,
    num_kv_pages_per_block: int | None = None,
    num_kv_splits: int | None = None,
) -> GpuBlocks:
    """Block sizes for one compiled shape; None picks the default (see the module doc)."""
    decode = num_tokens <= max_seqs
    block_q = num_queries_per_block
    if block_q is None:
        block_q = 1 if decode else max(1, PREFILL_ROWS // group)
    pages = num_kv_pages_per_block
    if pages is None:
        pages = _pow2_floor(min(pages_per_seq, max(1, KEYS_PER_BLOCK // page_size)))
    splits = num_kv_splits
    if splits is None:
        splits = 1
        if decode:
            splits = choose_kv_splits(max_seqs=max_seqs, num_kv_heads=num_kv_heads,
                                      page_size=page_size, pages_per_seq=pages_per_seq,
                                      pages_per_block=pages)
    if min(block_q, pages, splits) < 1:
        raise ValueError(f"GPU block sizes must be >= 1, got queries={block_q}, "
                         f"kv pages={pages}, kv splits={splits}")
    rows = max(MMA_MIN_ROWS, _pow2_ceil(block_q * group))
    return GpuBlocks(block_q, rows, pages, splits)
