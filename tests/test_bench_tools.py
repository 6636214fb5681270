"""The benchmark scripts still run end to end (tiny shapes; their numbers are not judged
here: speed is measured in benchmarks, not tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.serving_fixtures import demo_ckpt  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> None:
    module = "meshserve.tools." + script.removesuffix(".py")
    done = subprocess.run([sys.executable, "-m", module, *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def test_bench_engine_quick_writes_every_row(tmp_path):
    out = tmp_path / "engine.json"
    _run("bench_engine.py", "--quick", "--skip-hf", "--configs", "default,tuned", "--out", str(out))
    report = json.loads(out.read_text())
    kinds = [(r["config"], r["kind"], r["batch"]) for r in report["rows"]]
    assert kinds == [(c, k, b) for c in ("default", "tuned")
                     for k, b in (("decode", 1), ("decode", 8), ("prefill", 1))]
    for r in report["rows"]:
        assert r["ours_tok_s"] > 0 and 0 < r["ours_of_roofline"]
        # each figure carries the rooflines taken in its own round, one before each step
        assert min(r["bandwidths_GBps"]) <= r["bandwidth_GBps"] <= max(r["bandwidths_GBps"])
        assert r["bandwidth_GBps"] > 0 and r["matmul_GFLOPs"] > 0
        if r["kind"] == "decode":
            # 64 tokens in calls of 8 (the server's default) or 16 (tuned) decode steps; the
            # tuned engine (no overlap) takes a roofline before each step, the default
            # (a chained call in flight between steps) once before the window
            calls = 8 if r["config"] == "default" else 4
            assert len(r["steps_tok_s"]) == calls
            assert len(r["bandwidths_GBps"]) == (1 if r["config"] == "default" else calls)
            assert min(r["steps_tok_s"]) <= r["ours_tok_s"] <= max(r["steps_tok_s"])


def test_bench_matmul_compares_both_paths(tmp_path):
    out = tmp_path / "matmul.json"
    _run("bench_matmul.py", "--hidden", "64", "--intermediate", "128", "--kv-width", "32",
         "--layers", "2", "--vocab", "256", "--rows", "1,9", "--repeats", "1", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 9]
    for r in rows:
        assert r["xla_s"] > 0 and r["packed_s"] > 0
        assert r["weight_bytes"] == 4 * (2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3) + 64 * 256)


def test_bench_startup_reports_cold_and_warm_starts(tmp_path):
    out = tmp_path / "startup.json"
    _run("bench_startup.py", "--cases", "demo", "--starts", "1", "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    cold, warm = row["cold"], row["warm"]
    assert cold["programs"] > 0 and cold["from_cache"] == 0
    assert warm["programs"] == warm["from_cache"] == cold["programs"]
    for m in (cold, warm):
        assert m["wall_ready_s"] > 0 and m["rss_bytes"] > 0 and m["kv_pages"] > 0
        assert m["ready_s"] >= m["load_s"] + m["warmup_s"]


def test_bench_shipped_drives_a_real_server_and_transformers(tmp_path):
    out = tmp_path / "shipped.json"
    _run("bench_shipped.py", "--quick", "--streams", "4", "--out", str(out))
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    for key in ("ttft_s", "tpot_s", "streams_s", "hf_static_batch_s", "engine_prefill_s",
                "decode_roofline_s", "streams_compute_roofline_s", "matmul_GFLOPs"):
        assert row[key] > 0, key
    # No run beats the peak matmul rate on the streams' FLOPs.
    assert row["streams_compute_roofline_s"] < min(row["streams_s"], row["hf_static_batch_s"])
    assert set(report["ratios"]) == set(report["targets"]) == set(report["met"])


def test_accelerator_check_smoke_runs_every_part(tmp_path):
    """On CPU the TPU kernel runs in the interpreter at toy sizes: the parity figures are
    real (and must pass), the timings are not judged."""
    out = tmp_path / "accel.json"
    _run("accelerator_check.py", "--smoke", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["kernel"] == "tpu-interpret" and report["ok"]
    assert {(r["dtype"], r["case"]) for r in report["parity"]} == {
        (d, c) for d in ("float32", "bfloat16")
        for c in ("decode", "prefill", "mixed", "mixed, pages split 2 ways (lse path)")}
    assert all(r["finite"] and r["kv_written_equal"] for r in report["parity"])
    assert max(r["max_abs_error"] for r in report["parity"] if r["dtype"] == "float32") < 1e-4
    assert [(r["batch"], r["context"]) for r in report["decode_bandwidth"]] == [(2, 64)]
    assert report["engine"]["agree"] == report["engine"]["tokens"] == 4
    assert [r["batch"] for r in report["engine_decode"]] == [1, 2]


def test_bench_prefix_drives_two_routed_slices(tmp_path):
    out = tmp_path / "prefix.json"
    _run("bench_prefix.py", "--quick", "--configs", "cache-aware", "--num-prompts", "6",
         "--input-len", "64", "--prefix-len", "48", "--out", str(out))
    report = json.loads(out.read_text())
    result = report["results"]["cache-aware"]
    assert result["completed"] == 6 and 0 < result["cache_hit_rate"] < 1
    assert sum(result["requests_per_slice"].values()) == 6
    metrics = result["server_metrics"]
    assert sum(v for k, v in metrics.items()
               if k.startswith("meshserve_routing_decisions_total")) == 6
    assert report["configs"]["cache-aware"]["flags"][:2] == ["--slices", "2"]


def test_soak_smoke_run_mixes_transports_cancels_and_deadlines(tmp_path, demo_ckpt):  # noqa: F811
    out = tmp_path / "soak.json"
    _run("soak.py", "--requests", "60", "--concurrency", "8", "--rss-baseline-at", "20",
         "--checkpoint", demo_ckpt, "--out", str(out))
    report = json.loads(out.read_text())
    assert report["passed"] and all(report["checks"].values()), report["checks"]
    assert report["finished"] == sum(report["outcomes"].values()) == 60
    kinds = {tuple(key.split("/")[:2]) for key in report["outcomes"]}
    assert kinds == {(t, k) for t in ("grpc", "http") for k in ("plain", "cancel", "deadline")}
    assert {key.split("/")[2] for key in report["outcomes"]} <= {
        "OK", "CANCELLED", "DEADLINE_EXCEEDED"}
    assert report["pages"]["slices"][0]["free_pages"] == report["pages"]["slices"][0][
        "total_pages"] > 0
    assert report["rss_baseline_bytes"] > 0 and report["rss_last_bytes"] > 0


def test_bench_cp_local_times_each_local_part(tmp_path):
    out = tmp_path / "cp_local.json"
    _run("bench_cp_local.py", "--quick", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["decode 2 x 64", "prefill 32"]
    for r in rows:
        assert min(r["kernel_masked_ms"], r["pure_jax_local_ms"], r["kernel_all_pages_ms"]) > 0
        assert r["pure_over_kernel"] == r["pure_jax_local_ms"] / r["kernel_masked_ms"]


def test_bench_disagg_runs_both_setups_on_the_same_engines(tmp_path):
    out = tmp_path / "disagg.json"
    done = subprocess.run(
        [sys.executable, "-m", "meshserve.tools.cli", "bench-disagg", "--demo",
         "--cpu-devices", "2", "--short", "3", "--short-output", "6", "--long", "1",
         "--long-input", "40", "--long-start-ms", "20", "--max-step-tokens", "32",
         "--max-seqs", "4", "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    colocated, pd = report["colocated"], report["disaggregated"]
    assert colocated["completed"] == pd["completed"] == 4
    assert colocated["kv_bytes_per_request"] == 0  # nothing moves when colocated
    # every request moved its KV: 16-token prompts 1 page, the 40-token one 3 (a bucket of
    # 4 capped at the 3 pages of max_model_len 48), each page 4 layers x 16 slots x 8
    # channels x 32 x 4 bytes
    assert pd["kv_bytes_per_request"] == (3 * 1 + 3) * 4 * 16 * 8 * 32 * 4 / 4
    assert pd["kv_transfer_ms"]["mean"] > 0
    assert "ITL p99 short (ms)" in done.stdout
