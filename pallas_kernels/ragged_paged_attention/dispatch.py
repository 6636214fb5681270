"""Backend dispatch for ragged paged attention: the entry point the engine calls."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from meshserve.pallas_kernels.ragged_paged_attention import (
    cpu_kernel,
    gpu_kernel,
    reference,
    tpu_kernel,
    validation,
)

IMPL_ENV_VAR = "MESHSERVE_ATTENTION_IMPL"
DEBUG_ENV_VAR = "MESHSERVE_ATTENTION_DEBUG"
IMPLS = ("auto", "reference", "cpu", "tpu", "gpu", "tpu-interpret", "gpu-interpret")
# A kernel in the Pallas interpreter, on any backend: how CI runs the engine on the TPU
# and GPU kernels, and how a kernel change is checked without the hardware.
INTERPRETED = {"tpu-interpret": "tpu", "gpu-interpret": "gpu"}
_BACKEND_OF_IMPL = {"tpu": ("tpu",), "gpu": ("gpu", "cuda", "rocm"), "cpu": ("cpu",)}


def resolve_impl(impl: str | None = None, backend: str | None = None) -> str:
    """Concrete implementation for ``impl`` (argument, else $MESHSERVE_ATTENTION_IMPL, else auto).

    auto picks the TPU kernel on TPU, the GPU kernel on GPU, the C++ kernel on CPU when it
    builds (see cpu_kernel), and the reference otherwise.
    """
    choice = impl if impl is not None else os.environ.get(IMPL_ENV_VAR, "auto")
    choice = (choice or "auto").strip().lower()
    if choice not in IMPLS:
        source = "impl argument" if impl is not None else f"${IMPL_ENV_VAR}"
        raise ValueError(f"{source}={choice!r} is not one of {IMPLS}")
    if choice != "auto":
        return choice
    backend = backend or jax.default_backend()
    for name, backends in _BACKEND_OF_IMPL.items():
        if backend in backends:
            if name == "cpu" and not cpu_kernel.available():
                return "reference"
            return name
    return "reference"


def chosen_impl(impl: str | None, q: jax.Array, kv_pages: jax.Array) -> str:
    """What ``ragged_paged_attention(..., impl=impl)`` runs for these operands: a kernel
    name ("tpu", "gpu", "cpu", the -interpret ones) or "reference" (auto on CPU takes the
    reference where the C++ kernel cannot run the dtypes/shapes)."""
    which = resolve_impl(impl)
    if which == "cpu" and impl in (None, "auto") and not cpu_kernel.supports(q, kv_pages):
        return "reference"
    return which


def _debug_enabled(debug: bool | None) -> bool:
    if debug is not None:
        return debug
    return os.environ.get(DEBUG_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def _check_dynamic(kv_pages_shape, num_tokens, kv_lens, page_indices, cu_q_lens, num_seqs):
    args = (kv_lens, page_indices, cu_q_lens, num_seqs)
    if any(isinstance(x, jax.core.Tracer) for x in args):
        # Under jit the values only exist at run time; the callback raises from there.
        def host_check(*vals):
            validation.validate_dynamic(kv_pages_shape, num_tokens, *map(np.asarray, vals))

        jax.debug.callback(host_check, *args)
    else:
        validation.validate_dynamic(kv_pages_shape, num_tokens, *args)


def ragged_paged_attention(
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
    impl: str | None = None,
    interpret: Any = False,
    debug: bool | None = None,
    tpu_options: Mapping[str, Any] | None = None,
    gpu_options: Mapping[str, Any] | None = None,
    page_mask: jax.Array | None = None,
    return_lse: bool = False,
) -> tuple[jax.Array, ...]:
    """Writes the step's new K/V into the paged cache, then runs causal ragged attention.

    Args:
      q: [T, num_q_heads, head_dim] query tokens of all sequences, concatenated and padded to
        the bucket size T.
      k, v: [T, num_kv_heads, head_dim] the step's new keys/values, one per query token.
      kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim]; K of kv head h at channel
        2h, V at 2h + 1.
      kv_lens: int32[max_seqs] length of each sequence after this step.
      page_indices: int32[max_seqs, pages_per_seq] page table.
      cu_q_lens: int32[max_seqs + 1] cumulative query lengths.
      num_seqs: int32[1] number of valid sequences.
      sm_scale: softmax scale, default 1 / sqrt(head_dim).
      sliding_window: query at position p attends keys in (p - sliding_window, p].
      soft_cap: logits become soft_cap * tanh(logits / soft_cap).
      impl: "auto" | "reference" | "cpu" | "tpu" | "gpu" | "tpu-interpret" |
        "gpu-interpret"; default from $MESHSERVE_ATTENTION_IMPL. auto takes the reference
        where "cpu" cannot run these dtypes/shapes (see ``cpu_kernel.supports``); the
        -interpret ones run that kernel in the Pallas interpreter on any backend.
      interpret: run a Pallas kernel in the interpreter (True, or pltpu.InterpretParams for
        the TPU kernel), which works on CPU.
      debug: validate the runtime metadata on the host (default from
        $MESHSERVE_ATTENTION_DEBUG); costs a device->host sync.
      tpu_options / gpu_options: block-size overrides forwarded to the chosen kernel
        (the GPU kernel's also ``num_kv_splits``, see ``gpu_block_sizes``).
      page_mask: bool[max_seqs, pages_per_seq], only with return_lse: the pages this device
        holds (context parallelism). Tokens on other pages write nothing, and only keys on
        held pages are attended; other entries of page_indices are never read.
      return_lse: also return each row's log-sum-exp so that partials over disjoint pages
        merge exactly (``reference.merge_partials``).

    Returns:
      (out [T, num_q_heads, head_dim] in q.dtype with zero padding rows, updated kv_pages);
      with return_lse (out in float32, lse float32[T, num_q_heads], kv_pages), where a row
      that saw no key (no held page in its range, or padding) has out 0 and lse MASK_VALUE
      (finite, so a merge never computes inf - inf; merge_partials gives it weight 0).
    """
    validation.validate_static(
        q,
        k,
        v,
        kv_pages,
        kv_lens,
        page_indices,
        cu_q_lens,
        num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    if _debug_enabled(debug):
        _check_dynamic(kv_pages.shape, q.shape[0], kv_lens, page_indices, cu_q_lens, num_seqs)
    which = chosen_impl(impl, q, kv_pages)
    if which in INTERPRETED:
        which, interpret = INTERPRETED[which], interpret or True
    backend = jax.default_backend()
    if which in _BACKEND_OF_IMPL and not interpret and backend not in _BACKEND_OF_IMPL[which]:
        raise ValueError(
            f"ragged paged attention impl={which!r} needs a {which.upper()} backend but the "
            f"default backend is {backend!r}; pass interpret=True to run it in the Pallas "
            "interpreter, or use impl='reference'"
        )
    args = (q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    common = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if return_lse:
        common.update(page_mask=page_mask, return_lse=True)
    elif page_mask is not None:
        raise ValueError("page_mask needs return_lse=True: a partial without its "
                         "log-sum-exp cannot be merged")
    if which == "tpu":
        return tpu_kernel.ragged_paged_attention_tpu(
            *args, **common, interpret=interpret, **dict(tpu_options or {})
        )
    if which == "cpu":
        return cpu_kernel.ragged_paged_attention_cpu(*args, **common)
    if which == "gpu":
        return gpu_kernel.ragged_paged_attention_gpu(
            *args, **common, interpret=bool(interpret), **dict(gpu_options or {})
        )
    return reference.ragged_paged_attention_reference(*args, **common)
