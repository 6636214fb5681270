"""The engine on the TPU and GPU Pallas kernels, run in the Pallas interpreter on the CPU
(`MESHSERVE_ATTENTION_IMPL=tpu-interpret` / `gpu-interpret`): a mixed stream with
chunked prefill, decode and preemption gives the reference path's tokens exactly."""

from __future__ import annotations

import dataclasses

import pytest

from meshserve.engine.engine import Engine
from meshserve.engine.sampling_params import SamplingParams
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.loading import load_checkpoint
from meshserve.pallas_kernels.ragged_paged_attention import resolve_impl
from tests.engine_fixtures import SMALL, assert_idle, tokens_of

# A pool of 10 pages of 16 tokens for 5 sequences of up to 80 tokens: preemption is
# certain. 32-token steps split the longer prompts into chunks.
CONFIG = dataclasses.replace(SMALL, num_pages=10, max_seqs=4, min_seq_bucket=4,
                             max_step_tokens=32, min_token_bucket=32, decode_steps=2,
                             pack_weights=False)
PROMPTS = [[(5 * i + 7 * j) % 250 + 3 for j in range(n)] for i, n in enumerate((3, 45, 12, 70, 1))]
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


def _run(ckpt: str, impl: str, layout: str = "") -> tuple[list[list[int]], int]:
    model = load_checkpoint(ckpt, make_mesh(parse_layout(layout)))
    engine = Engine(model, CONFIG, attention_impl=impl)
    outputs = [tokens_of(chunks) for chunks in engine.generate(PROMPTS, PARAMS)]
    preemptions = engine.stats().preemptions
    assert_idle(engine)
    return outputs, preemptions


@pytest.fixture(scope="module")
def reference(checkpoint_dir):
    outputs, preemptions = _run(checkpoint_dir("llama"), "reference")
    assert preemptions > 0
    return outputs


@pytest.mark.parametrize("impl", ["tpu-interpret", "gpu-interpret"])
def test_engine_on_an_interpreted_kernel_equals_the_reference(checkpoint_dir, reference, impl):
    outputs, preemptions = _run(checkpoint_dir("llama"), impl)
    assert preemptions > 0
    assert outputs == reference


def test_interpreted_kernel_per_device_under_shard_map(checkpoint_dir, reference):
    """tensor=2: each device runs the kernel on its own KV heads inside shard_map."""
    outputs, _ = _run(checkpoint_dir("llama"), "tpu-interpret", "tensor=2")
    assert outputs == reference


@pytest.mark.parametrize("impl", ["tpu-interpret", "gpu-interpret"])
def test_interpreted_kernel_local_part_on_a_kv_split(checkpoint_dir, reference, impl):
    """sequence=2: each device's kernel attends over its own pages (page mask) and returns
    its partial with the log-sum-exp; the merged stream equals one device's."""
    outputs, preemptions = _run(checkpoint_dir("llama"), impl, "sequence=2")
    assert preemptions > 0
    assert outputs == reference


def test_the_environment_variable_names_them(monkeypatch):
    monkeypatch.setenv("MESHSERVE_ATTENTION_IMPL", "gpu-interpret")
    assert resolve_impl() == "gpu-interpret"
    monkeypatch.setenv("MESHSERVE_ATTENTION_IMPL", "tpu-interprett")
    with pytest.raises(ValueError, match="tpu-interpret"):
        resolve_impl()
