"""Context parallelism on a long prompt (issue 20, item 3): a 2048-token prompt prefilled
in chunks with its tokens split over `sequence` and its KV landing round-robin on the
`sequence` devices, against transformers."""

from __future__ import annotations

import functools

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


@pytest.mark.parametrize("ways,window,page_size,q_lens", [
    (2, None, 4, (37, 1, 3, 1)),  # mixed: a prefill chunk beside decodes
    (4, None, 4, (1, 1, 1, 1)),  # decode-shaped: one query per sequence
    (3, 20, 4, (37, 1, 3, 1)),  # sliding window
    (2, None, 128, (200, 1, 3, 1)),  # pages bigger than a key block (sub-pages)
])
def test_local_partials_merge_to_the_full_attention(ways, window, page_size, q_lens):
    """Each device attends over only the pages it holds (local rows p // ways of a table
    in any order): the partials merge to the reference over all pages. Pages nobody uses
    are NaN: no device reads a page outside its sequences' causal ranges."""
    from meshserve.engine.context_parallel import local_partial_attention
    from meshserve.pallas_kernels.ragged_paged_attention.reference import (
        merge_partials,
        paged_attention_from_pages,
    )

    hq, hkv, d, per_seq = 4, 2, 8, 13
    num_pages = 60 * ways
    q_lens = np.array(q_lens)
    kv_lens = jnp.asarray(q_lens + np.array([0, 40, 47, 8]) * page_size // 4, jnp.int32)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    table = jnp.asarray(np.random.default_rng(2).permutation(num_pages)[: 4 * per_seq]
                        .reshape(4, per_seq), jnp.int32)
    used = {int(table[s, c]) for s in range(4) for c in range(-(-int(kv_lens[s]) // page_size))}
    pages = jax.random.normal(jax.random.PRNGKey(1), (num_pages, page_size, 2 * hkv, d))
    unused = jnp.asarray([p not in used for p in range(num_pages)])
    pages = jnp.where(unused[:, None, None, None], jnp.nan, pages)
    q = jax.random.normal(jax.random.PRNGKey(3), (int(cu[-1]) + 3, hq, d))  # 3 padding rows
    n = jnp.array([4], jnp.int32)
    full = jax.jit(functools.partial(
        paged_attention_from_pages, sm_scale=None, sliding_window=window, soft_cap=None,
        block_q=None, keys_per_block=None))(q, pages, kv_lens, table, cu, n)
    attend = jax.jit(functools.partial(local_partial_attention, ways=ways,
                                       sliding_window=window))
    parts = [attend(q, pages[w::ways], kv_lens, table, cu, n, index=jnp.int32(w))
             for w in range(ways)]
    merged = merge_partials(jnp.stack([o for o, _ in parts]), jnp.stack([lse for _, lse in parts]))
    assert not np.isnan(np.asarray(merged)).any()
    np.testing.assert_allclose(merged, full, rtol=2e-5, atol=2e-6)
    # a device attends over its own pages only: its partial differs from the whole
    assert not np.allclose(parts[0][0][: int(cu[-1])], full[: int(cu[-1])], atol=1e-3)


def test_ring_and_all_gather_prefill_agree_and_move_the_documented_bytes():
    """tools/bench_ring.py's two ways of one chunk's attention give the same outputs; the
    all-gather moves q|k|v and the partials, the ring S - 1 rounds of K/V permutes."""
    from meshserve.tools.bench_ring import measure

    rows = {r["method"]: r for r in measure(256, 4, head_dim=16, repeats=1)}
    assert rows["gather"]["collectives"] == {"all-gather": 1, "all-to-all": 1}
    assert rows["gather"]["bytes_per_token"] == (4 + 2 * 2) * 16 * 4 + 4 * 17 * 4
    assert rows["ring"]["collectives"] == {"collective-permute": 2 * 3}  # k and v, 3 rounds
    assert rows["ring"]["wire_bytes_per_token"] == 3 / 4 * 2 * 2 * 16 * 4
