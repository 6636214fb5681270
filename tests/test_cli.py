"""`meshserve generate` end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests import hf_models
from tests.serving_fixtures import demo_ckpt  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _meshserve(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshserve.tools.cli", *args], cwd=REPO, capture_output=True,
        text=True,
        timeout=300, env={**os.environ, **(env or {})},
    )


def test_generate_json_matches_transformers_from_hf_dir(hf_model_dir):
    prompt = [1, 17, 33, 250, 4, 90, 12]
    proc = _meshserve(
        "generate", "--hf", hf_model_dir("qwen3"), "--token-ids", ",".join(map(str, prompt)),
        "--max-tokens", "12", "--ignore-eos", "--json", "--cpu-devices", "4",
        "--mesh", "data=2,tensor=2",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == hf_models.hf_greedy("qwen3", prompt, 12)
    assert len(out["logprobs"]) == 12 and all(lp <= 0 for lp in out["logprobs"])
    assert "memory per device" in proc.stderr


def test_generate_with_prompt_uses_the_checkpoint_tokenizer_and_refuses_bad_layouts(
        demo_ckpt):  # noqa: F811
    demo = ("--checkpoint", demo_ckpt)  # the small random model, not the 30-layer default
    proc = _meshserve("generate", *demo, "--prompt", "Hello Zürich", "--max-tokens", "5",
                      "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 1 <= len(out["token_ids"]) <= 5 and isinstance(out["text"], str)
    bad = _meshserve("generate", *demo, "--token-ids", "1,2", "--mesh", "tensor=3",
                     "--cpu-devices", "3")
    assert bad.returncode == 2
    assert "num_heads=8 is not divisible by tensor=3" in bad.stderr
    assert "Traceback" not in bad.stderr
    tight = _meshserve("generate", *demo, "--token-ids", "1,2", "--device-memory-gib", "0.001")
    assert tight.returncode == 2 and "does not fit" in tight.stderr and "MiB" in tight.stderr
