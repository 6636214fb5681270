"""Input checks for ragged paged attention, plus a generator of valid random batches.

``validate_static`` runs at trace time on shapes/dtypes only (free under jit).
``validate_dynamic`` pulls the small metadata arrays to the host; it is meant for debug mode
because it forces a device->host sync.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def validate_static(
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
) -> None:
    """Raises ValueError when shapes, dtypes or static options break the contract."""
    if len(_shape(q)) != 3:
        raise ValueError(f"q must be [T, num_q_heads, head_dim], got shape {_shape(q)}")
    num_tokens, num_q_heads, head_dim = _shape(q)
    if len(_shape(kv_pages)) != 4:
        raise ValueError(
            "kv_pages must be [num_pages, page_size, 2 * num_kv_heads, head_dim], "
            f"got shape {_shape(kv_pages)}"
        )
    num_pages, page_size, num_combined, kv_head_dim = _shape(kv_pages)
    if num_combined % 2:
        raise ValueError(
            f"kv_pages channel dim must be 2 * num_kv_heads (K/V interleaved), got {num_combined}"
        )
    num_kv_heads = num_combined // 2
    if num_kv_heads == 0 or num_pages == 0 or page_size == 0:
        raise ValueError(f"kv_pages has an empty dimension: {_shape(kv_pages)}")
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) != head_dim of kv_pages ({kv_head_dim})")
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
        )
    for name, x in (("k", k), ("v", v)):
        if _shape(x) != (num_tokens, num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be [T, num_kv_heads, head_dim] = "
                f"{(num_tokens, num_kv_heads, head_dim)}, got {_shape(x)}"
            )
    for name, x in (("q", q), ("k", k), ("v", v), ("kv_pages", kv_pages)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
    if k.dtype != v.dtype:
        raise ValueError(f"k and v must share a dtype, got {k.dtype} and {v.dtype}")
    if len(_shape(page_indices)) != 2:
        raise ValueError(
            f"page_indices must be [max_seqs, pages_per_seq], got shape {_shape(page_indices)}"
        )
    max_seqs, pages_per_seq = _shape(page_indices)
    if max_seqs == 0 or pages_per_seq == 0:
        raise ValueError(f"page_indices has an empty dimension: {_shape(page_indices)}")
    expected = {
        "kv_lens": (kv_lens, (max_seqs,)),
        "page_indices": (page_indices, (max_seqs, pages_per_seq)),
        "cu_q_lens": (cu_q_lens, (max_seqs + 1,)),
        "num_seqs": (num_seqs, (1,)),
    }
    for name, (x, shape) in expected.items():
        if _shape(x) != shape:
            raise ValueError(
                f"{name} must have shape {shape} (max_seqs = page_indices.shape[0] = "
                f"{max_seqs}), got {_shape(x)}"
            )
        if x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")
    if sliding_window is not None and (
        not isinstance(sliding_window, int | np.integer) or sliding_window <= 0
    ):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if soft_cap is not None and not (np.isfinite(soft_cap) and soft_cap > 0):
        raise ValueError(f"soft_cap must be a positive finite float or None, got {soft_cap!r}")
    if sm_scale is not None and not np.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be finite, got {sm_scale!r}")


def validate_page_mask(page_mask: jax.Array, page_indices: jax.Array) -> None:
    """A page mask (the pages this device holds) is a bool twin of the page table."""
    if _shape(page_mask) != _shape(page_indices) or page_mask.dtype != jnp.bool_:
        raise ValueError(
            f"page_mask must be bool with page_indices' shape {_shape(page_indices)}, got "
            f"{page_mask.dtype}{list(_shape(page_mask))}"
        )


def lse_page_mask(
    page_mask: jax.Array | None, page_indices: jax.Array, return_lse: bool
) -> jax.Array | None:
    """The mask of the partial-output path: None without ``return_lse`` (a partial without
    its log-sum-exp cannot be merged, so a mask alone is refused), all pages if not given."""
    if not return_lse:
        if page_mask is not None:
            raise ValueError("page_mask needs return_lse=True: a partial without its "
                             "log-sum-exp cannot be merged")
        return None
    if page_mask is None:
        return jnp.ones(_shape(page_indices), jnp.bool_)
    validate_page_mask(page_mask, page_indices)
    return page_mask


def validate_dynamic(
    kv_pages_shape: Sequence[int],
    num_tokens: int,
    kv_lens: ArrayLike,
    page_indices: ArrayLike,
    cu_q_lens: ArrayLike,
    num_seqs: ArrayLike,
) -> None:
    """Host-side checks of the runtime metadata; raises ValueError naming the first violation."""
    num_pages, page_size = int(kv_pages_shape[0]), int(kv_pages_shape[1])
    kv_lens = np.asarray(kv_lens)
    page_indices = np.asarray(page_indices)
    cu_q_lens = np.asarray(cu_q_lens)
    n = int(np.asarray(num_seqs).reshape(-1)[0])
    max_seqs, pages_per_seq = page_indices.shape
    if not 0 <= n <= max_seqs:
        raise ValueError(f"num_seqs={n} must be in [0, max_seqs={max_seqs}]")
    cu = cu_q_lens[: n + 1].astype(np.int64)
    if cu[0] != 0:
        raise ValueError(f"cu_q_lens[0] must be 0, got {cu[0]}")
    if np.any(np.diff(cu) < 0):
        i = int(np.argmax(np.diff(cu) < 0))
        raise ValueError(f"cu_q_lens must be non-decreasing: cu_q_lens[{i + 1}] < cu_q_lens[{i}]")
    if cu[-1] > num_tokens:
        raise ValueError(f"cu_q_lens[num_seqs]={cu[-1]} exceeds the token bucket T={num_tokens}")
    q_lens = np.diff(cu)
    lens = kv_lens[:n].astype(np.int64)
    for i in range(n):
        if lens[i] < q_lens[i]:
            raise ValueError(f"sequence {i}: kv_len={lens[i]} < q_len={q_lens[i]}")
    needed = -(-lens // page_size)
    if n and needed.max(initial=0) > pages_per_seq:
        i = int(np.argmax(needed))
        raise ValueError(
            f"sequence {i}: kv_len={lens[i]} needs {needed[i]} pages of {page_size} but the page "
            f"table has {pages_per_seq} columns"
        )
    for i in range(n):
        ids = page_indices[i, : needed[i]]
        bad = (ids < 0) | (ids >= num_pages)
        if np.any(bad):
            j = int(np.argmax(bad))
            raise ValueError(
                f"sequence {i}: page_indices[{i}, {j}]={ids[j]} out of range [0, {num_pages})"
            )
    # Two tokens writing the same slot would make the result order-dependent.
    written = []
    for i in range(n):
        pos = np.arange(lens[i] - q_lens[i], lens[i])
        written.append(
            page_indices[i, pos // page_size].astype(np.int64) * page_size + pos % page_size
        )
    if written:
        flat = np.concatenate(written)
        if np.unique(flat).size != flat.size:
            raise ValueError("two tokens of this step write the same (page, slot)")


@dataclasses.dataclass
class RaggedBatch:
    """Inputs of one attention call plus the facts tests need to check it."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    kv_pages: jax.Array
    kv_lens: jax.Array
    page_indices: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array
    q_lens: list[int]
    seq_kv_lens: list[int]

    def args(self) -> tuple[jax.Array, ...]:
        return (
            self.q,
            self.k,
            self.v,
            self.kv_pages,
            self.kv_lens,
            self.page_indices,
            self.cu_q_lens,
            self.num_seqs,
        )


def random_ragged_batch(
    seqs: Sequence[tuple[int, int]],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    num_tokens: int | None = None,
    max_seqs: int | None = None,
    pages_per_seq: int | None = None,
    extra_pages: int = 4,
    num_pages: int | None = None,
    dtype: DTypeLike = jnp.float32,
    nan_fill: bool = True,
    seed: int = 0,
) -> RaggedBatch:
    """Builds a valid batch from (q_len, kv_len) per sequence.

    ``num_pages`` fixes the cache size (default: what the batch needs plus ``extra_pages``).
    With ``nan_fill`` every value the kernel must not read is NaN: unused pages, slots past
    kv_len, the slots this step is about to write, padding tokens' q/k/v, and unused page-table
    entries point at NaN pages. Any stray read then shows up as NaN in the output.
    """
    rng = np.random.default_rng(seed)
    n = len(seqs)
    q_lens = [q for q, _ in seqs]
    kv_lens = [kv for _, kv in seqs]
    for q_len, kv_len in seqs:
        if not 0 <= q_len <= kv_len:
            raise ValueError(f"bad (q_len, kv_len)=({q_len}, {kv_len})")
    total = sum(q_lens)
    num_tokens = total if num_tokens is None else num_tokens
    max_seqs = n if max_seqs is None else max_seqs
    need = [-(-kv // page_size) for kv in kv_lens]
    pages_per_seq = max(max(need, default=1), 1) if pages_per_seq is None else pages_per_seq
    if total > num_tokens or n > max_seqs or max(need, default=0) > pages_per_seq:
        raise ValueError("batch does not fit the requested bucket")
    if num_pages is None:
        num_pages = sum(need) + extra_pages
    elif num_pages < sum(need):
        raise ValueError(f"num_pages={num_pages} < {sum(need)} pages the batch needs")
    perm = rng.permutation(num_pages)
    spare = perm[sum(need) :]  # never referenced by a valid sequence
    fill = np.nan if nan_fill else 0.0
    pages = np.full((num_pages, page_size, 2 * num_kv_heads, head_dim), fill, np.float32)
    table = np.empty((max_seqs, pages_per_seq), np.int32)
    table[:] = spare[0] if len(spare) else 0
    off = 0
    for i, (q_len, kv_len) in enumerate(seqs):
        table[i, : need[i]] = perm[off : off + need[i]]
        off += need[i]
        old = kv_len - q_len  # cached context written by earlier steps
        pos = np.arange(old)
        pages[table[i, pos // page_size], pos % page_size] = rng.standard_normal(
            (old, 2 * num_kv_heads, head_dim)
        )
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    cu[n + 1 :] = total + 7  # garbage past num_seqs must be ignored
    lens = np.full(max_seqs, 1 << 20, np.int32)  # garbage past num_seqs must be ignored
    lens[:n] = kv_lens
    q = np.full((num_tokens, num_q_heads, head_dim), fill, np.float32)
    k = np.full((num_tokens, num_kv_heads, head_dim), fill, np.float32)
    v = np.full((num_tokens, num_kv_heads, head_dim), fill, np.float32)
    q[:total] = rng.standard_normal((total, num_q_heads, head_dim))
    k[:total] = rng.standard_normal((total, num_kv_heads, head_dim))
    v[:total] = rng.standard_normal((total, num_kv_heads, head_dim))
    return RaggedBatch(
        q=jnp.asarray(q, dtype),
        k=jnp.asarray(k, dtype),
        v=jnp.asarray(v, dtype),
        kv_pages=jnp.asarray(pages, dtype),
        kv_lens=jnp.asarray(lens),
        page_indices=jnp.asarray(table),
        cu_q_lens=jnp.asarray(cu),
        num_seqs=jnp.asarray([n], jnp.int32),
        q_lens=q_lens,
        seq_kv_lens=kv_lens,
    )
