"""Shared fixtures: 8 simulated CPU devices, tiny random HF models and their checkpoints."""

from __future__ import annotations

import importlib.util
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
# As `meshserve` does: one device group's programs serve the others of its layout.
from meshserve.meshes import share_programs_across_device_groups  # noqa: E402

share_programs_across_device_groups()
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


@pytest.fixture(scope="session", autouse=True)
def _private_meshserve_cache(tmp_path_factory):
    """Conversions cached by `--hf`, `--gguf` and the default model go to this run's own
    cache (servers started as subprocesses inherit it), never the user's."""
    os.environ["MESHSERVE_CACHE"] = str(tmp_path_factory.mktemp("meshserve-cache"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """The default model's GGUF (the meshserve[demo] extra, which CI installs)."""
    from meshserve.tools.model_flags import DEFAULT_MODEL_PACKAGE, default_gguf

    # Looked up, not imported: the package's own module needs `llm`, which CI leaves out.
    if importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is None:
        pytest.skip("the meshserve[demo] extra is not installed")

    return default_gguf()


@pytest.fixture(scope="session")
def smollm2_ckpt(smollm2_gguf) -> str:
    """SmolLM2-135M-Instruct converted once per run, through the converted-checkpoint
    cache as `serve` with no model flag does it (so later starts in this run hit it)."""
    from meshserve.tools.converted_cache import cached_checkpoint

    return cached_checkpoint(smollm2_gguf, "gguf")
