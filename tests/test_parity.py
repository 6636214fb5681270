"""Our decoder against `transformers` on every family and layout."""

from __future__ import annotations

import numpy as np
import pytest

from meshserve.engine.dense import DenseGenerator
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.loading import load_checkpoint
from tests import hf_models

LAYOUTS = ("", "tensor=2", "tensor=4", "data=2,tensor=2")
PROMPTS = ([1, 5, 9, 200, 3], list(range(3, 42)), [7] * 17 + [100, 101], [1])


@pytest.fixture(scope="module")
def reference_logits():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = [hf_models.hf_logits(family, p) for p in PROMPTS]
        return cache[family]

    return get


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_prefill_logits_match_transformers_on_every_layout(
    family, checkpoint_dir, reference_logits
):
    expected = reference_logits(family)
    per_layout = []
    for layout in LAYOUTS:
        model = load_checkpoint(checkpoint_dir(family), make_mesh(parse_layout(layout)))
        got = DenseGenerator(model).prefill_logits(PROMPTS)
        for prompt, ours, ref in zip(PROMPTS, got, expected, strict=True):
            assert ours.shape == (len(prompt), 256)
            # Logits here span about ±10: 1e-4 absolute is f32 round-off, not a loose bound.
            np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4, err_msg=layout)
        per_layout.append(got)
    for other in per_layout[1:]:
        for a, b in zip(per_layout[0], other, strict=True):
            np.testing.assert_allclose(a, b, atol=5e-5, rtol=0)


@pytest.mark.parametrize(
    "family,layout",
    [
        ("llama", ""),
        ("mistral", "tensor=4"),
        ("qwen2", "data=2,tensor=2"),
        ("qwen3", "tensor=2"),
    ],
)
def test_greedy_generation_equals_transformers(family, layout, checkpoint_dir):
    prompt = [1, 17, 33, 250, 4, 90, 12]
    expected = hf_models.hf_greedy(family, prompt, 32)
    model = load_checkpoint(checkpoint_dir(family), make_mesh(parse_layout(layout)))
    got = DenseGenerator(model).generate(prompt, max_tokens=32)
    assert got.token_ids == expected
    assert got.finish_reason == "length"
    assert len(got.logprobs) == 32 and all(lp <= 0 for lp in got.logprobs)
