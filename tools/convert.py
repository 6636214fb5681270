"""`meshserve convert`: a Hugging Face safetensors model or a GGUF file → meshserve
(Orbax) checkpoint.

Both sources are read as tensors under HF names in HF layout (`TensorSource`), so one
pipeline converts either. Streams one checkpoint item (one layer) at a time, so peak
host memory stays near the largest tensor rather than the whole model.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Callable

import ml_dtypes
import numpy as np
from tqdm import tqdm

from meshserve.models.checkpoint import TOKENIZER_FILES, checkpoint_writer
from meshserve.models.config import ModelConfig, config_from_hf, load_hf_config
from meshserve.models.hf_weights import (
    ConversionError,
    TensorSource,
    item_of,
    unexpected_names,
    weight_mappings,
)
from meshserve.models.safetensors_io import SafetensorsCheckpoint

__all__ = ["DTYPES", "ConversionError", "convert", "convert_gguf"]

DTYPES = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}


def _check_tensors(cfg: ModelConfig, st: TensorSource) -> None:
    names = set(st.names())
    problems = []
    missing = [st.describe(m.hf_name) for m in weight_mappings(cfg) if m.hf_name not in names]
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
                f"tensor {st.describe(m.hf_name)} has shape {list(st.shape(m.hf_name))}, "
                f"expected {list(m.hf_shape)}"
            )
    if problems:
        raise ConversionError("cannot convert: " + "; ".join(problems))


def _stored_dtype(st: TensorSource, cfg: ModelConfig, dtype: str | None) -> str:
    """The requested dtype, else the source's: its matrices' dtype when they share one,
    float32 when they differ (dequantized GGUF blocks are exact only in float32)."""
    if dtype is None:
        found = {st.dtype(m.hf_name) for m in weight_mappings(cfg) if len(m.hf_shape) == 2}
        source = found.pop() if len(found) == 1 else np.dtype(np.float32)
        dtype = next((k for k, v in DTYPES.items() if np.dtype(v) == source), "float32")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def _write(
    cfg: ModelConfig,
    st: TensorSource,
    out_dir: str,
    dtype: str | None,
    overwrite: bool,
    progress: bool,
    add_files: Callable,
    source: str,
) -> ModelConfig:
    _check_tensors(cfg, st)
    dtype = _stored_dtype(st, cfg, dtype)
    target = np.dtype(DTYPES[dtype])
    mappings = weight_mappings(cfg)
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
                if m.expert is None:
                    arrays[m.path] = tensor.reshape(m.shape)
                else:  # one expert of a stacked [experts, ...] parameter
                    stacked = arrays.setdefault(
                        m.path, np.empty((cfg.num_experts, *m.shape), target))
                    stacked[m.expert] = tensor.reshape(m.shape)
                bar.update(1)
            writer.save_item(item, arrays)
            del arrays
        add_files(writer)
        writer.set_manifest(cfg, dtype, {"source": os.path.abspath(source)})
    bar.close()
    return cfg


def convert(
    hf_dir: str,
    out_dir: str,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ModelConfig:
    """Convert the HF model directory `hf_dir` into a checkpoint at `out_dir`; returns
    the model config."""
    cfg = load_hf_config(hf_dir)
    st = SafetensorsCheckpoint(hf_dir)
    return _write(cfg, st, out_dir, dtype, overwrite, progress,
                  lambda w: w.copy_files(hf_dir, ("config.json", *TOKENIZER_FILES)), hf_dir)


def convert_gguf(
    gguf_path: str,
    out_dir: str,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ModelConfig:
    """Convert a GGUF file into a checkpoint at `out_dir`, with an HF-style config.json
    and tokenizer files built from its metadata; returns the model config."""
    from meshserve.models.gguf import GGUFModel
    from meshserve.models.gguf_tokenizer import tokenizer_files

    st = GGUFModel(gguf_path)
    hf_config = st.hf_config()
    cfg = config_from_hf(hf_config)
    files = {"config.json": json.dumps(hf_config, indent=2) + "\n",
             **tokenizer_files(st.metadata, hf_config)}

    def add_files(writer) -> None:
        for name, text in files.items():
            writer.write_file(name, text)

    return _write(cfg, st, out_dir, dtype, overwrite, progress, add_files, gguf_path)


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("hf", None, "Hugging Face model directory (config.json + safetensors).")
    flags.DEFINE_string("gguf", None, "GGUF file (llama.cpp format; F32/F16/BF16/Q8_0/Q4_0/"
                        "Q4_1/Q4_K/Q6_K tensors, dequantized).")
    flags.DEFINE_string("out", None, "Output checkpoint directory.")
    flags.DEFINE_enum("dtype", None, list(DTYPES), "Stored parameter dtype (default: source's).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.mark_flags_as_required(["out"])
    flags.mark_flags_as_mutual_exclusive(["hf", "gguf"], required=True)


def main(argv: list[str]) -> int:
    from absl import flags

    del argv
    f = flags.FLAGS
    if f.gguf:
        cfg = convert_gguf(f.gguf, f.out, f.dtype, f.overwrite, f.progress)
    else:
        cfg = convert(f.hf, f.out, f.dtype, f.overwrite, f.progress)
    print(
        f"converted {cfg.architecture or cfg.family} "
        f"({cfg.num_parameters():,} parameters) to {f.out}"
    )
    return 0
