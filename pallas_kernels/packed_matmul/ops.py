"""Panel-packed weights and the matmul that reads them.

A weight w [K, N] (N a multiple of PANEL) is stored as [N / PANEL, K, PANEL]: panel p
holds columns [p * PANEL, (p + 1) * PANEL) row after row, so a thread streams it front to
back. The packed array has as many elements as w; callers may keep w's shape for it (a
free reshape) so that parameter trees, shardings and compiled signatures do not change.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from meshserve.pallas_kernels import cpu_build

PANEL = 32
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.cc")
TARGET = "meshserve_packed_matmul"
_TARGETS = {TARGET: "MeshservePackedMatmul"}


def available() -> bool:
    """True when the kernel builds on this machine (built once, then cached)."""
    return cpu_build.available(SOURCE, _TARGETS)


def packable(k: int, n: int, dtype) -> bool:
    return n % PANEL == 0 and k > 0 and jnp.dtype(dtype) == jnp.float32


@jax.jit
def pack(w: jax.Array) -> jax.Array:
    """[K, N] -> [N / PANEL, K, PANEL]."""
    k, n = w.shape
    return w.reshape(k, n // PANEL, PANEL).transpose(1, 0, 2)


def unpack(packed: jax.Array) -> jax.Array:
    """[N / PANEL, K, PANEL] -> [K, N]."""
    panels, k, panel = packed.shape
    return packed.transpose(1, 0, 2).reshape(k, panels * panel)


def packed_matmul(x: jax.Array, packed: jax.Array) -> jax.Array:
    """x [M, K] f32 times the packed weight [N / PANEL, K, PANEL] -> [M, N] f32."""
    cpu_build.load(SOURCE, _TARGETS)
    m, k = x.shape
    panels, k_w, panel = packed.shape
    if k != k_w or panel != PANEL or x.dtype != jnp.float32 or packed.dtype != jnp.float32:
        raise ValueError(
            f"packed matmul takes f32 x [M, K] and w [N/{PANEL}, K, {PANEL}]; "
            f"got x {x.dtype}{list(x.shape)}, w {packed.dtype}{list(packed.shape)}"
        )
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct((m, panels * PANEL), jnp.float32),
        vmap_method="sequential",
    )
    return call(x, packed)


def packed_matmul_reference(x: jax.Array, packed: jax.Array) -> jax.Array:
    return jnp.dot(x, unpack(packed), precision=jax.lax.Precision.HIGHEST)
