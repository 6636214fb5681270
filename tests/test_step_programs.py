"""The default configuration's compiled programs do only the work the batch needs.

A regression guard for serving speed that is not a timed test: the KV cache is updated
in place (donated, aliased, never copied or rewritten whole), no program's static cost
grows with the page pool or with `max_model_len`-wide page tables, and a lone prompt
runs in the small buckets.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.engine.batching import build_inputs
from meshserve.engine.engine import Engine, EngineConfig
from meshserve.engine.paged_attention import cache_shape
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.scheduler import StepPlan
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.config import ModelConfig
from meshserve.models.loading import init_random
from meshserve.tools.bench_mesh_hlo import HloModule

TINY = ModelConfig(
    family="llama", architecture="LlamaForCausalLM", vocab_size=512, hidden_size=128,
    intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
    rms_norm_eps=1e-5, max_position_embeddings=2048, bos_token_id=1, eos_token_ids=(2,),
)
# Ops that may produce a whole-cache array: views, plumbing and in-place updates.
IN_PLACE = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "call",
            "dynamic-update-slice", "scatter"}


@pytest.fixture(scope="module")
def model():
    return init_random(TINY, make_mesh(parse_layout("")), jnp.float32, seed=0)


def _compiled(engine: Engine, decode: bool, tokens: int, seqs: int):
    plan = StepPlan(decode=decode, shards=[[]])
    inputs = build_inputs(plan, engine.config, engine.pages_per_seq, 0, tokens, seqs)
    lowered = engine._fns.lower(engine._kv, engine._counts, engine._seen, inputs, decode)
    return lowered.compile()


def whole_cache_ops(hlo: str, shape: tuple[int, ...], dtype: str = "f32") -> collections.Counter:
    """Opcodes (fusions as fusion:<root opcode>) of instructions whose result has the
    cache's shape."""
    spelled = f"{dtype}[{','.join(map(str, shape))}]"
    module, ops = HloModule.parse(hlo), collections.Counter()
    for insts in module.computations.values():
        for inst in insts:
            if inst.type_text.split("{")[0] != spelled:
                continue
            op = inst.opcode
            if op == "fusion":
                fused = [c for attr, c in inst.called() if attr == "calls"]
                # a fused computation prints its ROOT last
                op = f"fusion:{module.computations[fused[0]][-1].opcode if fused else '?'}"
            ops[op] += 1
    return ops


def aliased_parameters(hlo: str) -> set[int]:
    header = next(line for line in hlo.splitlines() if line.startswith("HloModule"))
    return {int(p) for p in re.findall(r"\{[0-9,]*\}: \((\d+), \{\}, (?:may|must)-alias\)",
                                       header)}


PROGRAMS = [(True, 1, 1), (True, 8, 8), (True, 64, 64), (False, 16, 8), (False, 512, 64)]


@pytest.mark.parametrize("impl", [None, "reference"])
def test_default_programs_update_the_kv_cache_in_place(model, impl):
    engine = Engine(model, EngineConfig(), attention_impl=impl)
    shape = cache_shape(TINY, 1, engine.num_pages, engine.config.page_size)
    for decode, tokens, seqs in PROGRAMS if impl is None else PROGRAMS[1::3]:
        hlo = _compiled(engine, decode, tokens, seqs).as_text()
        ops = whole_cache_ops(hlo, shape)
        allowed = IN_PLACE | {f"fusion:{op}" for op in IN_PLACE}
        assert set(ops) <= allowed, (decode, tokens, seqs, ops)
        assert any(op.endswith(("dynamic-update-slice", "scatter")) for op in ops), ops
        # every layer's cache buffer is donated into its output
        assert len(aliased_parameters(hlo)) >= TINY.num_layers + 2, decode  # + counts, seen
    engine.shutdown()


def _cost(engine: Engine, decode: bool, tokens: int, seqs: int) -> dict:
    compiled = _compiled(engine, decode, tokens, seqs)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA's static loop bounds: a loop over every page-table column would show up here
    trips = re.findall(r'known_trip_count":\{"n":"(\d+)"', compiled.as_text())
    trips = sorted(int(n) for n in trips)
    return {"flops": cost["flops"], "trip_counts": trips}


@pytest.mark.parametrize("impl", [None, "reference"])
def test_program_cost_does_not_grow_with_pool_or_page_table_width(model, impl):
    """Attention reads what the batch's lengths need (its loops run to the real lengths):
    an 8x larger pool and 8x wider page tables leave every program's static cost and its
    loops' static trip counts as they were. (FLOPs, not bytes: XLA costs an in-place
    scatter's bytes as its whole operand, though it writes only the rows it updates;
    copies are the test above's.)"""
    wide = Engine(model, EngineConfig(), attention_impl=impl)
    narrow = Engine(model, dataclasses.replace(EngineConfig(), max_model_len=256),
                    attention_impl=impl)
    assert wide.num_pages == 8 * narrow.num_pages and wide.pages_per_seq == 128
    for decode, tokens, seqs in [(True, 8, 8), (False, 128, 8)]:
        a, b = _cost(wide, decode, tokens, seqs), _cost(narrow, decode, tokens, seqs)
        assert a["flops"] == pytest.approx(b["flops"], rel=0.01), (decode, a, b)
        assert a["trip_counts"] == b["trip_counts"], (decode, a, b)
    wide.shutdown()
    narrow.shutdown()


def test_a_lone_prompt_runs_in_the_small_buckets(model):
    engine = Engine(model, EngineConfig())
    rng = np.random.default_rng(0)
    engine.generate([rng.integers(3, 512, 128).tolist()],
                    SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True))
    # one mixed call of 128 tokens x 8 rows (prefill + first token), then 16 tokens in
    # decode calls of one row, 8 steps each
    assert engine.program_calls == {(False, 128, 8): 1, (True, 1, 1): 2}
    engine.shutdown()
