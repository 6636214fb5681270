"""Flags and helpers shared by subcommands that load a model onto a mesh."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator

from absl import flags


def define_model_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "meshserve checkpoint directory (from `convert`).")
    flags.DEFINE_string("hf", None, "Hugging Face model directory; converted on the fly.")
    flags.DEFINE_string("mesh", "", "Per-slice layout, e.g. data=2,tensor=4 (absent axes = 1).")
    flags.DEFINE_enum(
        "dtype",
        None,
        ["float32", "bfloat16"],
        "Compute dtype (default: float32 on CPU, bfloat16 on TPU/GPU).",
    )
    flags.DEFINE_float(
        "device_memory_gib",
        None,
        "Usable memory per device for the planner (default: what the device reports).",
    )


@contextlib.contextmanager
def checkpoint_dir() -> Iterator[str]:
    """The checkpoint to load: --checkpoint, --hf converted into a temporary directory, or
    with neither the embedded demo model."""
    f = flags.FLAGS
    if f.checkpoint and f.hf:
        raise ValueError("give only one of --checkpoint or --hf")
    if not f.checkpoint and not f.hf:
        from meshserve.models.demo import DEMO_LABEL, ensure_demo_checkpoint

        print(f"no --checkpoint or --hf: using the embedded {DEMO_LABEL}", file=sys.stderr)
        yield ensure_demo_checkpoint()
        return
    if f.checkpoint:
        yield f.checkpoint
        return
    from meshserve.tools.convert import convert

    with tempfile.TemporaryDirectory(prefix="meshserve-ckpt-") as tmp:
        print(f"converting {f.hf} ...", file=sys.stderr)
        convert(f.hf, f"{tmp}/ckpt", progress=False)
        yield f"{tmp}/ckpt"


def capacity_bytes() -> int | None:
    gib = flags.FLAGS.device_memory_gib
    return None if gib is None else int(gib * 2**30)
