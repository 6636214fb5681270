"""The persistent XLA compilation cache, private directories, and compile counters.

A second start of the same model on the same machine then loads its programs instead
of compiling them. Cached executables are code, so the directory is the user's own
and private (created 0700, refused when another account owns it or it is a link).
"""

from __future__ import annotations

import os
import stat
import threading

import jax
from absl import logging

CACHE_ENV_VAR = "MESHSERVE_COMPILATION_CACHE"
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # hits and misses alike
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


class PrivateDirError(OSError):
    pass


def private_directory(path: str, what: str, env_var: str) -> str:
    """`path`, created 0700 if missing, checked to be a real directory of this user that
    no one else can write (made 0700 when it is ours but open); PrivateDirError else."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise PrivateDirError(f"cannot create the {what} {path} ({e}); set ${env_var} to a "
                              "directory of yours") from e
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise PrivateDirError(f"{what} {path} is not a directory (a link?)")
    if info.st_uid != os.getuid():
        raise PrivateDirError(f"{what} {path} belongs to uid {info.st_uid}, not to you "
                              f"({os.getuid()}); set ${env_var}")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours: make it private before trusting what is in it
    return path


def user_cache_path(*parts: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "meshserve", *parts)


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turn the persistent cache on at `path` (None: $MESHSERVE_COMPILATION_CACHE, else
    ~/.cache/meshserve/xla; "none": off). Returns the directory used, or None.

    Call before the first compilation (JAX reads the setting once). In a multi-process
    group each process gets its own subdirectory: executables are compiled per process,
    and hosts that share a filesystem must not load each other's.
    """
    path = path or os.environ.get(CACHE_ENV_VAR) or user_cache_path("xla")
    if path.strip().lower() == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if jax.process_count() > 1:
        path = os.path.join(path, f"process-{jax.process_index()}-of-{jax.process_count()}")
    path = private_directory(path, "compilation cache", CACHE_ENV_VAR)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Every engine program is worth keeping; small ones load as fast as they compile.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    share_programs_across_device_groups()
    return path


_sharing = False  # set once share_programs_across_device_groups() has hooked the key


def share_programs_across_device_groups() -> bool:
    """Key CPU programs in the persistent cache without the devices they were built for,
    as JAX itself does on GPU, so a slice loads the programs another slice of the same
    layout compiled instead of compiling them again. Returns whether keys are shared.

    A CPU executable does not depend on which devices run it: loading one passes the
    loader's own device assignment (checked by `tests/test_compile_cache.py`, which
    runs a program built for devices 0-1 on devices 2-3). TPU keys keep their devices,
    since a TPU program is built for its chips' place in the interconnect.
    """
    global _sharing
    if _sharing:
        return True
    try:
        from jax._src import cache_key
        original = cache_key._hash_serialized_compile_options
    except (ImportError, AttributeError):  # a JAX that moved it: slices compile their own
        logging.warning("compilation cache: slices cannot share programs with this JAX")
        return False

    def hash_options(hash_obj, compile_options, strip_device_assignment=False):
        cpu_only = jax.default_backend() == "cpu"
        return original(hash_obj, compile_options,
                        strip_device_assignment=strip_device_assignment or cpu_only)

    cache_key._hash_serialized_compile_options = hash_options
    _sharing = True
    return True


def programs_shared_across_device_groups() -> bool:
    """Whether device groups of one layout build identical programs (then one group's
    warm-up fills the cache for the others): on CPU and GPU with the cache on."""
    if not (jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir):
        return False
    backend = jax.default_backend()
    return backend == "gpu" or (backend == "cpu" and _sharing)


class CompileCounter:
    """Programs JAX built since creation: how many, and how many came from the cache."""

    _lock = threading.Lock()
    _programs = 0
    _hits = 0
    _installed = False

    def __init__(self) -> None:
        CompileCounter._install()
        self._start = self._now()

    @classmethod
    def _install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            cls._installed = True

            def on_duration(event: str, duration: float, **kwargs) -> None:
                if event == _BACKEND_COMPILE:
                    with cls._lock:
                        cls._programs += 1

            def on_event(event: str, **kwargs) -> None:
                if event == _CACHE_HIT:
                    with cls._lock:
                        cls._hits += 1

            jax.monitoring.register_event_duration_secs_listener(on_duration)
            jax.monitoring.register_event_listener(on_event)

    @classmethod
    def _now(cls) -> tuple[int, int]:
        with cls._lock:
            return cls._programs, cls._hits

    def counts(self) -> tuple[int, int]:
        """(programs built, of which loaded from the persistent cache) since creation."""
        programs, hits = self._now()
        return programs - self._start[0], hits - self._start[1]
