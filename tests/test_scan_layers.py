"""Scanned decoder layers (EngineConfig.scan_layers) compute what the unrolled ones do."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from meshserve.engine.engine import Engine
from meshserve.engine.handoff import HandoffError
from meshserve.engine.paged_attention import cache_shape
from meshserve.engine.sampling_params import SamplingParams
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.config import ModelConfig
from meshserve.models.loading import init_random
from meshserve.models.scan import scan_refusal
from tests.engine_fixtures import SMALL, assert_idle, make_engine
from tests.test_step_programs import IN_PLACE, TINY, _compiled, aliased_parameters, whole_cache_ops

PROMPTS = [[3, 17, 5, 9, 40, 2, 11], [8, 1, 30], list(range(3, 43))]
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=4)
UNROLLED = dataclasses.replace(SMALL, pack_weights=False)
SCANNED = dataclasses.replace(UNROLLED, scan_layers=True)


def _run(ckpt: str, layout: str, config):
    engine = make_engine(ckpt, layout, config)
    if config.scan_layers:  # handoffs read per-layer caches: refused with a message
        with pytest.raises(HandoffError, match="scan_layers"):
            engine.add_request(PROMPTS[0], PARAMS, prefill_only=True)
    chunks = engine.generate(PROMPTS, PARAMS)
    assert_idle(engine)
    scanned, shapes = engine.scanned, [tuple(a.shape) for a in engine._kv]
    engine.shutdown()
    tokens = [[t for c in cs for t in c.token_ids] for cs in chunks]
    logprobs = [[(lp.logprob, *(p for _, p in lp.top)) for c in cs for lp in c.logprobs]
                for cs in chunks]
    return scanned, shapes, tokens, logprobs


@pytest.mark.parametrize("family,layout", [("llama", ""), ("qwen3", ""),
                                           ("llama", "data=2,tensor=2"),
                                           ("llama", "sequence=2")])
def test_scanned_layers_equal_unrolled(checkpoint_dir, family, layout):
    ckpt = checkpoint_dir(family)
    scanned, shapes, tokens, logprobs = _run(ckpt, layout, SCANNED)
    unrolled, ushapes, utokens, ulogprobs = _run(ckpt, layout, UNROLLED)
    assert scanned and not unrolled
    # one stacked cache holding every layer's pages
    assert len(shapes) == 1 and shapes[0][0] == len(ushapes) * ushapes[0][0]
    assert tokens == utokens
    for a, b in zip(logprobs, ulogprobs, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=0)


def test_mixed_models_stay_unrolled():
    base = ModelConfig(
        family="llama", architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32,
        intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
        rms_norm_eps=1e-5, max_position_embeddings=64, bos_token_id=1, eos_token_ids=(2,))
    assert scan_refusal(base) is None
    assert scan_refusal(dataclasses.replace(base, sliding_windows=(None, None))) is None
    assert "sliding" in scan_refusal(dataclasses.replace(base, sliding_windows=(8, None)))


def test_scanned_decode_updates_the_stacked_cache_in_place():
    """The scan carries the one stacked cache: only in-place writes touch it (no per-layer
    slice copied out and back), and it is donated into the output."""
    model = init_random(dataclasses.replace(TINY, num_layers=3), make_mesh(parse_layout("")))
    engine = Engine(model, dataclasses.replace(UNROLLED, scan_layers=True))
    assert engine.scanned
    hlo = _compiled(engine, True, 8, 8).as_text()
    stacked = cache_shape(TINY, 1, 3 * engine.num_pages, engine.config.page_size)
    ops = whole_cache_ops(hlo, stacked)
    assert set(ops) <= IN_PLACE | {f"fusion:{op}" for op in IN_PLACE}, ops
    assert any(op.endswith("scatter") for op in ops), ops
    # nor is one layer's slice of it materialised
    assert not whole_cache_ops(hlo, cache_shape(TINY, 1, engine.num_pages, 16))
    assert len(aliased_parameters(hlo)) >= 3  # the cache, counts and seen are donated
    engine.shutdown()
