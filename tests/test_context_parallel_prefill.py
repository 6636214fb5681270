"""Context parallelism on a long prompt (issue 20, item 3): a 2048-token prompt prefilled
in chunks with its tokens split over `sequence` and its KV landing round-robin on the
`sequence` devices, against transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshserve.engine.config import EngineConfig
from meshserve.engine.engine import Engine
from meshserve.engine.paged_attention import PagedAttention, init_paged_cache
from meshserve.engine.sampling_params import SamplingParams
from meshserve.meshes import make_mesh, parse_layout, use_rules
from meshserve.models.loading import load_checkpoint
from meshserve.tools.convert import convert
from tests import hf_models
from tests.engine_fixtures import assert_idle, tokens_of

PROMPT_LEN, CHUNK, NEW, LAST = 2048, 512, 32, 16
SIZES = dict(max_position_embeddings=4096)  # the tiny llama, long enough for the prompt
PROMPT = np.random.default_rng(20).integers(3, 256, PROMPT_LEN).tolist()
PAGES = -(-(PROMPT_LEN + NEW) // 16)
# One token bucket (a prefill chunk) and one batch bucket: two programs per layout.
CONFIG = EngineConfig(page_size=16, num_pages=PAGES + 4 - PAGES % 4, max_seqs=1,
                      max_step_tokens=CHUNK, decode_steps=8, max_logprobs=1,
                      min_token_bucket=CHUNK, min_seq_bucket=1,
                      max_model_len=PROMPT_LEN + NEW, prefix_caching=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    hf_dir = tmp_path_factory.mktemp("hf-long")
    hf_models.build_model("llama", **SIZES).save_pretrained(hf_dir)
    out = str(tmp_path_factory.mktemp("ckpt-long") / "ckpt")
    convert(str(hf_dir), out, progress=False)
    return out


@pytest.fixture(scope="module")
def expected():
    logits = hf_models.hf_logits("llama", PROMPT, **SIZES)[-LAST:]
    return logits, hf_models.hf_greedy("llama", PROMPT, NEW, **SIZES)


def _chunked_prefill_logits(engine: Engine) -> np.ndarray:
    """Logits at every position of the prompt's last chunk, after prefilling it in
    CHUNK-token steps through the engine's own attention (split over `kv_split`) into a
    fresh paged cache: later chunks read the earlier chunks' KV from the devices that
    own its pages."""
    fns, cfg = engine._fns, engine.config
    model = fns.model
    kv = init_paged_cache(model.config, model.rules, 1, cfg.num_pages, cfg.page_size,
                          model.dtype)

    @jax.jit
    def step(params, kv, tokens, positions, meta):
        module = nnx.merge(model.graphdef, params)
        hidden, kv = module.hidden(tokens, positions, kv, PagedAttention(*meta, fns._specs),
                                   None, fns._matmul, fns._experts)
        return module.logits(hidden, fns._matmul), kv

    table = np.zeros((1, 1, engine.pages_per_seq), np.int32)
    table[0, 0, :PAGES] = np.arange(PAGES)
    with use_rules(model.rules):
        for start in range(0, PROMPT_LEN, CHUNK):
            end = start + CHUNK
            tokens = np.array([PROMPT[start:end]], np.int32)
            positions = np.arange(start, end, dtype=np.int32)[None]
            meta = (np.array([[end]], np.int32), table, np.array([[0, CHUNK]], np.int32),
                    np.array([[1]], np.int32))
            logits, kv = step(model.params, kv, tokens, positions, meta)
    return np.asarray(logits)[0, -LAST:]


@pytest.mark.parametrize("layout", ["", "sequence=2", "sequence=4", "tensor=2,sequence=2"])
def test_long_prompt_matches_transformers(layout, checkpoint, expected):
    want_logits, want_tokens = expected
    model = load_checkpoint(checkpoint, make_mesh(parse_layout(layout)), jnp.float32)
    engine = Engine(model, CONFIG, attention_impl="reference")
    assert engine._fns._specs.kv_ways == parse_layout(layout).sequence
    # Logits here span about ±10; 2048 keys per row add round-off over one device's sum.
    np.testing.assert_allclose(_chunked_prefill_logits(engine), want_logits,
                               atol=2e-4, rtol=1e-4)
    out = engine.generate([PROMPT], SamplingParams(max_tokens=NEW, ignore_eos=True))[0]
    assert tokens_of(out) == want_tokens
    assert_idle(engine)
    engine.shutdown()
