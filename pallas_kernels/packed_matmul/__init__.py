"""x @ w on XLA:CPU with w stored as column panels (a C++ FFI kernel) and its reference."""

from meshserve.pallas_kernels.packed_matmul.ops import (
    PANEL,
    available,
    pack,
    packable,
    packed_matmul,
    packed_matmul_reference,
    unpack,
)

__all__ = [
    "PANEL",
    "available",
    "pack",
    "packable",
    "packed_matmul",
    "packed_matmul_reference",
    "unpack",
]
