"""Reading K and V out of the TPU kernel's interleaved page buffer in a form Mosaic handles
well (used by ``tpu_kernel``)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def load_kv(kv_buf: Any, slot: Any, h: int, keys: int, *, mosaic: bool) -> tuple[Any, Any]:
    """K and V ([keys, D] each) of block head h from the interleaved [keys, chans, D] buffer.

    The buffer is viewed as [keys * chans, D], so head h's K rows are rows 2h, 2h + chans, ...:
    a sublane-strided load, never an integer index on the sublane dim (which Mosaic turns into
    a relayout, and handles badly for packed dtypes). A 16-bit (K, V) pair is loaded as one u32
    row and split with shifts, since strided loads of packed rows are not supported. The TPU
    interpreter cannot read through reshaped or bitcast refs, so there the same view is built
    on the loaded value; the split and the indexing are shared."""
    _, _, chans, head_dim = kv_buf.shape
    dtype = kv_buf.dtype
    bits = jnp.dtype(dtype).itemsize * 8
    if bits not in (16, 32):
        # 8-bit caches: no strided path yet (it needs a 4-way u32 split); per-channel reads.
        return kv_buf[slot, :, 2 * h, :], kv_buf[slot, :, 2 * h + 1, :]
    if mosaic:
        flat = kv_buf.at[slot].reshape(keys * chans, head_dim)
        if bits == 32:
            return (flat[pl.ds(2 * h, keys, stride=chans), :],
                    flat[pl.ds(2 * h + 1, keys, stride=chans), :])
        pair = flat.bitcast(jnp.uint32)[pl.ds(h, keys, stride=chans // 2), :]
    else:
        flat = kv_buf[slot].reshape(keys * chans, head_dim)
        if bits == 32:
            return flat[2 * h :: chans], flat[2 * h + 1 :: chans]
        pair = pltpu.bitcast(flat, jnp.uint32)[h :: chans // 2]
    # K (the even row) is the low half of the u32, V the high half.
    if dtype == jnp.bfloat16:  # a bf16 is the top half of an f32: exact, no 16-bit vectors
        k = pltpu.bitcast(pair << 16, jnp.float32).astype(dtype)
        v = pltpu.bitcast(pair & jnp.uint32(0xFFFF0000), jnp.float32).astype(dtype)
        return k, v
    return (pltpu.bitcast((pair & jnp.uint32(0xFFFF)).astype(jnp.uint16), dtype),
            pltpu.bitcast((pair >> 16).astype(jnp.uint16), dtype))
