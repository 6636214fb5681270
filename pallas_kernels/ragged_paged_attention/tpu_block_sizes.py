"""Block sizes of the TPU ragged paged attention kernel: a rule keyed by head dim, page size
and dtype, shrunk until the kernel's VMEM footprint fits.

- kv pages per block: ``_KEYS_PER_BLOCK`` keys (fewer for wide heads, so one buffer's K/V
  bytes stay put), divided by the page size.
- queries per block: 32 tokens, rounded to q's sublane tile.
- kv heads per block: all of the device's heads when they fit (each page is then one
  contiguous DMA), else the largest divisor whose 2h interleaved channels fill whole sublane
  tiles of the cache dtype (8 rows for 32-bit, 16 for 16-bit, 32 for 8-bit), so the K/V
  buffer and the new-K/V block carry no tile padding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.typing import DTypeLike

LANES = 128

# About 512 keys per block keeps the MXU busy while two K/V buffers plus the [rows, keys]
# f32 scores stay far below the smallest scoped VMEM; heads wider than 128 lanes scale it down.
_KEYS_PER_BLOCK = 512
_QUERIES_PER_BLOCK = 32
# The smallest VMEM of current generations (v4/v5e per TensorCore).
_DEFAULT_VMEM_BYTES = 16 * 1024 * 1024


class BlockSizes(NamedTuple):
    num_kv_pages_per_block: int
    num_queries_per_block: int
    num_kv_heads_per_block: int
    vmem_limit_bytes: int
    vmem_bytes: int  # estimated footprint of this choice


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def default_kv_pages_per_block(page_size: int, head_dim: int) -> int:
    """The rule's kv pages per block (before the VMEM fit and the pages_per_seq cap)."""
    keys = _KEYS_PER_BLOCK * LANES // max(LANES, _round_up(head_dim, LANES))
    return max(1, keys // page_size)


def _sublane_multiple(dtype: DTypeLike) -> int:
    # Packed dtypes tile 8 * (4 / itemsize) rows per vreg.
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def vmem_footprint(
    *,
    block_q: int,
    pages_per_block: int,
    kv_heads_per_block: int,
    group: int,
    head_dim: int,
    page_size: int,
    q_dtype: DTypeLike,
    kv_dtype: DTypeLike,
    return_lse: bool = False,
) -> int:
    """Bytes of VMEM the kernel needs, with (sublane, lane) tile padding."""
    rows = block_q * group
    keys = pages_per_block * page_size
    d = _round_up(head_dim, LANES)
    q_bytes = jnp.dtype(q_dtype).itemsize
    kv_bytes = jnp.dtype(kv_dtype).itemsize
    rows_q = _round_up(rows, _sublane_multiple(q_dtype))
    rows_f32 = _round_up(rows, 8)
    chans = _round_up(2 * kv_heads_per_block, _sublane_multiple(kv_dtype))
    q_and_out = 2 * 2 * kv_heads_per_block * rows_q * d * q_bytes  # pipelined, 2 buffers each
    if return_lse:  # the output is f32, plus an f32 lse block as wide as the lanes
        q_and_out += 2 * kv_heads_per_block * rows_f32 * (d * (4 - q_bytes) + LANES * 4)
    kv_bufs = 2 * keys * chans * d * kv_bytes
    m_and_l = 2 * kv_heads_per_block * rows_f32 * LANES * 4
    acc = kv_heads_per_block * rows_f32 * d * 4
    # Live values of one head: scores, probabilities and mask, plus K and V in f32 (and for
    # 16-bit caches the u32 (K, V) pair they are split from).
    kv_temps = 2 if kv_bytes == 4 else 3
    temps = 3 * rows_f32 * _round_up(keys, LANES) * 4 + kv_temps * _round_up(keys, 8) * d * 4
    return q_and_out + kv_bufs + m_and_l + acc + temps


def _vmem_capacity() -> int:
    try:
        if pltpu.is_tpu_device():
            return int(pltpu.get_tpu_info().vmem_capacity_bytes)
    except Exception:  # noqa: BLE001 - unknown device kinds fall back to the safe default
        pass
    return _DEFAULT_VMEM_BYTES


def choose_block_sizes(
    *,
    num_tokens: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    q_dtype: DTypeLike,
    kv_dtype: DTypeLike,
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
    num_kv_heads_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    return_lse: bool = False,
) -> BlockSizes:
    """The rule's defaults (module docstring), shrunk until they fit VMEM; explicit sizes that
    do not fit are refused."""
    limit = vmem_limit_bytes or (_vmem_capacity() * 3) // 4
    rule_pages = default_kv_pages_per_block(page_size, head_dim)
    pages = min(num_kv_pages_per_block or rule_pages, pages_per_seq)
    sub = _sublane_multiple(q_dtype)
    bq = num_queries_per_block or _QUERIES_PER_BLOCK
    if bq >= num_tokens:
        bq = num_tokens  # one block covering every token is always a legal tile
    elif num_queries_per_block is None:
        bq = _round_up(bq, sub)
    kv_sub = _sublane_multiple(kv_dtype)
    # A head block must tile the channel dim: all heads, or 2h channels filling whole sublane
    # tiles; largest first (fewest, most contiguous DMAs).
    head_options = [
        h
        for h in range(num_kv_heads, 0, -1)
        if num_kv_heads % h == 0 and (h == num_kv_heads or (2 * h) % kv_sub == 0)
    ]
    if num_kv_heads_per_block is not None:
        if num_kv_heads_per_block not in head_options:
            raise ValueError(
                f"num_kv_heads_per_block={num_kv_heads_per_block} must divide num_kv_heads="
                f"{num_kv_heads} and be all heads or a multiple of {kv_sub // 2}; "
                f"valid: {head_options}"
            )
        head_options = [num_kv_heads_per_block]
    explicit = (num_kv_pages_per_block, num_queries_per_block, num_kv_heads_per_block)

    def footprint(p: int, q: int, h: int) -> int:
        shape = dict(group=group, head_dim=head_dim, page_size=page_size)
        return vmem_footprint(
            block_q=q,
            pages_per_block=p,
            kv_heads_per_block=h,
            **shape,
            q_dtype=q_dtype,
            kv_dtype=kv_dtype,
            return_lse=return_lse,
        )

    heads = head_options[0]
    need = footprint(pages, bq, heads)
    if need > limit and all(x is not None for x in explicit):
        raise ValueError(
            f"ragged paged attention blocks (pages={pages}, queries={bq}, kv_heads={heads}) "
            f"need ~{need / 2**20:.1f} MiB of VMEM, over the {limit / 2**20:.1f} MiB limit; "
            "use smaller blocks or raise vmem_limit_bytes"
        )
    # Shrink the cheapest-to-lose dimension first: kv pages, then heads, then queries.
    while need > limit:
        if num_kv_pages_per_block is None and pages > 1:
            pages = max(1, pages // 2)
        elif len(head_options) > 1 and heads != head_options[-1]:
            heads = head_options[head_options.index(heads) + 1]
        elif num_queries_per_block is None and bq > sub:
            bq = max(sub, _round_up(bq // 2, sub))
        else:
            raise ValueError(
                f"ragged paged attention cannot fit VMEM: smallest blocks (pages={pages}, "
                f"queries={bq}, kv_heads={heads}) need ~{need / 2**20:.1f} MiB > limit "
                f"{limit / 2**20:.1f} MiB (head_dim={head_dim}, page_size={page_size})"
            )
        need = footprint(pages, bq, heads)
    return BlockSizes(pages, bq, heads, int(limit), int(need))
