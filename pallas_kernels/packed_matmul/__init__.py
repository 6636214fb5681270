"""x @ w on XLA:CPU with w stored as column panels (a C++ FFI kernel) and its reference."""

from meshserve.pallas_kernels.packed_matmul.ops import (
    PANEL,
    available,
    grouped_packed_matmul,
    grouped_packed_matmul_reference,
    pack,
    packable,
    packed_matmul,
    packed_matmul_reference,
    unpack,
)

__all__ = [
    "PANEL",
    "available",
    "grouped_packed_matmul",
    "grouped_packed_matmul_reference",
    "pack",
    "packable",
    "packed_matmul",
    "packed_matmul_reference",
    "unpack",
]
