"""Ragged paged attention on XLA:CPU through a small C++ FFI kernel (cpu_kernel.cc).

XLA:CPU runs the pure-JAX reference as a loop of small gathers and batched dots, which
reaches a few GB/s on decode batches; the kernel reads each sequence's pages in place.
It is compiled once per machine with the system C++ compiler into a cache directory
($MESHSERVE_KERNEL_CACHE, default ~/.cache/meshserve/kernels) and loaded with ctypes.
Where no compiler is available `available()` is False and dispatch uses the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention import reference, validation

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernel.cc")
TARGET = "meshserve_ragged_paged_attention_cpu"
CACHE_ENV_VAR = "MESHSERVE_KERNEL_CACHE"
# fast-math lets GCC vectorise expf and the dot reductions; the kernel keeps its running
# maxima finite, so the finite-math assumption holds for finite inputs.
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-ffast-math")
_lock = threading.Lock()
_state: dict[str, object] = {}


class KernelBuildError(RuntimeError):
    pass


def _cpu_signature() -> str:
    # -march=native bakes in this CPU's features: the cache key must include them.
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "".join(lines)


def _library_path() -> str:
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise KernelBuildError("no C++ compiler (g++ or $CXX) on PATH")
    with open(SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join(
            x.encode() if isinstance(x, str) else x
            for x in (source, version, " ".join(_FLAGS), jax.__version__, _cpu_signature())
        )
    ).hexdigest()[:20]
    cache = os.environ.get(CACHE_ENV_VAR) or os.path.join(
        os.path.expanduser("~"), ".cache", "meshserve", "kernels"
    )
    path = os.path.join(cache, f"rpa_cpu_{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    os.replace(tmp, path)  # atomic: concurrent builders leave one complete library
    return path


def load() -> None:
    """Builds (once per machine) and registers the kernel; raises KernelBuildError."""
    with _lock:
        if "error" in _state:
            raise KernelBuildError(str(_state["error"]))
        if "lib" in _state:
            return
        try:
            lib = ctypes.CDLL(_library_path())
            jax.ffi.register_ffi_target(
                TARGET, jax.ffi.pycapsule(lib.MeshserveRaggedPagedAttention), platform="cpu"
            )
        except (KernelBuildError, OSError) as e:
            _state["error"] = e
            raise KernelBuildError(str(e)) from e
        _state["lib"] = lib


def available() -> bool:
    """True when the kernel is built and registered (building it on first call)."""
    try:
        load()
        return True
    except KernelBuildError as e:
        log.warning("CPU attention kernel unavailable, using the JAX reference: %s", e)
        return False


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
) -> jax.Array:
    """Attention over pages that already hold the step's K/V (like the reference's)."""
    load()
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    call = jax.ffi.ffi_call(
        TARGET,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        vmap_method="sequential",
    )
    return call(
        q,
        kv_pages,
        kv_lens.astype(jnp.int32),
        page_indices.astype(jnp.int32),
        cu_q_lens.astype(jnp.int32),
        num_seqs.astype(jnp.int32),
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
) -> tuple[jax.Array, jax.Array]:
    """Same contract as ``dispatch.ragged_paged_attention``: scatter K/V, then attend."""
    args = (q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    validation.validate_static(*args, **options)
    if not supports(q, kv_pages):
        raise ValueError(
            f"the CPU kernel takes f32 q/pages, <= 32 query heads per kv head and head_dim "
            f"<= 256; got q {q.dtype}{list(q.shape)}, pages {kv_pages.dtype}"
        )
    kv_pages = reference.write_kv_pages(k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    out = attention_from_pages(
        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, **options
    )
    return out, kv_pages
