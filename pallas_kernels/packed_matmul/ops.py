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
GROUPED_TARGET = "meshserve_grouped_packed_matmul"
_TARGETS = {TARGET: "MeshservePackedMatmul", GROUPED_TARGET: "MeshserveGroupedPackedMatmul"}


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


def grouped_packed_matmul(
    x: jax.Array,
    packed: jax.Array,
    tile_expert: jax.Array,
    rows_used: jax.Array,
    num_tiles: jax.Array,
) -> jax.Array:
    """Mixture-of-experts grouped matmul: x [tiles * R, K] in tiles of R rows, tile j
    times expert tile_expert[j]'s packed weight (packed: [E, N / PANEL, K, PANEL]), for
    the first num_tiles tiles and their first rows_used[j] rows; other rows of the
    result are unspecified. Reads only the weights of experts some used tile names."""
    cpu_build.load(SOURCE, _TARGETS)
    rows_total, k = x.shape
    experts, panels, k_w, panel = packed.shape
    tiles = tile_expert.shape[0]
    if (k != k_w or panel != PANEL or x.dtype != jnp.float32 or packed.dtype != jnp.float32
            or rows_total % tiles or rows_used.shape != (tiles,)):
        raise ValueError(
            f"grouped packed matmul takes f32 x [tiles*R, K], w [E, N/{PANEL}, K, {PANEL}], "
            f"tile_expert and rows_used [tiles]; got x {x.dtype}{list(x.shape)}, "
            f"w {packed.dtype}{list(packed.shape)}, tiles {tiles}")
    call = jax.ffi.ffi_call(
        GROUPED_TARGET, jax.ShapeDtypeStruct((rows_total, panels * PANEL), jnp.float32),
        vmap_method="sequential",
    )
    i32 = jnp.int32
    return call(x, packed, tile_expert.astype(i32), rows_used.astype(i32),
                jnp.reshape(num_tiles, (1,)).astype(i32))


def grouped_packed_matmul_reference(x, packed, tile_expert, rows_used, num_tiles):
    """Pure-JAX reference: every tile's rows times its expert's weight; rows past
    rows_used and tiles past num_tiles are zero (the kernel leaves them unspecified)."""
    tiles = tile_expert.shape[0]
    rows = x.shape[0] // tiles
    w = jax.vmap(unpack)(packed)[tile_expert]  # [tiles, K, N]
    y = jnp.einsum("trk,tkn->trn", x.reshape(tiles, rows, -1), w,
                   precision=jax.lax.Precision.HIGHEST)
    live = (jnp.arange(rows)[None, :] < rows_used[:, None]) & (
        jnp.arange(tiles)[:, None] < num_tiles)
    return jnp.where(live[..., None], y, 0.0).reshape(x.shape[0], -1)
