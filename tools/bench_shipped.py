"""Serving speed as shipped: `meshserve serve` with its defaults, against transformers,
the engine alone and the memory roofline, in one run.

    python -m meshserve.tools.bench_shipped --out docs/bench/shipped_cpu.json   # 125M, 3 rounds
    python -m meshserve.tools.bench_shipped --quick                             # a smoke run

1. The engine alone, in this process, with the server's default `EngineConfig`: the
   prefill time of one prompt of --input-len tokens (bench_engine's prefill figure).
2. A real `meshserve serve --hf DIR` with no other flag, in a subprocess. Each round:
   the memory roofline, then one request alone (time to first token, time per output
   token), then --streams concurrent requests (bench-serving's load generator; outputs
   forced to --output-len tokens).
3. transformers' static-batch `generate` of the same work (--streams prompts of the same
   length, --output-len greedy tokens each, on the same weights) in this process while
   the server idles.

Reported: medians over --rounds, and the three ratios issue 26 sets targets for.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import shlex
import statistics
import tempfile
import time

import numpy as np

from meshserve.tools import roofline
from meshserve.tools.bench_engine import (
    LLAMA_125M,
    QUICK_ROOFLINE,
    TINY,
    ours_prefill,
    save_random_llama,
    step_cost,
)
from meshserve.tools.reports import write_json

TARGETS = {"streams_vs_hf": 1.5, "ttft_of_prefill": 1.5, "decode_of_roofline": 0.8}


def engine_prefill_s(hf_dir: str, workdir: str, length: int, rounds: int, rng) -> list[float]:
    """Seconds to prefill one `length`-token prompt on an engine built as the server builds
    it (default EngineConfig, the server's default dtype)."""
    from meshserve.engine.engine import Engine, EngineConfig
    from meshserve.meshes import default_compute_dtype, make_mesh, parse_layout
    from meshserve.models.loading import load_checkpoint
    from meshserve.tools.convert import convert

    ckpt = os.path.join(workdir, "ckpt")
    convert(hf_dir, ckpt, progress=False)
    model = load_checkpoint(ckpt, make_mesh(parse_layout("")), default_compute_dtype())
    engine = Engine(model, EngineConfig())
    times = [length / ours_prefill(engine, length, rng) for _ in range(rounds)]
    engine.shutdown()
    del engine, model
    gc.collect()
    return times


def hf_static_batch_s(hf_dir: str, streams: int, input_len: int, output_len: int, rng) -> float:
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor(rng.integers(3, hf.config.vocab_size, (streams, input_len)))
    with torch.no_grad():
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                    pad_token_id=0, eos_token_id=None)
        return time.perf_counter() - start


def streams_flops(cfg, streams: int, input_len: int, output_len: int) -> float:
    """FLOPs of the streams' work: each prompt's prefill (LM head on its last token only),
    then output_len - 1 decode steps, attention over the growing context included."""
    lm_head = 2 * cfg.vocab_size * cfg.hidden_size
    token = step_cost(cfg, 1, 0)[1]  # every projection and the LM head, no attention
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # per token and context
    prefill = input_len * (token - lm_head) + lm_head
    prefill += attention * input_len * (input_len + 1) / 2
    decode = sum(token + attention * (input_len + i) for i in range(1, output_len))
    return float(streams * (prefill + decode))


def serve_round(target: str, streams: int, input_len: int, output_len: int, seed: int) -> dict:
    from meshserve.tools.bench_serving import run

    alone = asyncio.run(run(target, 1, float("inf"), 1.0, None, input_len, output_len, 0.0, {},
                            seed=seed))
    many = asyncio.run(run(target, streams, float("inf"), 1.0, None, input_len, output_len,
                           0.0, {}, seed=seed + 1))
    if alone["failed"] or many["failed"]:
        raise RuntimeError(f"requests failed: {alone['errors']} {many['errors']}")
    return {"ttft_s": alone["ttft_ms"]["p50"] / 1e3, "tpot_s": alone["tpot_ms"]["p50"] / 1e3,
            "streams_s": many["duration_s"], "streams_ttft_p50_s": many["ttft_ms"]["p50"] / 1e3,
            "streams_tpot_p50_s": many["tpot_ms"]["p50"] / 1e3}


def main() -> None:
    from meshserve.models.config import load_hf_config
    from meshserve.tools.server_process import ServeProcess

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", default=None, help="model directory (default: a random 125M Llama)")
    p.add_argument("--quick", action="store_true", help="tiny random model, one round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for ready")
    p.add_argument("--serve-flags", default="",
                   help="extra `meshserve serve` flags, to compare a setting (default: none)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rounds = 1 if a.quick else a.rounds
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-shipped-") as work:
        hf_dir = a.hf or save_random_llama(TINY if a.quick else LLAMA_125M, f"{work}/hf")
        cfg = load_hf_config(hf_dir)
        prefill = engine_prefill_s(hf_dir, work, a.input_len, rounds, rng)
        probe = roofline.Probe(**(QUICK_ROOFLINE if a.quick else {}))
        served, hf_times, roofs = [], [], []
        with ServeProcess("--hf", hf_dir, *shlex.split(a.serve_flags),
                          timeout=a.timeout) as server:
            for r in range(rounds):
                roofs.append(probe.measure())
                served.append(serve_round(server.target, a.streams, a.input_len, a.output_len,
                                          seed=2 * r))
                hf_times.append(hf_static_batch_s(hf_dir, a.streams, a.input_len, a.output_len,
                                                  rng))
                print(json.dumps({"round": r, **served[-1], "hf_static_batch_s": hf_times[-1],
                                  "bandwidth_GBps": roofs[-1].bandwidth / 1e9}), flush=True)
    # batch-1 decode moves the weights and the KV of its context once per token
    context = a.input_len + a.output_len // 2
    bytes_moved, flops = step_cost(cfg, 1, context)
    work = streams_flops(cfg, a.streams, a.input_len, a.output_len)
    med = statistics.median
    rows = [{"round": i, **s, "hf_static_batch_s": h, "engine_prefill_s": e,
             "decode_roofline_s": roof.step_time(bytes_moved, flops),
             "streams_compute_roofline_s": work / roof.flops,
             "matmul_GFLOPs": roof.flops / 1e9,
             "bandwidth_GBps": roof.bandwidth / 1e9}
            for i, (s, h, e, roof) in enumerate(zip(served, hf_times, prefill, roofs,
                                                     strict=True))]
    ratios = {
        "streams_vs_hf": med(r["hf_static_batch_s"] / r["streams_s"] for r in rows),
        "ttft_of_prefill": med(r["ttft_s"] / r["engine_prefill_s"] for r in rows),
        "decode_of_roofline": med(r["decode_roofline_s"] / r["tpot_s"] for r in rows),
    }
    met = {k: (v >= TARGETS[k]) if k != "ttft_of_prefill" else (v <= TARGETS[k])
           for k, v in ratios.items()}
    summary = {k: med(r[k] for r in rows) for k in rows[0] if k != "round"}
    print(f"| figure (median of {rounds}) | value |\n|---|---|")
    print(f"| {a.streams} streams over gRPC, s | {summary['streams_s']:.2f} |")
    print(f"| transformers static batch, s | {summary['hf_static_batch_s']:.2f} |")
    print(f"| one prompt: time to first token, ms | {summary['ttft_s'] * 1e3:.1f} |")
    print(f"| engine alone: prefill of {a.input_len} tokens, ms | "
          f"{summary['engine_prefill_s'] * 1e3:.1f} |")
    print(f"| one stream: time per output token, ms | {summary['tpot_s'] * 1e3:.2f} |")
    print(f"| memory roofline per token, ms | {summary['decode_roofline_s'] * 1e3:.2f} |")
    # Where the streams stand: their FLOPs at the best square matmul's rate of this run.
    print(f"| {a.streams} streams' work at the matmul peak "
          f"({summary['matmul_GFLOPs']:.0f} GFLOP/s), s | "
          f"{summary['streams_compute_roofline_s']:.2f} |")
    for who, key in (("meshserve", "streams_s"), ("transformers", "hf_static_batch_s")):
        share = med(r["streams_compute_roofline_s"] / r[key] for r in rows)
        print(f"| {who}: share of the matmul peak on the streams' work | {share:.0%} |")
    for k, v in ratios.items():
        sign = "<=" if k == "ttft_of_prefill" else ">="
        print(f"| {k} (target {sign} {TARGETS[k]}) | {v:.2f} {'met' if met[k] else 'MISSED'} |")
    if a.out:
        model = a.hf or ("random tiny Llama" if a.quick else "random 125M Llama")
        write_json(a.out, {"machine": f"{os.cpu_count()} CPU cores", "model": model,
                           "model_config": dataclasses.asdict(cfg), "streams": a.streams,
                           "input_len": a.input_len, "output_len": a.output_len,
                           "rows": rows, "median": summary, "ratios": ratios,
                           "targets": TARGETS, "met": met})


if __name__ == "__main__":
    main()
