"""`meshserve convert`: Hugging Face safetensors → meshserve (Orbax) checkpoint.

Streams one checkpoint item (one layer) at a time, so peak host memory stays near the
largest tensor rather than the whole model.
"""

from __future__ import annotations

import itertools
import os
import sys

import ml_dtypes
import numpy as np
from tqdm import tqdm

from meshserve.models.checkpoint import TOKENIZER_FILES, checkpoint_writer
from meshserve.models.config import ModelConfig, load_hf_config
from meshserve.models.hf_weights import item_of, unexpected_names, weight_mappings
from meshserve.models.safetensors_io import SafetensorsCheckpoint

DTYPES = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}


class ConversionError(ValueError):
    """The source model cannot be converted; the message names every problem found."""


def _check_tensors(cfg: ModelConfig, st: SafetensorsCheckpoint) -> None:
    names = set(st.names())
    problems = []
    missing = [m.hf_name for m in weight_mappings(cfg) if m.hf_name not in names]
    if missing:
        problems.append(
            f"missing tensors: {', '.join(missing[:20])}"
            + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else "")
        )
    unexpected = unexpected_names(cfg, sorted(names))
    if unexpected:
        problems.append(
            f"unexpected tensors: {', '.join(unexpected[:20])}"
            + (f" (+{len(unexpected) - 20} more)" if len(unexpected) > 20 else "")
        )
    for m in weight_mappings(cfg):
        if m.hf_name in names and tuple(st.shape(m.hf_name)) != m.hf_shape:
            problems.append(
                f"tensor {m.hf_name} has shape {list(st.shape(m.hf_name))}, "
                f"expected {list(m.hf_shape)}"
            )
    if problems:
        raise ConversionError("cannot convert: " + "; ".join(problems))


def convert(
    hf_dir: str,
    out_dir: str,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ModelConfig:
    """Convert `hf_dir` into a checkpoint at `out_dir`; returns the model config."""
    cfg = load_hf_config(hf_dir)
    st = SafetensorsCheckpoint(hf_dir)
    _check_tensors(cfg, st)
    mappings = weight_mappings(cfg)
    if dtype is None:
        source = np.dtype(st.read(mappings[0].hf_name).dtype)
        dtype = next((k for k, v in DTYPES.items() if np.dtype(v) == source), "float32")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    target = np.dtype(DTYPES[dtype])
    bar = tqdm(
        total=len(mappings), unit="tensor", desc="converting", file=sys.stderr, disable=not progress
    )
    with checkpoint_writer(out_dir, overwrite=overwrite) as writer:
        for item, group in itertools.groupby(mappings, key=lambda m: item_of(m.path)):
            arrays = {}
            for m in group:
                if m.transpose:
                    tensor = st.read_transposed(m.hf_name, target)
                else:
                    tensor = st.read(m.hf_name).astype(target, copy=False)
                arrays[m.path] = tensor.reshape(m.shape)
                bar.update(1)
            writer.save_item(item, arrays)
            del arrays
        writer.copy_files(hf_dir, ("config.json", *TOKENIZER_FILES))
        writer.set_manifest(cfg, dtype, {"source": os.path.abspath(hf_dir)})
    bar.close()
    return cfg


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("hf", None, "Hugging Face model directory (config.json + safetensors).")
    flags.DEFINE_string("out", None, "Output checkpoint directory.")
    flags.DEFINE_enum("dtype", None, list(DTYPES), "Stored parameter dtype (default: source's).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.mark_flags_as_required(["hf", "out"])


def main(argv: list[str]) -> int:
    from absl import flags

    del argv
    f = flags.FLAGS
    cfg = convert(f.hf, f.out, f.dtype, f.overwrite, f.progress)
    print(
        f"converted {cfg.architecture or cfg.family} "
        f"({cfg.num_parameters():,} parameters) to {f.out}"
    )
    return 0
