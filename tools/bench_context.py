"""Context parallelism on long prompts: TTFT, per-device KV and communication per
`sequence` layout, one long prompt at a time, on a random-weight model.

    python -m meshserve.tools.bench_context --cpu_devices 8 --lengths 1024,4096,8192 \\
        --layouts 'sequence=1;sequence=2;sequence=4' --out docs/bench/context_cpu.json

Per layout and prompt length: TTFT (the prompt prefilled in `--chunk`-token steps, one
token sampled; best of `--repeats`, engine warmed up), the KV the prompt occupies on the
busiest device (written page rows counted shard by shard) and what the memory planner
gives per device for one sequence of that length, and the collectives of the compiled
programs: per prefill token (the mixed step at the chunk bucket, ÷ chunk) and per
decode step (one decode-loop iteration), bytes per device as in bench-mesh. On simulated
CPU devices all of them share the host's cores: the timings show the communication and
scheduling cost of a layout, not its speed-up on accelerators.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

from absl import app, flags

flags.DEFINE_string("layouts", "sequence=1;sequence=2;sequence=4", "';'-separated layouts.")
flags.DEFINE_string("lengths", "1024,4096,8192", "Prompt lengths (tokens).")
flags.DEFINE_integer("chunk", 512, "Prefill chunk (tokens per step).", lower_bound=16)
flags.DEFINE_integer("page_size", 16, "Tokens per KV page.", lower_bound=1)
flags.DEFINE_integer("repeats", 2, "TTFT runs per length (the best is reported).",
                     lower_bound=1)
flags.DEFINE_integer("cpu_devices", 8, "Simulated CPU devices (0: the real devices).",
                     lower_bound=0)
flags.DEFINE_integer("hidden_size", 128, "Model width.", lower_bound=8)
flags.DEFINE_integer("num_layers", 2, "Decoder layers.", lower_bound=1)
flags.DEFINE_integer("num_heads", 4, "Query heads.", lower_bound=1)
flags.DEFINE_integer("num_kv_heads", 2, "KV heads.", lower_bound=1)
flags.DEFINE_integer("head_dim", 32, "Head dimension.", lower_bound=1)
flags.DEFINE_string("out", None, "Write the results as JSON here.")


def _model_config(max_len: int):
    from meshserve.models.config import ModelConfig

    f = flags.FLAGS
    return ModelConfig(
        family="llama", architecture="LlamaForCausalLM", vocab_size=1024,
        hidden_size=f.hidden_size, intermediate_size=4 * f.hidden_size,
        num_layers=f.num_layers, num_heads=f.num_heads, num_kv_heads=f.num_kv_heads,
        head_dim=f.head_dim, rms_norm_eps=1e-5, max_position_embeddings=max_len,
        bos_token_id=1, eos_token_ids=(2,))


def _written_pages(layer) -> list[int]:
    """Page rows holding any K/V, per device shard of one layer's cache."""
    import numpy as np

    shards = sorted(layer.addressable_shards, key=lambda s: s.index[0].start or 0)
    return [int(np.count_nonzero(np.abs(np.asarray(s.data)).sum(axis=(1, 2, 3))))
            for s in shards]


def _collectives(engine, decode: bool, tokens: int, seqs: int) -> tuple[dict, dict]:
    from meshserve.engine.batching import build_inputs
    from meshserve.engine.scheduler import StepPlan
    from meshserve.tools.bench_mesh_hlo import decode_collectives, program_collectives

    plan = StepPlan(decode=decode, shards=[[] for _ in range(engine.data_shards)])
    inputs = engine._put(build_inputs(plan, engine.config, engine.pages_per_seq, 0, tokens,
                                      seqs))
    hlo = engine._fns.lower(engine._kv, engine._counts, engine._seen, inputs,
                            decode).compile().as_text()
    axes = dict(engine.model.rules.mesh.shape)
    if decode:
        c = decode_collectives(hlo, axes)
        return c.per_step, c.bytes_per_step
    return program_collectives(hlo, axes)


def bench_layout(text: str, lengths: list[int], log=print) -> list[dict]:
    import jax.numpy as jnp
    import numpy as np

    from meshserve.engine.config import EngineConfig
    from meshserve.engine.engine import Engine
    from meshserve.engine.kv_pool import plan_num_pages
    from meshserve.engine.sampling_params import SamplingParams
    from meshserve.meshes import make_mesh, parse_layout
    from meshserve.models.loading import init_random

    f = flags.FLAGS
    layout = parse_layout("" if text == "sequence=1" else text)
    ways = layout.sequence
    max_len = max(lengths) + 8
    pages = math.ceil(max_len / f.page_size)
    cfg = EngineConfig(page_size=f.page_size, num_pages=math.ceil(pages / ways) * ways,
                       max_seqs=1, max_step_tokens=f.chunk, min_token_bucket=f.chunk,
                       min_seq_bucket=1, decode_steps=8, max_logprobs=1,
                       max_model_len=max_len, prefix_caching=False)
    model = init_random(_model_config(max_len), make_mesh(layout), jnp.float32, seed=0)
    engine = Engine(model, cfg, attention_impl="reference")
    t0 = time.perf_counter()
    engine.warmup()
    engine.warmup()  # the steady-state cache shardings (see bench-mesh's build_engines)
    log(f"{text}: warmed up in {time.perf_counter() - t0:.1f}s")
    prefill = _collectives(engine, False, f.chunk, 1)
    decode = _collectives(engine, True, 8, 1)
    rows = []
    rng = np.random.default_rng(0)
    for n in sorted(lengths):
        prompt = rng.integers(3, 1024, n).tolist()
        best = math.inf
        for _ in range(f.repeats):
            start = time.perf_counter()
            engine.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
            best = min(best, time.perf_counter() - start)
        # Page ids go lowest free first, so the rows written now are this prompt's pages.
        written = _written_pages(engine._kv[0])
        planned = plan_num_pages(model, dataclasses.replace(
            cfg, num_pages=None, device_memory_bytes=1 << 40), n + 1)
        page_bytes = planned.page_bytes
        row = {
            "layout": text, "sequence": ways, "prompt_tokens": n, "ttft_ms": 1e3 * best,
            "kv_bytes_busiest_device": max(written) * page_bytes,
            "kv_pages_per_device": written,
            "planner_kv_bytes_per_device": planned.bytes_per_device,
            "prefill_collectives_per_chunk": prefill[0],
            "prefill_collective_bytes_per_token": {
                k: v / f.chunk for k, v in prefill[1].items()},
            "decode_collectives_per_step": decode[0],
            "decode_collective_bytes_per_step": decode[1],
        }
        log(f"  {n} tokens: TTFT {row['ttft_ms']:.0f} ms, KV busiest device "
            f"{row['kv_bytes_busiest_device'] / 2**20:.2f} MiB {written}")
        rows.append(row)
    engine.shutdown()
    return rows


def format_table(rows: list[dict]) -> str:
    base = {r["prompt_tokens"]: r for r in rows if r["sequence"] == 1}
    out = ["| prompt | layout | TTFT ms | TTFT / seq=1 | KV MiB busiest device | "
           "KV / seq=1 | prefill coll./chunk | prefill B/token | decode coll./step | "
           "decode B/step |", "|" + "---|" * 10]
    for r in sorted(rows, key=lambda r: (r["prompt_tokens"], r["sequence"])):
        one = base.get(r["prompt_tokens"])

        def ratio(k: str, r: dict = r, one: dict | None = one) -> str:
            return f"{r[k] / one[k]:.2f}" if one and one[k] else "-"

        out.append(
            f"| {r['prompt_tokens']} | {r['layout']} | {r['ttft_ms']:.0f} | "
            f"{ratio('ttft_ms')} | {r['kv_bytes_busiest_device'] / 2**20:.2f} | "
            f"{ratio('kv_bytes_busiest_device')} | "
            f"{sum(r['prefill_collectives_per_chunk'].values())} | "
            f"{sum(r['prefill_collective_bytes_per_token'].values()):.0f} | "
            f"{sum(r['decode_collectives_per_step'].values())} | "
            f"{sum(r['decode_collective_bytes_per_step'].values())} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    del argv
    f = flags.FLAGS
    import jax

    if f.cpu_devices:
        jax.config.update("jax_num_cpu_devices", f.cpu_devices)

    lengths = [int(x) for x in f.lengths.split(",") if x.strip()]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for text in [t.strip() for t in f.layouts.split(";") if t.strip()]:
        rows += bench_layout(text, lengths, log)
    print(format_table(rows))
    results = {"rows": rows, "platform": jax.default_backend(),
               "devices": len(jax.devices()), "host_cores": os.cpu_count(),
               "command": "python -m meshserve.tools.bench_context " + " ".join(sys.argv[1:]),
               "model": dataclasses.asdict(_model_config(max(lengths) + 8))}
    if results["platform"] == "cpu":
        results["note"] = ("simulated CPU devices share the host's cores: TTFT shows the "
                           "communication and scheduling cost of a layout, not its speed-up")
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}))
    if f.out:
        with open(f.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    app.run(main)
