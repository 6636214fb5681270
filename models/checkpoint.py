"""The meshserve checkpoint: Orbax trees (one per layer) plus a manifest written last.

Layout of a checkpoint directory:
  meshserve.json      format version, model config, parameter dtype, item list
  params/<item>/      one Orbax PyTree checkpoint per item (embed, head, layer_0000...)
  config.json, tokenizer files (and chat template, generation config) from the source

Saving goes to a temporary sibling directory renamed into place at the end, so a
directory that has `meshserve.json` is always complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from meshserve.models.config import ModelConfig, with_generation_eos

FORMAT_VERSION = 1
MANIFEST = "meshserve.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


def _nest(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


@contextlib.contextmanager
def checkpoint_writer(out_dir: str, overwrite: bool = False) -> Iterator[CheckpointWriter]:
    """Write items into a temporary directory; publish it only if the block succeeds."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not overwrite:
            raise CheckpointError(f"{out_dir} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    writer = CheckpointWriter(tmp)
    try:
        yield writer
        writer.finish()
        old = None
        if overwrite and os.path.exists(out_dir):
            # Swap by renames, then delete: a crash at any point leaves a complete
            # checkpoint at out_dir or beside it, never neither.
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "checkpoint"))
        os.rename(tmp, out_dir)  # fails if out_dir appeared meanwhile: never merge two
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


class CheckpointWriter:
    def __init__(self, directory: str):
        self.directory = directory
        self._items: list[str] = []
        self._checkpointer = ocp.PyTreeCheckpointer()
        self._manifest: dict[str, Any] | None = None

    def save_item(self, item: str, params: Mapping[str, np.ndarray]) -> None:
        if item in self._items:
            raise CheckpointError(f"item {item} saved twice")
        self._checkpointer.save(os.path.join(self.directory, "params", item), _nest(params))
        self._items.append(item)

    def copy_files(self, source_dir: str, names: Iterable[str]) -> list[str]:
        copied = []
        for name in names:
            src = os.path.join(source_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(self.directory, name))
                copied.append(name)
        return copied

    def write_file(self, name: str, data: str | bytes) -> None:
        """A file beside the parameters (config.json, tokenizer files)."""
        if os.path.basename(name) != name:
            raise CheckpointError(f"{name!r} is not a plain file name")
        if isinstance(data, str):
            data = data.encode("utf-8")
        with open(os.path.join(self.directory, name), "wb") as f:
            f.write(data)

    def set_manifest(self, config: ModelConfig, dtype: str, extra: Mapping[str, Any] = ()) -> None:
        self._manifest = {
            "format": FORMAT_VERSION,
            "config": config.to_json(),
            "dtype": dtype,
            **dict(extra),
        }

    def finish(self) -> None:
        if self._manifest is None:
            raise CheckpointError("checkpoint has no manifest")
        manifest = dict(self._manifest, items=sorted(self._items))
        with open(os.path.join(self.directory, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)


def read_manifest(ckpt_dir: str) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(
            f"{ckpt_dir} is not a meshserve checkpoint (no {MANIFEST}); "
            "convert a Hugging Face model with `meshserve convert --hf DIR --out DIR`"
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt_dir}: checkpoint format {manifest.get('format')} is not {FORMAT_VERSION}"
        )
    return manifest


def checkpoint_config(ckpt_dir: str) -> ModelConfig:
    """The manifest's config; EOS ids also from the checkpoint's generation_config.json
    (checkpoints converted before it was read there have it beside the manifest)."""
    return with_generation_eos(ModelConfig.from_json(read_manifest(ckpt_dir)["config"]), ckpt_dir)


def restore_items(
    ckpt_dir: str,
    targets: Mapping[str, tuple[Any, Any]],
    item_of,
) -> dict[str, jax.Array]:
    """Restore parameters by dotted path straight into their shardings.

    targets: path → (sharding, dtype). Each device reads only its own shard.
    """
    manifest = read_manifest(ckpt_dir)
    by_item: dict[str, dict[str, Any]] = {}
    for path, (sharding, dtype) in targets.items():
        item = item_of(path)
        if item not in manifest["items"]:
            raise CheckpointError(f"{ckpt_dir}: item {item} (for {path}) is missing")
        by_item.setdefault(item, {})[path] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype)
    checkpointer = ocp.PyTreeCheckpointer()
    out: dict[str, jax.Array] = {}
    for item, wanted in by_item.items():
        item_dir = os.path.join(ckpt_dir, "params", item)
        stored = _flatten(checkpointer.metadata(item_dir).item_metadata.tree)
        missing = sorted(set(wanted) - set(stored))
        if missing:
            raise CheckpointError(f"{ckpt_dir}: item {item} lacks {', '.join(missing)}")
        # Restore the whole stored tree shape; unwanted leaves would be an inconsistency.
        extra = sorted(set(stored) - set(wanted))
        if extra:
            raise CheckpointError(f"{ckpt_dir}: item {item} has unexpected {', '.join(extra)}")
        restored = checkpointer.restore(
            item_dir, args=ocp.args.PyTreeRestore(restore_args=_nest(wanted))
        )
        out.update(_flatten(restored))
    return out
