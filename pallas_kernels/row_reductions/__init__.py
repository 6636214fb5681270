"""Row reductions of logits for sampling on XLA:CPU (a C++ FFI kernel) and their reference."""

from meshserve.pallas_kernels.row_reductions.ops import (
    argmax_log_norm,
    argmax_log_norm_reference,
    available,
    first_argmax,
)

__all__ = ["argmax_log_norm", "argmax_log_norm_reference", "available", "first_argmax"]
