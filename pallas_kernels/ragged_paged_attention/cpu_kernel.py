"""Ragged paged attention on XLA:CPU through a small C++ FFI kernel (cpu_kernel.cc).

XLA:CPU runs the pure-JAX reference as a loop of small gathers and batched dots, which
reaches a few GB/s on decode batches; the kernel reads each sequence's pages in place.
It is built once per machine by ``pallas_kernels.cpu_build``; where no compiler is
available ``available()`` is False and dispatch uses the reference.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from meshserve.pallas_kernels import cpu_build
from meshserve.pallas_kernels.ragged_paged_attention import reference, validation

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernel.cc")
TARGET = "meshserve_ragged_paged_attention_cpu"
LOCAL_TARGET = "meshserve_ragged_paged_attention_cpu_local"  # page mask + lse
_TARGETS = {TARGET: "MeshserveRaggedPagedAttention",
            LOCAL_TARGET: "MeshserveRaggedPagedAttentionLocal"}
KernelBuildError = cpu_build.KernelBuildError


def load() -> None:
    """Builds (once per machine) and registers the kernel; raises KernelBuildError."""
    cpu_build.load(SOURCE, _TARGETS)


def available() -> bool:
    return cpu_build.available(SOURCE, _TARGETS)


def supports(q: jax.Array, kv_pages: jax.Array) -> bool:
    """The kernel computes in f32 (the CPU compute dtype) with modest head shapes."""
    group = q.shape[1] // max(1, kv_pages.shape[2] // 2)
    return (
        q.dtype == jnp.float32
        and kv_pages.dtype == jnp.float32
        and group <= 32
        and q.shape[2] <= 256
    )


def attention_from_pages(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    page_mask: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention over pages that already hold the step's K/V (like the reference's); with
    ``page_mask`` only over held pages, returning (out, lse)."""
    load()
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    extra = ()
    if page_mask is not None:
        out_shape = (out_shape, jax.ShapeDtypeStruct(q.shape[:2], jnp.float32))
        extra = (page_mask.astype(jnp.int32),)
    call = jax.ffi.ffi_call(
        TARGET if page_mask is None else LOCAL_TARGET,
        out_shape,
        vmap_method="sequential",
    )
    return call(
        q,
        kv_pages,
        kv_lens.astype(jnp.int32),
        page_indices.astype(jnp.int32),
        cu_q_lens.astype(jnp.int32),
        num_seqs.astype(jnp.int32),
        *extra,
        sm_scale=np.float32(sm_scale),
        soft_cap=np.float32(soft_cap or 0.0),
        window=np.int32(sliding_window or 0),
    )


def ragged_paged_attention_cpu(
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
    page_mask: jax.Array | None = None,
    return_lse: bool = False,
) -> tuple[jax.Array, ...]:
    """Same contract as ``dispatch.ragged_paged_attention``: scatter K/V, then attend."""
    args = (q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    validation.validate_static(*args, **options)
    page_mask = validation.lse_page_mask(page_mask, page_indices, return_lse)
    if not supports(q, kv_pages):
        raise ValueError(
            f"the CPU kernel takes f32 q/pages, <= 32 query heads per kv head and head_dim "
            f"<= 256; got q {q.dtype}{list(q.shape)}, pages {kv_pages.dtype}"
        )
    if page_mask is None:
        kv_pages = reference.write_kv_pages(
            k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs
        )
        out = attention_from_pages(
            q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, **options
        )
        return out, kv_pages
    # Other devices' pages: an out-of-range id drops the write, and the kernel skips them.
    write_table = jnp.where(page_mask, page_indices, kv_pages.shape[0])
    kv_pages = reference.write_kv_pages(k, v, kv_pages, kv_lens, write_table, cu_q_lens, num_seqs)
    out, lse = attention_from_pages(
        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, **options, page_mask=page_mask
    )
    return out, lse, kv_pages
