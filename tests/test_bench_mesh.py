"""`meshserve bench-mesh`: every layout planned, a few measured end to end, the decode
step's collectives counted from its HLO, results written and fed back to `serve`.

Speeds are never asserted (the machine is shared and noisy): only that the numbers are
there, in their units, and consistent with each other.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.engine.engine import EngineConfig
from meshserve.meshes import parse_layout
from meshserve.tools.bench_mesh import bench, parse_layouts
from meshserve.tools.bench_mesh_hlo import KINDS, decode_collectives, replica_groups, shape_bytes
from meshserve.tools.bench_mesh_report import (
    REQUIRED_KEYS,
    apply_layout_from,
    best_layout_from,
    choose_best,
    format_table,
    write_outputs,
)
from meshserve.tools.bench_mesh_run import Workload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 2  # the tiny llama of tests/hf_models.py: 2 layers, 4 heads, 2 kv heads
# Measured end to end: tensor=2 and tensor=4 (with data shards beside them), two slices
# behind the router, and pure data parallelism. The other 31 are only planned.
MEASURED = "data=4,tensor=2;data=2,tensor=4;slices=2,data=2,tensor=2;data=8"
WORKLOAD = Workload(num_requests=6, input_len=12, output_len=6, max_duration=120.0)
# One token bucket and one batch bucket: two compiled programs per slice.
ENGINE = EngineConfig(page_size=16, max_seqs=4, max_step_tokens=64, decode_steps=4,
                      min_token_bucket=64, min_seq_bucket=4, max_kv_memory_bytes=None)
SLO = {"ttft_ms": 60_000.0, "tpot_ms": 60_000.0}  # generous: CPU timings vary a lot


def _run(ckpt: str, layouts: str | None, **kw) -> dict:
    return bench(ckpt, parse_layouts(layouts, 8), WORKLOAD, SLO, ENGINE, jnp.float32,
                 log=lambda _msg: None, **kw)


@pytest.fixture(scope="module")
def measured(checkpoint_dir) -> dict:
    return _run(checkpoint_dir("llama"), MEASURED)


def _by_layout(results: dict) -> dict[str, dict]:
    return {parse_layout(r["layout"]): r for r in results["layouts"]}


def test_every_factorisation_is_planned_and_misfits_are_refused_with_reasons(checkpoint_dir):
    ckpt = checkpoint_dir("llama")
    results = _run(ckpt, None, plan_only=True)
    rows = _by_layout(results)
    assert len(results["layouts"]) == len(rows) == 35  # 8 = 2^3 over 5 axes: C(7, 4)
    assert all(layout.num_devices == 8 for layout in rows)
    assert results["best"] is None and "plan-only" in results["best_message"]
    for layout, row in rows.items():
        assert set(REQUIRED_KEYS) <= set(row)
        if layout.expert > 1:
            assert not row["fits"] and "no experts" in row["reason"]
        elif layout.tensor == 8:
            assert not row["fits"] and "num_heads=4 is not divisible by tensor=8" in row["reason"]
        else:
            assert row["fits"] and row["reason"] is None, row
    assert sum(r["fits"] for r in rows.values()) == 35 - 15 - 1  # 15 use experts
    # Per-device bytes follow the sharding: weights shrink with tensor; KV heads (2) split
    # over tensor=2, and tensor=4 replicates them to 4 heads, one per device again.
    one, two, four = (rows[parse_layout(f"data={8 // t},tensor={t}")] for t in (1, 2, 4))
    assert one["weights_bytes_per_device"] > two["weights_bytes_per_device"]
    assert two["weights_bytes_per_device"] > four["weights_bytes_per_device"]
    assert two["kv_bytes_per_device"] * 2 == one["kv_bytes_per_device"]
    assert four["kv_bytes_per_device"] == two["kv_bytes_per_device"]
    # A device too small for anything: every layout is refused by the planner, with numbers.
    tiny = _run(ckpt, "data=8;data=2,tensor=4", plan_only=True, capacity=1 << 20)
    for row in tiny["layouts"]:
        assert not row["fits"] and "does not fit" in row["reason"] and "MiB" in row["reason"]
        assert row["weights_bytes_per_device"] > 0 and row["ttft_ms_p50"] is None


def test_measured_layouts_report_consistent_metrics(measured):
    rows = _by_layout(measured)
    assert len(rows) == 4
    for layout, r in rows.items():
        assert set(REQUIRED_KEYS) <= set(r) and r["fits"] and r.get("error") is None, r
        assert r["completed"] == WORKLOAD.num_requests and r["failed"] == 0
        assert r["total_output_tokens"] == WORKLOAD.num_requests * WORKLOAD.output_len
        assert 0 < r["ttft_ms_p50"] <= r["ttft_ms_p99"] < 1e3 * r["duration_s"]
        assert 0 < r["tpot_ms_p50"] <= r["tpot_ms_p99"]
        assert math.isclose(r["output_tokens_per_s"],
                            r["total_output_tokens"] / r["duration_s"], rel_tol=1e-9)
        assert 0 < r["goodput_rps"] <= r["request_throughput_rps"] + 1e-9
        assert r["compiles_during_run"] == 0  # warm-up compiled everything the run used
        assert set(r["collectives_per_step"]) == set(KINDS)
        assert r["weights_bytes_per_device"] > 0 and r["kv_bytes_per_device"] > 0
        if layout.tensor == 1:
            assert r["megatron_min_all_reduces"] == 0
            assert r["all_reduce_ratio_to_megatron"] is None


@pytest.mark.parametrize("layout", ["data=4,tensor=2", "data=2,tensor=4"])
def test_decode_step_collectives_are_megatrons_plus_the_vocab_sharded_ends(measured, layout):
    """Per decode step on tensor=N: Megatron's 2 all-reduces per layer (attention output
    and MLP down projections), plus 4 all-reduces because the embedding and LM head are
    split over the vocabulary (README: Mesh-layout benchmark)."""
    r = _by_layout(measured)[parse_layout(layout)]
    steps = [s for s in r["collective_sources"] if s["where"] == "step"]
    model_parallel = [s for s in steps if s["axes"] == r["model_parallel_axis"]]

    def count(kind: str, op: str) -> int:
        return sum(s["count"] for s in model_parallel if s["kind"] == kind and op in s["op_name"])

    assert count("all-reduce", "dot_general") == 2 * LAYERS  # attention output, MLP down
    assert count("all-reduce", "jit(_take)/gather") == 1  # embedding lookup
    assert count("all-reduce", "reduce_max") == 1  # row maximum (logsumexp and argmax)
    assert count("all-reduce", "reduce_min") == 1  # argmax: first index of the maximum
    # logsumexp's sum and the chosen token's logit (XLA combines the two into one).
    assert count("all-reduce", "reduce_sum") == 1
    assert count("all-reduce", "take_along_axis") == 1
    assert count("all-gather", "") == 0
    assert r["megatron_min_all_reduces"] == 2 * LAYERS
    assert r["model_parallel_all_reduces_per_step"] == 2 * LAYERS + 4
    assert r["all_reduce_ratio_to_megatron"] == (2 * LAYERS + 4) / (2 * LAYERS)
    # data shards run one SPMD program: the loop's "anyone still running?" crosses them
    # (a predicate); the token statistics' scatter runs per data shard and adds none.
    data = [s for s in steps if s not in model_parallel]
    assert sorted((s["kind"], s["op_name"]) for s in data) == [
        ("all-reduce", "reduce_or"), ("all-reduce", "while/cond/reduce_or")]
    assert r["collectives_per_step"]["all-reduce"] == 2 * LAYERS + 4 + 2
    assert r["collectives_per_step"]["all-gather"] == 0
    assert sum(r["collectives_per_step"].values()) == sum(s["count"] for s in steps)
    assert sum(r["collective_bytes_per_step"].values()) == sum(s["bytes"] for s in steps)
    # The 2 row-parallel all-reduces per layer move one f32 hidden state per batch row.
    hidden, rows = 64, ENGINE.max_seqs
    assert next(s["bytes"] for s in model_parallel
                if s["op_name"] == "dot_general") == 2 * LAYERS * rows * hidden * 4


def test_best_meets_the_slo_or_is_null_with_a_message(measured):
    rows = measured["layouts"]
    best = next(r for r in rows if r["layout"] == measured["best"])
    assert best["meets_slo"] and best["ttft_ms_p99"] <= SLO["ttft_ms"]
    assert best["goodput_rps"] == max(r["goodput_rps"] for r in rows if r["meets_slo"])
    assert measured["best"] in measured["best_message"]
    copies = [dict(r) for r in rows]
    layout, message = choose_best(copies, {"ttft_ms": 1e-3}, WORKLOAD.num_requests)
    assert layout is None and "no layout meets the SLO" in message and "ttft_ms" in message
    assert not any(r["meets_slo"] for r in copies)
    table = format_table(measured)
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(rows)
    assert "| best |" in table


def test_outputs_and_serve_layout_from(measured, tmp_path):
    problems = write_outputs(measured, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["best"] == measured["best"] and len(saved["layouts"]) == 4
    assert all(set(REQUIRED_KEYS) <= set(r) for r in saved["layouts"])
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["layout"] for r in table] == [r["layout"] for r in measured["layouts"]]
    assert set(REQUIRED_KEYS) <= set(table[0])
    for row, r in zip(table, measured["layouts"], strict=True):
        assert int(row["collectives_per_step"]) == sum(r["collectives_per_step"].values())
    events = [os.path.join(d, n) for d, _, names in os.walk(tmp_path / "tensorboard")
              for n in names if "tfevents" in n]
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()  # tensorboard's writer stores scalars as (scalar-plugin) tensors
    goodput = acc.Tensors("bench_mesh/goodput_rps")
    assert [e.step for e in goodput] == [0, 1, 2, 3]
    assert make_ndarray(goodput[0].tensor_proto).item() == pytest.approx(
        measured["layouts"][0]["goodput_rps"], rel=1e-6)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert problems and "matplotlib" in problems[0]
    else:
        assert not problems
        assert (tmp_path / "goodput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `serve --layout-from` takes `best`: slices and the per-slice mesh.
    best = best_layout_from(str(tmp_path / "results.json"))
    assert best == parse_layout(measured["best"])
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_string("mesh", "", "", flag_values=fv)
    flags.DEFINE_integer("slices", 1, "", flag_values=fv)
    flags.DEFINE_string("layout_from", None, "", flag_values=fv)
    fv(["serve", f"--layout_from={tmp_path / 'results.json'}"])
    apply_layout_from(fv)
    assert parse_layout(fv.mesh) == parse_layout(best.to_string()) and fv.slices == best.slices
    fv(["serve", "--slices=2"])
    with pytest.raises(ValueError, match="not both"):
        apply_layout_from(fv)
    (tmp_path / "none.json").write_text(json.dumps({"best": None, "best_message": "none met"}))
    with pytest.raises(ValueError, match="none met"):
        best_layout_from(str(tmp_path / "none.json"))


def test_cli_writes_results_when_nothing_fits(checkpoint_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "meshserve.tools.cli", "bench-mesh",
         "--checkpoint", checkpoint_dir("llama"),
         "--cpu-devices", "8", "--layouts", "tensor=8;expert=2,data=4;data=8",
         "--device-memory-gib", "0.001", "--slo", "ttft_ms=500", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # nothing could be measured
    assert "0 fit, 3 refused" in proc.stderr and "not measured (3)" in proc.stdout
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["best"] is None and "no layout was measured" in saved["best_message"]
    reasons = [r["reason"] for r in saved["layouts"]]
    assert "not divisible by tensor=8" in reasons[0] and "no experts" in reasons[1]
    assert "does not fit" in reasons[2]
    assert saved["command"].startswith("meshserve bench-mesh")



def test_moe_checkpoint_runs_an_expert_layout_and_reports_its_routing(checkpoint_dir):
    """Mixtral (2 layers, 8 experts, top 2) on data=2,expert=4: the expert weights split
    4 ways, one psum over `expert` per MoE layer and step (no all-to-all: docs/design.md),
    and the routing counts of the run: every fed token k times per layer."""
    from meshserve.engine.experts import hotspot_ratios
    from meshserve.models.checkpoint import checkpoint_config

    ckpt = checkpoint_dir("mixtral")
    cfg = checkpoint_config(ckpt)
    results = _run(ckpt, "data=2,expert=4")
    (r,) = results["layouts"]
    assert r["fits"] and r.get("error") is None and r["completed"] == WORKLOAD.num_requests
    assert r["compiles_during_run"] == 0 and results["model"]["num_experts"] == 8
    layers = len(cfg.moe_layers)
    expert_bytes = layers * 3 * cfg.num_experts * cfg.hidden_size * cfg.moe_intermediate_size * 4
    assert r["expert_weights_bytes_per_device"] * 4 == expert_bytes
    assert r["expert_weights_bytes_per_device"] < r["weights_bytes_per_device"]
    steps = [c for c in r["collective_sources"] if c["where"] == "step"]
    combine = [c for c in steps if "psum" in c["op_name"]]
    assert [(c["kind"], c["axes"]) for c in combine] == [("all-reduce", "expert")]
    # Nothing else crosses `expert` (the token statistics stay per data shard).
    assert [c for c in steps if "expert" in c["axes"]] == combine
    assert combine[0]["count"] == layers
    # One f32 hidden state per batch row of the data shard, per layer.
    assert combine[0]["bytes"] == layers * ENGINE.max_seqs * cfg.hidden_size * 4
    assert r["collectives_per_step"]["all-to-all"] == 0
    fed = WORKLOAD.num_requests * (WORKLOAD.input_len + WORKLOAD.output_len - 1)
    counts = r["expert_tokens"]
    # Every fed token exactly k times per layer: rows stopped on the device route nothing,
    # and the engine publishes its counts before a finished stream's last chunk.
    k = cfg.experts_per_token
    assert len(counts) == layers and all(
        sum(c) == k * fed for c in counts), ([sum(c) for c in counts], k * fed, r)
    assert r["expert_devices"] == 4 and r["moe_dropped_tokens"] == 0
    ratios = hotspot_ratios(np.array(counts), 4)
    assert r["expert_hotspot_ratio_per_layer"] == pytest.approx(ratios.tolist())
    assert r["expert_hotspot_ratio"] == pytest.approx(ratios.max())
    assert 1 <= r["expert_hotspot_ratio"] <= 4
    assert "| data=2,expert=4 | 0.1 |" in format_table(results)


HLO = """HloModule m, entry_computation_layout={()->f32[]}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%fused (p: f32[4,64]) -> f32[4,64] {
  %p = f32[4,64]{1,0} parameter(0)
  ROOT %ar = f32[4,64]{1,0} all-reduce(%p), replica_groups={{0,1},{2,3}}, to_apply=%add
}

%branch_a (t: f32[4,64]) -> f32[4,64] {
  %t = f32[4,64]{1,0} parameter(0)
  ROOT %a2a = f32[4,64]{1,0} all-to-all(%t), replica_groups=[2,2]<=[4], dimensions={0}
}

%body (c: (s32[], f32[4,64])) -> (s32[], f32[4,64]) {
  %c = (s32[], f32[4,64]{1,0}) parameter(0)
  %h = f32[4,64]{1,0} get-tuple-element(%c), index=1
  %f = f32[4,64]{1,0} fusion(%h), kind=kLoop, calls=%fused
  %s = f32[4,32]{1,0} slice(%f), slice={[0:4], [0:32]}
  %ags = (f32[4,32]{1,0}, f32[4,64]{1,0}) all-gather-start(%s), MESH_GROUPS, dimensions={1}
  %agd = f32[4,64]{1,0} all-gather-done(%ags)
  %pr = pred[] constant(true)
  %cd = f32[4,64]{1,0} conditional(%pr, %agd, %agd), branch_computations={%branch_a, %fused}
  %i = s32[] get-tuple-element(%c), index=0
  ROOT %r = (s32[], f32[4,64]{1,0}) tuple(%i, %cd)
}

%cond (c: (s32[], f32[4,64])) -> pred[] {
  %c = (s32[], f32[4,64]{1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (a: f32[4,64]) -> f32[4,64] {
  %a = f32[4,64]{1,0} parameter(0)
  %once = f32[4,64]{1,0} collective-permute(%a), source_target_pairs={{0,2},{2,0}}
  %z = s32[] constant(0)
  %t = (s32[], f32[4,64]{1,0}) tuple(%z, %once)
  %w = (s32[], f32[4,64]{1,0}) while(%t), condition=%cond, body=%body
  ROOT %o = f32[4,64]{1,0} get-tuple-element(%w), index=1
}
""".replace("MESH_GROUPS", "replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}")


def test_hlo_counting_follows_the_loop_body_and_names_the_axes():
    axes = {"outer": 2, "inner": 2}  # device i sits at (i // 2, i % 2)
    found = decode_collectives(HLO, axes)
    assert found.per_step == {**dict.fromkeys(KINDS, 0), "all-reduce": 1, "all-gather": 1}
    # all-reduce: its buffer; async all-gather: the gathered output, not the tuple.
    assert found.bytes_per_step["all-reduce"] == 4 * 64 * 4
    assert found.bytes_per_step["all-gather"] == 4 * 64 * 4
    # Both branches of the conditional are counted apart from the per-step ones.
    assert found.conditional["all-to-all"] == 1 and found.conditional["all-reduce"] == 1
    assert found.per_call["collective-permute"] == 1
    by_kind = {c.kind: c.axes for c in found.items if c.where != "conditional"}
    assert by_kind == {"all-reduce": ("inner",), "all-gather": ("inner",),
                       "collective-permute": ("outer",)}
    assert replica_groups("replica_groups=[2,2]<=[2,2]T(1,0)", 4) == [[0, 2], [1, 3]]
    assert replica_groups("replica_groups=mesh['a'=2,'b'=2], device_ids=([2,2]T(1,0)) "
                          "{'a'}", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups={}", 3) == [[0, 1, 2]]
    assert shape_bytes("(f32[2,3]{1,0}, pred[4], bf16[8])") == 24 + 4 + 16


def test_sequence_layout_reports_kv_split_prefill_collectives_and_long_prompt_ttft(
        checkpoint_dir):
    """sequence=4: each sequence's KV split 4 ways (per-device KV 1/4 of one device's,
    the pool rounded to a multiple of 4), per layer one all-gather of q|k|v and one
    all-to-all of the partials per prefill chunk (nothing else), and the TTFT of one
    long prompt sent alone after the workload."""
    ckpt = checkpoint_dir("llama")
    workload = dataclasses.replace(WORKLOAD, num_requests=2, long_prompt_len=200)
    layouts = parse_layouts("data=1;sequence=4", 8)
    planned = _by_layout(bench(ckpt, layouts, workload, SLO, ENGINE, jnp.float32,
                               plan_only=True, log=lambda _msg: None))
    one, split = (planned[parse_layout(t)]["kv_bytes_per_device"]
                  for t in ("data=1", "sequence=4"))
    page = LAYERS * ENGINE.page_size * 2 * 2 * 16 * 4  # 2 kv heads of 16, f32
    assert abs(split - one / 4) <= page
    results = bench(ckpt, layouts[1:], workload, SLO, ENGINE, jnp.float32,
                    log=lambda _msg: None)
    r = results["layouts"][0]
    assert r.get("error") is None and r["completed"] == 2, r
    assert r["kv_bytes_per_device"] == split
    chunk = r["prefill_chunk_tokens"]
    assert chunk == ENGINE.max_step_tokens
    # and one all-reduce: the last rows' hidden states, taken from the token-split batch
    assert r["collectives_per_prefill_chunk"] == {**dict.fromkeys(KINDS, 0), "all-reduce": 1,
                                                  "all-gather": LAYERS, "all-to-all": LAYERS}
    # q|k|v (4 + 2 + 2 heads of 16) gathered, then (out | lse) of 4 heads: f32 per token
    qkv, partials = (4 + 2 * 2) * 16 * 4, 4 * (16 + 1) * 4
    assert r["collective_bytes_per_prefill_token"]["all-gather"] == LAYERS * qkv
    assert r["collective_bytes_per_prefill_token"]["all-to-all"] == LAYERS * partials
    assert r["long_prompt_tokens"] == 200 and r["long_prompt_ttft_ms"] > 0
    assert "200-token prompt" in format_table(results)
