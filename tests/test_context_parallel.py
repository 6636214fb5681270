"""Context parallelism: each sequence's KV pages split over `kv_split` (the `sequence`
mesh axis), attention merged exactly from per-device partials."""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.engine.batching import build_inputs
from meshserve.engine.config import EngineConfig
from meshserve.engine.engine import Engine
from meshserve.engine.kv_pool import plan_num_pages
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.scheduler import StepPlan
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.config import ModelConfig
from meshserve.models.loading import init_random, memory_plan
from meshserve.pallas_kernels.ragged_paged_attention.reference import (
    MASK_VALUE,
    merge_partials,
    paged_attention_from_pages,
)
from tests.engine_fixtures import assert_idle, tokens_of

TINY = ModelConfig(
    family="llama", architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64,
    intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    rms_norm_eps=1e-5, max_position_embeddings=1024, bos_token_id=1, eos_token_ids=(2,),
)
CONFIG = EngineConfig(page_size=16, num_pages=48, max_seqs=8, max_step_tokens=64,
                      decode_steps=4, max_logprobs=4, min_token_bucket=64, min_seq_bucket=8)
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=4)
RNG = np.random.default_rng(0)
LONG = RNG.integers(3, 256, 230).tolist()  # 15 pages: prefilled in 4 chunks of 64
MIXED = [RNG.integers(3, 256, n).tolist() for n in (1, 90, 33, 5)]


@functools.partial(jax.jit, static_argnames=("window", "return_lse"))
def _attend(q, pages, kv_lens, table, cu, n, window=None, page_mask=None, return_lse=False):
    return paged_attention_from_pages(
        q, pages, kv_lens, table, cu, n, sm_scale=None, sliding_window=window, soft_cap=None,
        block_q=None, keys_per_block=None, page_mask=page_mask, return_lse=return_lse)


def test_merge_partials_reproduces_softmax_attention():
    key = jax.random.PRNGKey(0)
    q, k, v = (jax.random.normal(x, s) for x, s in zip(
        jax.random.split(key, 3), [(5, 8), (40, 8), (40, 8)], strict=True))
    scores = q @ k.T
    full = jax.nn.softmax(scores, axis=-1) @ v
    owner = np.arange(40) % 3
    owner[7] = 2  # uneven parts
    outs, lses = [], []
    for part in range(4):  # part 3 holds no key at all
        keep = jnp.asarray(owner == part)
        s = jnp.where(keep, scores, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1)
        p = jnp.where(keep, jnp.exp(s - lse[:, None]), 0.0)
        outs.append(jnp.where(keep.any(), p @ v, 0.0))
        lses.append(jnp.where(keep.any(), lse, MASK_VALUE))
    np.testing.assert_allclose(merge_partials(jnp.stack(outs), jnp.stack(lses)), full,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ways,window", [(2, None), (4, None), (3, 20)])
def test_masked_page_partials_merge_to_the_full_paged_attention(ways, window):
    """Split a ragged batch's pages `ways` ways (page p on part p % ways); each part
    attends only over its pages and returns (out, lse): the merge equals the reference
    over all pages. Pages nobody uses are NaN: a part never reads a masked page's values."""
    key = jax.random.PRNGKey(1)
    page_size, num_pages, hq, hkv, d = 4, 60, 4, 2, 8
    kv_lens = jnp.array([37, 1, 50, 9], jnp.int32)
    q_lens = np.array([37, 1, 3, 1])
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    per_seq = 13
    table = jnp.asarray(np.random.default_rng(2).permutation(num_pages)[: 4 * per_seq]
                        .reshape(4, per_seq), jnp.int32)
    used = {int(table[s, c]) for s in range(4) for c in range(math.ceil(int(kv_lens[s]) / 4))}
    pages = jax.random.normal(key, (num_pages, page_size, 2 * hkv, d))
    unused = jnp.asarray([p not in used for p in range(num_pages)])
    pages = jnp.where(unused[:, None, None, None], jnp.nan, pages)
    q = jax.random.normal(jax.random.PRNGKey(3), (int(cu[-1]) + 3, hq, d))  # 3 padding rows
    n = jnp.array([4], jnp.int32)
    full = _attend(q, pages, kv_lens, table, cu, n, window=window)
    parts = [_attend(q, pages, kv_lens, table, cu, n, window=window,
                     page_mask=table % ways == w, return_lse=True) for w in range(ways)]
    merged = merge_partials(jnp.stack([o for o, _ in parts]), jnp.stack([lse for _, lse in parts]))
    assert not np.isnan(np.asarray(merged)).any()
    np.testing.assert_allclose(merged, full, rtol=2e-5, atol=2e-6)
    # a part attends over its own pages only: it differs from the whole
    assert not np.allclose(parts[0][0][: int(cu[-1])], full[: int(cu[-1])], atol=1e-3)


@pytest.fixture(scope="module")
def reference():
    """One device: the long prompt alone, and the mixed batch, as tokens and logprobs."""
    engine = _engine("")
    out = _run(engine)
    engine.shutdown()
    return out


def _engine(layout: str, impl: str = "reference") -> Engine:
    model = init_random(TINY, make_mesh(parse_layout(layout)), jnp.float32, seed=0)
    return Engine(model, CONFIG, attention_impl=impl)


def _run(engine: Engine):
    long = engine.generate([LONG], GREEDY)[0]
    # staggered: new prompts join batches mid-decode (mixed prefill + decode steps)
    handles = []
    for i, prompt in enumerate(MIXED):
        handles.append(engine.add_request(prompt, GREEDY))
        if i % 2:
            engine.step()
    while engine.step():
        pass
    mixed = [list(h) for h in handles]
    assert_idle(engine)

    def summary(chunks):
        top = [[lp for _, lp in x.top] for c in chunks for x in c.logprobs]
        return tokens_of(chunks), np.array(top)

    return summary(long), [summary(c) for c in mixed]


@pytest.mark.parametrize("layout", ["sequence=2", "sequence=4", "tensor=2,sequence=2",
                                    "data=2,sequence=2"])
def test_split_kv_outputs_equal_one_device(layout, reference):
    engine = _engine(layout)
    assert engine._fns._specs.kv_ways == parse_layout(layout).sequence
    (long_tokens, long_top), mixed = _run(engine)
    assert long_tokens == reference[0][0]
    # the first row is the prefill's logits (top-4 log-probabilities), then decode's
    np.testing.assert_allclose(long_top, reference[0][1], rtol=1e-4, atol=1e-4)
    for (tokens, top), (want_tokens, want_top) in zip(mixed, reference[1], strict=True):
        assert tokens == want_tokens
        np.testing.assert_allclose(top, want_top, rtol=1e-4, atol=1e-4)
    engine.shutdown()


def test_split_kv_on_the_cpu_kernel_equals_one_device(reference):
    """The C++ kernel's page-mask + lse path does each device's local part."""
    engine = _engine("sequence=2", "cpu")
    (long_tokens, long_top), mixed = _run(engine)
    assert long_tokens == reference[0][0]
    np.testing.assert_allclose(long_top, reference[0][1], rtol=1e-4, atol=1e-4)
    assert [tokens for tokens, _ in mixed] == [tokens for tokens, _ in reference[1]]
    engine.shutdown()


def test_each_device_holds_its_share_of_a_long_sequence():
    """After the long prompt (15 pages, ids 0..18 on a fresh pool) each of the 4 devices
    holds the K/V of its ~1/4 of the pages, and nothing of the others'."""
    engine = _engine("sequence=4")
    engine.generate([LONG], dataclasses.replace(GREEDY, max_tokens=1))
    pages = math.ceil((len(LONG) + 1) / CONFIG.page_size)
    layer = engine._kv[0]
    assert layer.shape[0] == CONFIG.num_pages
    local = CONFIG.num_pages // 4
    shards = sorted(layer.addressable_shards, key=lambda s: s.index[0].start)
    assert [s.data.shape[0] for s in shards] == [local] * 4
    for dev, shard in enumerate(shards):
        written = np.flatnonzero(np.abs(np.asarray(shard.data)).sum(axis=(1, 2, 3)))
        # global page p lives on device p % 4 at local row p // 4
        assert written.tolist() == [p // 4 for p in range(pages) if p % 4 == dev]
    engine.shutdown()


def test_planner_divides_per_device_kv_by_the_split():
    cfg = dataclasses.replace(CONFIG, num_pages=None, max_seqs=3, device_memory_bytes=1 << 30)
    plans = {}
    for s in (1, 4):
        model = init_random(TINY, make_mesh(parse_layout(f"sequence={s}")), jnp.float32)
        plans[s] = plan_num_pages(model, cfg, 1000)
    one, four = plans[1], plans[4]
    assert one.chosen_by == four.chosen_by == "use"
    page = one.page_bytes
    assert four.page_bytes == page
    # 1/4 of the bytes, give or take one page per sequence
    assert abs(four.bytes_per_device - one.bytes_per_device / 4) <= cfg.max_seqs * page
    assert four.bytes_per_device < one.bytes_per_device / 3
    # the memory bounds: 4x the pages fit, so 4x the max_model_len
    tight = dataclasses.replace(cfg, max_kv_memory_bytes=20 * page)
    model1 = init_random(TINY, make_mesh(parse_layout("")), jnp.float32)
    model4 = init_random(TINY, make_mesh(parse_layout("sequence=4")), jnp.float32)
    assert plan_num_pages(model4, tight, 16 * 64).pages == 4 * 20
    with pytest.raises(ValueError, match="lower max_model_len"):
        plan_num_pages(model1, tight, 16 * 64)
    # the pre-load memory planner (start-up refusals) divides the KV by the split too,
    # rounding a length that does not divide up
    kv = {s: memory_plan(TINY, make_mesh(parse_layout(f"sequence={s}")), "float32", 1001,
                         capacity_bytes=1 << 40).kv_bytes for s in (1, 4)}
    assert kv[4] == kv[1] // 1001 * 1004 // 4


COLLECTIVE = re.compile(r" (all-gather|all-reduce|all-to-all|collective-permute|"
                        r"reduce-scatter)(?:-start)?\(")


def _collectives(engine: Engine, decode: bool, tokens: int, seqs: int):
    """(opcode, HLO line) of every collective in the compiled program."""
    plan = StepPlan(decode=decode, shards=[[] for _ in range(engine.data_shards)])
    inputs = build_inputs(plan, engine.config, engine.pages_per_seq, 0, tokens, seqs)
    hlo = engine._fns.lower(engine._kv, engine._counts, engine._seen,
                            engine._put(inputs), decode).compile().as_text()
    return [(m.group(1), line) for line in hlo.splitlines() if (m := COLLECTIVE.search(line))]


def _attention_ops(ops) -> list[tuple[str, str]]:
    """The attention's own collectives (in the shard_map), as (opcode, result type)."""
    return [(op, re.sub(r"\{[^}]*\}", "", line.split("=", 1)[1].split(f" {op}")[0].strip()))
            for op, line in ops if re.search(r'op_name="[^"]*shard_map/all_(gather|to_all)"',
                                             line)]


def test_decode_collectives_per_layer():
    """8 rows on sequence=2 (each device holds 4 of the step's tokens): per layer one
    all-gather of q|k|v ([1, 8, Hq + 2 Hkv, D]) and one all-to-all of the partials
    (out | lse) of each device's tokens. 1 row (does not divide): one all-gather of the
    partials of all tokens. One device: no collective at all."""
    layers, h, d = TINY.num_layers, TINY.num_heads, TINY.head_dim
    engine = _engine("sequence=2")
    ops = _attention_ops(_collectives(engine, True, 8, 8))
    qkv = f"f32[1,8,{h + 2 * TINY.num_kv_heads},{d}]"
    assert sorted(ops) == sorted([("all-gather", qkv)] * layers + [
        ("all-to-all", f"(f32[1,4,{h},{d + 1}], f32[1,4,{h},{d + 1}])")] * layers), ops
    ops = _attention_ops(_collectives(engine, True, 1, 1))
    assert ops == [("all-gather", f"f32[2,1,{h},{d + 1}]")] * layers, ops
    engine.shutdown()
    engine = _engine("")
    assert _collectives(engine, True, 8, 8) == []
    engine.shutdown()
