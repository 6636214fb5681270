"""Conversion: sharded inputs, streaming output, and failures that leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from meshserve.models.checkpoint import MANIFEST, CheckpointError, read_manifest
from meshserve.models.config import UnsupportedModelError
from meshserve.tools.convert import ConversionError, convert
from tests import hf_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_model(src: str, dst: str, edit=None) -> str:
    """Copy an HF model dir, optionally editing its tensor dict."""
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        config = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(config)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if edit:
        edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def _no_output(out: str) -> None:
    assert not os.path.exists(out)
    parent = os.path.dirname(out)
    leftovers = [n for n in os.listdir(parent) if ".partial-" in n]
    assert leftovers == []


def test_sharded_safetensors_convert_to_the_same_checkpoint(tmp_path, hf_model_dir):
    sharded = hf_models.save_tiny_model("llama", str(tmp_path / "sharded"), max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([n for n in os.listdir(sharded) if n.endswith(".safetensors")]) > 2
    convert(sharded, str(tmp_path / "a"), progress=False)
    convert(hf_model_dir("llama"), str(tmp_path / "b"), progress=False)
    a, b = read_manifest(str(tmp_path / "a")), read_manifest(str(tmp_path / "b"))
    assert a["config"] == b["config"] and a["items"] == b["items"]
    assert a["items"] == ["embed", "head", "layer_0000", "layer_0001"]
    import orbax.checkpoint as ocp

    for item in a["items"]:
        ta = ocp.PyTreeCheckpointer().restore(str(tmp_path / "a" / "params" / item))
        tb = ocp.PyTreeCheckpointer().restore(str(tmp_path / "b" / "params" / item))
        import jax

        for x, y in zip(jax.tree.leaves(ta), jax.tree.leaves(tb), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_config_and_manifest_are_written(checkpoint_dir):
    ckpt = checkpoint_dir("qwen2")
    manifest = read_manifest(ckpt)
    assert manifest["config"]["family"] == "qwen2"
    assert manifest["config"]["tie_word_embeddings"] is True
    assert manifest["dtype"] == "float32"
    assert os.path.exists(os.path.join(ckpt, "config.json"))


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshaped"])
def test_bad_tensors_abort_naming_them(tmp_path, hf_model_dir, case):
    name = "model.layers.1.mlp.up_proj.weight"

    def edit(t):
        if case == "missing":
            del t[name]
        elif case == "unexpected":
            t["model.layers.1.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)
        else:
            t[name] = np.zeros((3, 64), np.float32)

    src = _copy_model(hf_model_dir("llama"), str(tmp_path / "src"), edit)
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError) as err:
        convert(src, out, progress=False)
    expected = {"missing": name, "unexpected": "extra_proj", "misshaped": "[3, 64]"}[case]
    assert expected in str(err.value)
    _no_output(out)


def test_unknown_architecture_fails_through_the_cli(tmp_path, hf_model_dir):
    src = _copy_model(hf_model_dir("llama"), str(tmp_path / "src"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "meshserve.tools.cli", "convert", "--hf", src, "--out", out],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "GPT2LMHeadModel" in proc.stderr and "not supported" in proc.stderr
    _no_output(out)


def test_unsupported_config_feature_is_named(tmp_path, hf_model_dir):
    src = _copy_model(hf_model_dir("llama"), str(tmp_path / "src"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(UnsupportedModelError, match="yarn"):
        convert(src, str(tmp_path / "out"), progress=False)


def test_existing_output_is_not_clobbered_and_truncated_files_are_rejected(tmp_path, hf_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        convert(hf_model_dir("llama"), str(out), progress=False)
    src = _copy_model(hf_model_dir("llama"), str(tmp_path / "src"))
    path = os.path.join(src, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="offsets|header"):
        convert(src, str(tmp_path / "out2"), progress=False)
    _no_output(str(tmp_path / "out2"))


def test_loading_a_directory_without_manifest_explains(tmp_path):
    with pytest.raises(CheckpointError, match=MANIFEST):
        read_manifest(str(tmp_path))


def test_overwrite_swaps_by_rename_and_a_failed_one_keeps_the_old(hf_model_dir, tmp_path):
    from meshserve.models.checkpoint import checkpoint_writer

    out = str(tmp_path / "ckpt")
    convert(hf_model_dir("llama"), out, progress=False)
    first = read_manifest(out)
    with pytest.raises(RuntimeError, match="interrupted"):
        with checkpoint_writer(out, overwrite=True):
            raise RuntimeError("interrupted")
    assert read_manifest(out) == first  # the old checkpoint is untouched
    convert(hf_model_dir("llama"), out, dtype="bfloat16", overwrite=True, progress=False)
    assert read_manifest(out)["dtype"] == "bfloat16"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no partial or old copy left beside it
