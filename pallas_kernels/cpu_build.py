"""Builds and loads the C++ XLA FFI kernels for CPU (cached per user).

Each kernel is compiled once with the system C++ compiler (g++ or $CXX) into a private
cache directory ($MESHSERVE_KERNEL_CACHE, default `$XDG_CACHE_HOME/meshserve/kernels`
or `~/.cache/meshserve/kernels`), keyed by its source, the shared header, the compiler,
the flags, jax's version and this CPU's features (-march=native), then loaded with
ctypes and registered as an FFI target.

A shared library is code: it is loaded only from a directory the user owns and nobody
else may write (created 0700), and only if the user owns the file itself. There is no
fallback into a shared temp directory, where another user could plant a library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import threading

import jax

from meshserve.meshes.compile_cache import PrivateDirError, private_directory, user_cache_path

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "MESHSERVE_KERNEL_CACHE"
HERE = os.path.dirname(os.path.abspath(__file__))
_HEADERS = (os.path.join(HERE, "cpu_common.h"),)
# No -ffast-math: it lets the compiler assume no NaN or inf, and then NaN and inf inputs
# would not propagate as in the references. The flags kept from it only let sums be
# reordered (vectorised) and math inline; cpu_common.h declares the vector expf.
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
          "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros", "-freciprocal-math",
          "-ffp-contract=fast")
# The kernels use C++17 and GCC/Clang vector extensions.
MIN_VERSIONS = {"g++": (9, 0), "clang++": (10, 0)}
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | Exception] = {}
_toolchain: tuple[str, str] | KernelBuildError | None = None


class KernelBuildError(RuntimeError):
    pass


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join([ln for ln in f if ln.startswith(("flags", "model name"))][:2])
    except OSError:
        return platform.processor()


def compiler_version(compiler: str) -> tuple[str, tuple[int, int], str] | None:
    """(kind "g++" | "clang++", (major, minor), --version text); None if unrecognised."""
    run = lambda *args: subprocess.run([compiler, *args], capture_output=True,  # noqa: E731
                                       text=True, timeout=60).stdout.strip()
    text = run("--version")
    kind = "clang++" if "clang" in text.lower() else "g++"
    number = run("-dumpversion") if kind == "clang++" else run("-dumpfullversion",
                                                                "-dumpversion")
    match = re.match(r"(\d+)(?:\.(\d+))?", number)
    if not text or match is None:
        return None
    return kind, (int(match[1]), int(match[2] or 0)), text


def _find_toolchain() -> tuple[str, str]:
    """(compiler path, its --version text), or KernelBuildError naming what is needed;
    decided once per process."""
    global _toolchain
    if _toolchain is None:
        needed = " or ".join(f"{k} >= {a}.{b}" for k, (a, b) in MIN_VERSIONS.items())
        compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
        found = compiler_version(compiler) if compiler else None
        if compiler is None:
            _toolchain = KernelBuildError(f"no C++ compiler on PATH (needs {needed}, or $CXX)")
        elif found is None:
            _toolchain = KernelBuildError(f"{compiler}: unknown compiler (needs {needed})")
        elif found[1] < MIN_VERSIONS[found[0]]:
            _toolchain = KernelBuildError(
                f"{compiler} is {found[0]} {found[1][0]}.{found[1][1]}; the kernels need "
                f"{needed}")
        else:
            _toolchain = (compiler, found[2])
    if isinstance(_toolchain, KernelBuildError):
        raise _toolchain
    return _toolchain


def cache_dir() -> str:
    """The kernel cache, created 0700 and checked to be the user's own and private."""
    path = os.environ.get(CACHE_ENV_VAR) or user_cache_path("kernels")
    try:
        return private_directory(path, "kernel cache", CACHE_ENV_VAR)
    except PrivateDirError as e:
        raise KernelBuildError(str(e)) from e


def _check_library(path: str) -> None:
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise KernelBuildError(f"refusing to load {path}: not a regular file of yours that "
                               f"only you can write")


def _build(source: str) -> str:
    compiler, version = _find_toolchain()
    parts = []
    for path in (source, *_HEADERS):
        with open(path, "rb") as f:
            parts.append(f.read())
    parts += [x.encode() for x in (version, " ".join(_FLAGS), jax.__version__, _cpu_signature())]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    cache = cache_dir()
    name = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(cache, f"{name}_{key}.so")
    if os.path.exists(path):
        _check_library(path)
        return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{HERE}", source, "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    os.chmod(tmp, 0o700)
    os.replace(tmp, path)  # atomic: concurrent builders leave one complete library
    _check_library(path)
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


_warned: set[str] = set()


def available(source: str, targets: dict[str, str]) -> bool:
    """True when the kernel is built and registered (building it on first call). Each
    problem warns once: a missing compiler or an unusable cache reads the same for
    every kernel, so it is one warning, not one per kernel."""
    try:
        load(source, targets)
        return True
    except KernelBuildError as e:
        if str(e) not in _warned:
            _warned.add(str(e))
            log.warning("C++ CPU kernel unavailable, using XLA instead: %s", e)
        return False
