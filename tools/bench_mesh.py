"""`meshserve bench-mesh`: measure every layout that fits and pick the best under an SLO.

Every factorisation `slices x data x tensor x expert x sequence` of the devices (or the
`--layouts` given) is checked by the layout rules and the memory planner; those that
fit are loaded once per slice, warmed up, and sent the same synthetic workload through
the server's own router and engines (TTFT, TPOT, output tokens/s and goodput as in
vLLM `bench serve`); the collectives of one decode step are counted in the compiled
decode program. A MoE checkpoint runs the expert layouts too; their rows add the expert
weight bytes per device and the run's routing (token slots per expert per layer, the
hotspot ratio, dropped tokens: 0). Writes a table, and with --out results.json /
results.csv, TensorBoard scalars and goodput.png. `meshserve serve --layout-from
DIR/results.json` serves `best`.

    meshserve bench-mesh --checkpoint ~/ckpt/llama --cpu-devices 8 --num-requests 32 \\
        --request-rate 4 --input-len 64 --output-len 32 --slo ttft_ms=2000,tpot_ms=200 \\
        --out /tmp/bench-mesh
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable

from absl import flags

from meshserve.tools.model_flags import capacity_bytes, checkpoint_dir, define_model_flags


def define_flags() -> None:
    define_model_flags()
    d = flags
    d.DEFINE_string("layouts", None, "';'-separated layouts to try, e.g. "
                    "'tensor=8;slices=2,tensor=4' (default: every factorisation of the "
                    "devices over slices, data, tensor, expert, sequence).")
    d.DEFINE_bool("plan_only", False, "Check and size the layouts; load and measure none.")
    d.DEFINE_string("out", None, "Write results.json, results.csv, tensorboard/ and "
                    "goodput.png into this directory.")
    # Workload (vLLM `bench serve` random dataset), the same for every layout.
    d.DEFINE_integer("num_requests", 32, "Requests per layout.", lower_bound=1,
                     upper_bound=100_000)
    d.DEFINE_float("request_rate", math.inf, "Mean arrivals per second (inf: all at once).")
    d.DEFINE_float("burstiness", 1.0, "Gamma shape of inter-arrival times (1 = Poisson).")
    d.DEFINE_integer("max_concurrency", None, "Most requests in flight at once.",
                     lower_bound=1)
    d.DEFINE_integer("input_len", 64, "Mean prompt length in tokens.", lower_bound=1)
    d.DEFINE_integer("output_len", 32, "Mean output length in tokens.", lower_bound=1)
    d.DEFINE_float("range_ratio", 0.0, "Lengths vary uniformly by this fraction.",
                   lower_bound=0.0, upper_bound=1.0)
    d.DEFINE_integer("long_prompt_len", 0, "After the workload, time the first token of "
                     "one prompt of this many tokens sent alone (0: none).", lower_bound=0)
    d.DEFINE_integer("seed", 0, "Seed for prompts and arrivals.")
    d.DEFINE_string("slo", None, "Targets a good request meets, e.g. ttft_ms=500,tpot_ms=50 "
                    "(also e2e_ms); the best layout meets them at p99.")
    d.DEFINE_float("max_duration", 600.0, "Seconds per layout before the rest is cancelled.",
                   lower_bound=1.0)
    # Engine, per slice (limits are per data shard). One bucket each by default: every
    # layout compiles two programs, and warm-up stays short.
    d.DEFINE_integer("page_size", 16, "Tokens per KV page.", lower_bound=1)
    d.DEFINE_integer("num_pages", None, "KV pages per data shard (default: a full batch of "
                     "the longest requests).", lower_bound=1)
    d.DEFINE_integer("max_seqs", 16, "Sequences in a batch.", lower_bound=1)
    d.DEFINE_integer("max_step_tokens", 256, "Tokens per step.", lower_bound=1)
    d.DEFINE_integer("max_model_len", None, "Prompt + output limit (default: the workload's).",
                     lower_bound=2)
    d.DEFINE_integer("decode_steps", 8, "Decode iterations per device call.", lower_bound=1)
    d.DEFINE_integer("min_token_bucket", None, "Smallest step-token bucket (default: "
                     "max_step_tokens, one bucket).", lower_bound=1)
    d.DEFINE_integer("min_seq_bucket", None, "Smallest batch bucket (default: max_seqs, "
                     "one bucket).", lower_bound=1)


def parse_layouts(text: str | None, num_devices: int) -> list:
    """`--layouts` (';'-separated) or every factorisation of the devices."""
    from meshserve.meshes import enumerate_layouts, parse_layout

    if not text or not text.strip():
        return enumerate_layouts(num_devices)
    layouts = [parse_layout(t) for t in text.split(";") if t.strip()]
    if not layouts:
        raise ValueError(f"--layouts {text!r} names no layout")
    return list(dict.fromkeys(layouts))


def _finite(x):
    """JSON has no NaN/Infinity: NaN (no data) becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def bench(ckpt: str, layouts: list, workload, slo: dict[str, float], base_cfg, dtype,
          capacity: int | None = None, plan_only: bool = False,
          log: Callable[[str], None] = print) -> dict:
    """Plan every layout, measure those that fit, choose the best; the results.json dict.

    `workload` is a bench_mesh_run.Workload, `base_cfg` an engine.engine.EngineConfig
    (num_pages and max_model_len None: sized from the workload).
    """
    import jax

    from meshserve.models.checkpoint import checkpoint_config, read_manifest
    from meshserve.tools.bench_mesh_report import choose_best
    from meshserve.tools.bench_mesh_run import engine_config_for, plan_layout, run_layout

    cfg = checkpoint_config(ckpt)
    engine_cfg = engine_config_for(workload, base_cfg, cfg.max_position_embeddings)
    devices = len(jax.local_devices())
    rows = [plan_layout(cfg, layout, dtype, engine_cfg, capacity, devices)
            for layout in layouts]
    fitting = [(layout, row) for layout, row in zip(layouts, rows, strict=True) if row["fits"]]
    log(f"{len(layouts)} layouts over {devices} devices: {len(fitting)} fit, "
        f"{len(layouts) - len(fitting)} refused")
    for i, (layout, row) in enumerate(fitting if not plan_only else []):
        log(f"[{i + 1}/{len(fitting)}] {row['layout']}")
        try:
            row.update(run_layout(ckpt, cfg, layout, dtype, engine_cfg, workload, slo, log))
        except Exception as e:  # noqa: BLE001 - one broken layout must not end the sweep
            row["error"] = f"{type(e).__name__}: {e}"
            log(f"  failed: {row['error']}")
            continue
        log(f"  TTFT p50 {row['ttft_ms_p50']:.1f} ms, TPOT p50 {row['tpot_ms_p50']:.1f} ms, "
            f"{row['output_tokens_per_s']:.1f} tok/s, collectives/step "
            f"{sum(row['collectives_per_step'].values())}, compiles during run "
            f"{row['compiles_during_run']}")
    best, message = choose_best(rows, slo, workload.num_requests)
    if plan_only:
        best, message = None, "--plan-only: nothing was measured"
    manifest = read_manifest(ckpt)
    name = manifest.get("label") or os.path.basename(
        os.path.normpath(manifest.get("source") or ckpt))
    platform = jax.default_backend()
    results = {
        "best": best, "best_message": message, "slo": slo,
        "model": {"name": name, "family": cfg.family, "num_layers": cfg.num_layers,
                  "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
                  "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                  "parameters": cfg.num_parameters(), "dtype": str(dtype),
                  "num_experts": cfg.num_experts, "experts_per_token": cfg.experts_per_token,
                  "moe_layers": len(cfg.moe_layers)},
        "devices": devices, "platform": platform,
        "device_kind": jax.local_devices()[0].device_kind,
        "workload": {**dataclasses.asdict(workload),
                     "request_rate": "inf" if math.isinf(workload.request_rate)
                     else workload.request_rate},
        "engine": dataclasses.asdict(engine_cfg),
        "layouts": rows,
    }
    if platform == "cpu":
        results["note"] = (f"{devices} simulated CPU devices share this host's "
                           f"{os.cpu_count()} cores: layouts are compared on this host, "
                           "not as they would run on accelerators")
    return _finite(results)


def main(argv: list[str]) -> int:
    del argv
    import jax
    import jax.numpy as jnp

    from meshserve.engine.engine import EngineConfig
    from meshserve.meshes import default_compute_dtype
    from meshserve.tools.bench_mesh_report import format_table, write_outputs
    from meshserve.tools.bench_mesh_run import Workload
    from meshserve.tools.bench_serving import parse_slo

    f = flags.FLAGS
    if f.request_rate <= 0 or f.burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    if f.mesh and f.layouts:
        raise ValueError("give --layouts (several) or --mesh (one), not both")
    layouts = parse_layouts(f.layouts or f.mesh, len(jax.local_devices()))
    workload = Workload(
        num_requests=f.num_requests, request_rate=f.request_rate,
        max_concurrency=f.max_concurrency, input_len=f.input_len, output_len=f.output_len,
        range_ratio=f.range_ratio, burstiness=f.burstiness, seed=f.seed,
        max_duration=f.max_duration, long_prompt_len=f.long_prompt_len)
    base = EngineConfig(
        page_size=f.page_size, num_pages=f.num_pages, max_seqs=f.max_seqs,
        max_step_tokens=f.max_step_tokens, max_model_len=f.max_model_len,
        decode_steps=f.decode_steps, max_kv_memory_bytes=None,
        device_memory_bytes=capacity_bytes(),
        min_token_bucket=f.min_token_bucket or f.max_step_tokens,
        min_seq_bucket=f.min_seq_bucket or f.max_seqs,
        max_waiting_requests=max(1024, f.num_requests),
        max_waiting_tokens=max(1 << 20, workload.num_requests * workload.max_total_len()))
    dtype = jnp.dtype(f.dtype or default_compute_dtype())
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    with checkpoint_dir() as ckpt:
        results = bench(ckpt, layouts, workload, parse_slo(f.slo), base, dtype,
                        capacity_bytes(), f.plan_only, log)
    args = sys.argv[1:]
    args = args[1:] if args[:1] == ["bench-mesh"] else args  # `meshserve bench-mesh ...`
    results["command"] = "meshserve bench-mesh " + " ".join(args)
    print(format_table(results))
    if f.out:
        problems = write_outputs(results, f.out)
        print(f"wrote results.json, results.csv and tensorboard/ to {f.out}")
        print("\n".join(problems) or f"plot: {os.path.join(f.out, 'goodput.png')}")
    measured = any(r.get("completed") is not None for r in results["layouts"])
    return 0 if measured or f.plan_only else 1


if __name__ == "__main__":
    from meshserve.tools.cli import main as cli_main

    cli_main([sys.argv[0], "bench-mesh", *sys.argv[1:]])
