"""Compile time of one decode program against depth, unrolled vs scanned layers.

    python -m meshserve.tools.bench_compile_depth --out docs/bench/compile_depth_cpu.json
    python -m meshserve.tools.bench_compile_depth --layers 2 --pages 32     # a smoke run

For each depth, a random 768-wide Llama (the 125M shape) on one device, built twice:
layers unrolled (the default) and under a scan (`EngineConfig(scan_layers=True)`), both
with plain XLA matmuls (packing would turn the scan off). Reported per case: trace +
lower and compile CPU seconds of the decode program (8 rows, no compilation cache), and
the compile's wall time (CPU time is steadier on a shared machine); whether
the KV cache is updated in place (no whole-cache op in the HLO but views, loops and
in-place updates; the cache parameters aliased to outputs); XLA's temp bytes against
the cache's; and the measured time per decode token of 4 greedy requests.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from meshserve.engine.batching import build_inputs
from meshserve.engine.config import EngineConfig
from meshserve.engine.engine import Engine
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.scheduler import StepPlan
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.config import config_from_hf
from meshserve.models.loading import init_random
from meshserve.tools.bench_engine import LLAMA_125M
from meshserve.tools.bench_mesh_hlo import HloModule
from meshserve.tools.reports import write_json

IN_PLACE = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "call",
            "dynamic-update-slice", "scatter"}


def _whole_cache_ops(hlo: str, shape: tuple[int, ...]) -> dict[str, int]:
    spelled = f"f32[{','.join(map(str, shape))}]"
    module, ops = HloModule.parse(hlo), {}
    for insts in module.computations.values():
        for inst in insts:
            if inst.type_text.split("{")[0] != spelled:
                continue
            op = inst.opcode
            if op == "fusion":
                fused = [c for attr, c in inst.called() if attr == "calls"]
                op = f"fusion:{module.computations[fused[0]][-1].opcode if fused else '?'}"
            ops[op] = ops.get(op, 0) + 1
    return ops


def measure(layers: int, scan: bool, pages: int, tokens: int) -> dict:
    spec = dict(LLAMA_125M, num_hidden_layers=layers, architectures=["LlamaForCausalLM"],
                model_type="llama", rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, head_dim=64)
    cfg = config_from_hf(spec)
    model = init_random(cfg, make_mesh(parse_layout("")))
    config = EngineConfig(num_pages=pages, max_seqs=8, max_step_tokens=64, decode_steps=8,
                          max_logprobs=0, min_token_bucket=64, min_seq_bucket=8,
                          pack_weights=False, scan_layers=scan, max_model_len=512)
    engine = Engine(model, config)
    del model
    plan = StepPlan(decode=True, shards=[[]])
    inputs = build_inputs(plan, engine.config, engine.pages_per_seq, 0, 8, 8)
    t0 = time.process_time()
    lowered = engine._fns.lower(engine._kv, engine._counts, engine._seen, inputs, True)
    lower_cpu = time.process_time() - t0
    # Once: a second compile of the same program is served from memory.
    w, c = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_wall, compile_cpu = time.perf_counter() - w, time.process_time() - c
    hlo = compiled.as_text()
    kv_shape = tuple(engine._kv[0].shape)
    ops = _whole_cache_ops(hlo, kv_shape)
    allowed = IN_PLACE | {f"fusion:{op}" for op in IN_PLACE}
    mem = compiled.memory_analysis()
    cache_bytes = sum(a.nbytes for a in engine._kv)
    header = next(line for line in hlo.splitlines() if line.startswith("HloModule"))
    # timing: short vs long generations, the difference is decode only
    prompts = [[3 + i, 17, 5, 9] for i in range(4)]
    engine.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))  # compiles
    walls = []
    for n in (8, 8 + tokens):
        t = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
        walls.append(time.perf_counter() - t)
    engine.shutdown()
    return {
        "layers": layers, "mode": "scan" if engine.scanned else "unrolled",
        "lower_cpu_s": round(lower_cpu, 3), "compile_cpu_s": round(compile_cpu, 3),
        "compile_wall_s": round(compile_wall, 3),
        "cache_ops": ops, "in_place": set(ops) <= allowed and "alias" in header,
        "cache_mib": round(cache_bytes / 2**20, 1),
        "temp_mib": round(mem.temp_size_in_bytes / 2**20, 1) if mem else None,
        "ms_per_token": round(1000 * (walls[1] - walls[0]) / tokens, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 12, 30])
    ap.add_argument("--pages", type=int, default=256, help="KV pages (16 tokens each)")
    ap.add_argument("--tokens", type=int, default=24, help="decode tokens timed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    # The process's first compile pays for setting XLA up: not any case's cost.
    measure(2, False, 16, 1)
    rows = [measure(n, scan, args.pages, args.tokens)
            for n in args.layers for scan in (False, True)]
    print("| layers | mode | lower CPU s | compile CPU s | compile wall s | KV in place |"
          " cache MiB | temp MiB | ms/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['mode']} | {r['lower_cpu_s']} | {r['compile_cpu_s']} | "
              f"{r['compile_wall_s']} | "
              f"{r['in_place']} | {r['cache_mib']} | {r['temp_mib']} | {r['ms_per_token']} |")
    result = {"machine": f"{jax.devices()[0].platform} x{jax.device_count()}",
              "args": vars(args), "rows": rows}
    print(json.dumps(result))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
