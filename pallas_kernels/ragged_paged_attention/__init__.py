"""Ragged paged attention: one call for decode, prefill and chunked prefill in a batch.

``ragged_paged_attention`` dispatches to the TPU kernel, the GPU kernel, the C++ CPU kernel
or the pure-JAX reference (see ``dispatch``). ``write_kv_pages`` only writes the step's new
K/V into pages. With ``page_mask`` and ``return_lse`` every backend computes one device's
part of context-parallel attention (``reference.merge_partials`` merges the parts).
"""

from meshserve.pallas_kernels.ragged_paged_attention.cpu_kernel import ragged_paged_attention_cpu
from meshserve.pallas_kernels.ragged_paged_attention.dispatch import (
    DEBUG_ENV_VAR,
    IMPL_ENV_VAR,
    IMPLS,
    ragged_paged_attention,
    resolve_impl,
)
from meshserve.pallas_kernels.ragged_paged_attention.gpu_kernel import ragged_paged_attention_gpu
from meshserve.pallas_kernels.ragged_paged_attention.reference import (
    ragged_paged_attention_reference,
    write_kv_pages,
)
from meshserve.pallas_kernels.ragged_paged_attention.tpu_block_sizes import (
    choose_block_sizes,
    vmem_footprint,
)
from meshserve.pallas_kernels.ragged_paged_attention.tpu_kernel import ragged_paged_attention_tpu
from meshserve.pallas_kernels.ragged_paged_attention.validation import (
    validate_dynamic,
    validate_static,
)

__all__ = [
    "DEBUG_ENV_VAR",
    "IMPLS",
    "IMPL_ENV_VAR",
    "choose_block_sizes",
    "ragged_paged_attention",
    "ragged_paged_attention_cpu",
    "ragged_paged_attention_gpu",
    "ragged_paged_attention_reference",
    "ragged_paged_attention_tpu",
    "resolve_impl",
    "validate_dynamic",
    "validate_static",
    "vmem_footprint",
    "write_kv_pages",
]
