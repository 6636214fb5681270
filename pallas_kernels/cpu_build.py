"""Builds and loads the C++ XLA FFI kernels for CPU (cached per machine).

Each kernel is compiled once with the system C++ compiler (g++ or $CXX) into a cache
directory ($MESHSERVE_KERNEL_CACHE, default ~/.cache/meshserve/kernels), keyed by its
source, the shared header, the compiler, the flags, jax's version and this CPU's features
(-march=native), then loaded with ctypes and registered as an FFI target.
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

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "MESHSERVE_KERNEL_CACHE"
HERE = os.path.dirname(os.path.abspath(__file__))
_HEADERS = (os.path.join(HERE, "cpu_common.h"),)
# fast-math lets GCC vectorise expf and reductions; the kernels keep every intermediate
# finite (no infinities as "minus infinity" markers), so its assumptions hold.
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-ffast-math")
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | Exception] = {}


class KernelBuildError(RuntimeError):
    pass


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join([ln for ln in f if ln.startswith(("flags", "model name"))][:2])
    except OSError:
        return platform.processor()


def _build(source: str) -> str:
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise KernelBuildError("no C++ compiler (g++ or $CXX) on PATH")
    parts = []
    for path in (source, *_HEADERS):
        with open(path, "rb") as f:
            parts.append(f.read())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    parts += [x.encode() for x in (version, " ".join(_FLAGS), jax.__version__, _cpu_signature())]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    cache = os.environ.get(CACHE_ENV_VAR) or os.path.join(
        os.path.expanduser("~"), ".cache", "meshserve", "kernels"
    )
    name = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(cache, f"{name}_{key}.so")
    if os.path.exists(path):
        return path
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError:  # a read-only home: build into the temp dir instead
        cache = os.path.join(tempfile.gettempdir(), f"meshserve-kernels-{os.getuid()}")
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, os.path.basename(path))
        if os.path.exists(path):
            return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{HERE}", source, "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    os.replace(tmp, path)  # atomic: concurrent builders leave one complete library
    return path


def load(source: str, targets: dict[str, str]) -> None:
    """Builds `source` (once) and registers {ffi target name: exported symbol} on CPU.

    Raises KernelBuildError (also on later calls) when the kernel cannot be built.
    """
    with _lock:
        state = _loaded.get(source)
        if isinstance(state, Exception):
            raise KernelBuildError(str(state))
        if state is not None:
            return
        try:
            lib = ctypes.CDLL(_build(source))
            for target, symbol in targets.items():
                capsule = jax.ffi.pycapsule(getattr(lib, symbol))
                jax.ffi.register_ffi_target(target, capsule, platform="cpu")
        except (KernelBuildError, OSError, AttributeError) as e:
            _loaded[source] = e
            raise KernelBuildError(str(e)) from e
        _loaded[source] = lib


def available(source: str, targets: dict[str, str]) -> bool:
    """True when the kernel is built and registered (building it on first call)."""
    try:
        load(source, targets)
        return True
    except KernelBuildError as e:
        log.warning("CPU kernel %s unavailable, using XLA instead: %s", source, e)
        return False
