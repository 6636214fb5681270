"""Shared fixtures: 8 simulated CPU devices, tiny random HF models and their checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Every test sees 8 CPU devices so any layout up to 8 ways can be tried.
jax.config.update("jax_num_cpu_devices", 8)
# XLA:CPU compiles take seconds; identical programs (same engine shapes in several tests
# or xdist workers) are compiled once per run through the persistent cache.
_CACHE = os.path.join("/tmp", f"meshserve-jax-cache-{os.getuid()}")
jax.config.update("jax_compilation_cache_dir", os.environ.get("MESHSERVE_TEST_JAX_CACHE", _CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# Servers the tests start as subprocesses share that cache.
os.environ.setdefault("MESHSERVE_COMPILATION_CACHE",
                      os.environ.get("MESHSERVE_TEST_JAX_CACHE", _CACHE))

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """Factory: family name → directory of a saved tiny random HF model."""
    cache: dict[str, str] = {}

    def make(family: str) -> str:
        if family not in cache:
            cache[family] = hf_models.save_tiny_model(
                family, str(tmp_path_factory.mktemp(f"hf-{family}"))
            )
        return cache[family]

    return make


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, hf_model_dir):
    """Factory: family name → converted meshserve checkpoint directory."""
    from meshserve.tools.convert import convert

    cache: dict[str, str] = {}

    def make(family: str) -> str:
        if family not in cache:
            out = str(tmp_path_factory.mktemp(f"ckpt-{family}") / "ckpt")
            convert(hf_model_dir(family), out, progress=False)
            cache[family] = out
        return cache[family]

    return make
