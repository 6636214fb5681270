"""Engine throughput against transformers and against this machine's roofline.

    python -m meshserve.tools.bench_engine --out bench/engine.json          # the full run (~15 min)
    python -m meshserve.tools.bench_engine --quick                          # a smoke run (~1 min)
    python -m meshserve.tools.bench_engine --model mixtral-small --batches 1,8 --contexts 128

Decode of a mixture-of-experts model (--model mixtral-small) is judged against the
roofline of its *active* parameters: the experts a step selects (k per token at batch 1;
at batch b the expected distinct experts under uniform routing, E(1 - (1 - k/E)^b)).

Decode tokens/s at several batch sizes and contexts, prefill tokens/s, the same for
transformers `generate` on the same random weights (decode step isolated as
(time for 65 new tokens - time for 1) / 64), and each figure as a fraction of the
roofline measured in the same round: per decode step max(bytes / bandwidth, FLOPs / rate).
A roofline is measured (best of several runs) just before each engine step of --rounds
decode windows, and each step is judged against its own: this shared machine's bandwidth
flips between ~30 and ~55 GB/s within seconds. Reported: the median step tokens/s, the
median roofline, and the median of the per-step fractions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

from meshserve.engine.engine import Engine, EngineConfig
from meshserve.engine.sampling_params import SamplingParams
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.config import ModelConfig
from meshserve.models.loading import load_checkpoint
from meshserve.tools import roofline
from meshserve.tools.reports import write_json

LLAMA_125M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                  num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  max_position_embeddings=2048)
QUICK_ROOFLINE = dict(gemv_bytes=64 << 20, matmul_n=1024, repeats=2)
# 8 experts, top 2: all experts 4x the active ones, so a dense-over-all-experts
# implementation gets about k/E of the active-parameter roofline.
MIXTRAL_SMALL = dict(architecture="MixtralForCausalLM", vocab_size=32000, hidden_size=768,
                     intermediate_size=1024, num_hidden_layers=4, num_attention_heads=12,
                     num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                     max_position_embeddings=2048, sliding_window=None)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def step_cost(cfg: ModelConfig, batch: int, context: int) -> tuple[float, float]:
    """Bytes read/written and FLOPs of one decode step of `batch` tokens at `context`."""
    e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # Every projection and the LM head: all parameters but the embedding and the norms,
    # with only the experts the step reads. A tied embedding is the LM head: it stays.
    embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * e
    matmul_params = cfg.num_parameters(active=True) - embedding
    matmul_params -= (2 * cfg.num_layers + 1) * e
    per_token = matmul_params
    if cfg.moe_layers:
        n, top = cfg.num_experts, cfg.experts_per_token
        read = n * (1 - (1 - top / n) ** batch)  # expected distinct experts per layer
        expert = 3 * e * cfg.moe_intermediate_size * len(cfg.moe_layers)
        matmul_params += int((read - top) * expert)
    kv_token = cfg.num_layers * 2 * k * d * 4
    bytes_moved = 4 * matmul_params + batch * (context * kv_token + kv_token + 4 * e)
    flops = 2 * batch * per_token + 4 * batch * context * cfg.num_layers * h * d
    return float(bytes_moved), float(flops)


def save_random_llama(spec: dict, out: str):
    """A random-weight transformers Llama of `spec`, saved to `out`; returns `out`."""
    random_llama(spec).save_pretrained(out)
    return out


def random_llama(spec: dict):
    """A random transformers model of `spec` (Llama unless spec names an architecture)."""
    import torch
    import transformers

    torch.manual_seed(0)
    spec = dict(spec)
    arch = spec.pop("architecture", "LlamaForCausalLM")
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    hf = getattr(transformers, arch)(config_cls(**spec)).eval()
    hf.generation_config.eos_token_id = None
    return hf


def make_models(spec: dict, workdir: str):
    hf = random_llama(spec)
    hf_dir = os.path.join(workdir, "hf")
    hf.save_pretrained(hf_dir)
    from meshserve.tools.convert import convert

    convert(hf_dir, os.path.join(workdir, "ckpt"), progress=False)
    return hf, os.path.join(workdir, "ckpt")


def ours_decode(engine: Engine, batch: int, context: int, new_tokens: int, rounds: int,
                rng, before_step: Callable[[], None]) -> list[float]:
    """Decode tokens/s of each engine step in `rounds` steady-state windows in which all
    `batch` sequences decode. `before_step` runs before each step, untimed: the roofline
    is taken between the steps it judges (engine steps are synchronous, so nothing of
    ours runs meanwhile).

    Sequences admitted first already decode while later ones prefill, so each gets room
    for those tokens plus the windows; nobody finishes inside a window (no bucket
    change), and the rest is aborted afterwards.
    """
    cfg = engine.config
    prefill_steps = -(-batch * context // cfg.max_step_tokens) + 2
    params = SamplingParams(max_tokens=rounds * new_tokens + prefill_steps + cfg.decode_steps,
                            ignore_eos=True)
    handles = [engine.add_request(rng.integers(3, engine.vocab_size, context).tolist(), params)
               for _ in range(batch)]
    engine.precompile(decode=True, seqs=batch)
    running = lambda: [s for r in engine.scheduler.running for s in r]  # noqa: E731
    produced = lambda: sum(len(s.output_ids) for s in running())  # noqa: E731
    engine.step()  # takes the new requests in
    while engine.scheduler.waiting or not all(s.is_decoding for s in running()):
        engine.step()
    rates = []
    for _ in range(rounds * -(-new_tokens // cfg.decode_steps)):
        before_step()
        before, start = produced(), time.perf_counter()
        engine.step()
        rates.append((produced() - before) / (time.perf_counter() - start))
        assert len(running()) == batch, "a sequence finished inside the window"
    for h in handles:
        engine.abort(h.request_id)
    while engine.step():
        pass
    return rates


def ours_prefill(engine: Engine, length: int, rng) -> float:
    warm, prompt = (rng.integers(3, engine.vocab_size, length).tolist() for _ in range(2))
    engine.generate([warm], SamplingParams(max_tokens=1))  # compile these shapes
    start = time.perf_counter()
    # Another prompt of the same length: the same shapes, nothing in the prefix cache.
    engine.generate([prompt], SamplingParams(max_tokens=1))
    return length / (time.perf_counter() - start)


def hf_decode(hf, batch: int, context: int, new_tokens: int, rng) -> float:
    import torch

    ids = torch.tensor(rng.integers(3, hf.config.vocab_size, (batch, context)))

    def run(n):
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0)
        return time.perf_counter() - start

    run(2)  # warm-up
    step = (run(new_tokens + 1) - run(1)) / new_tokens
    return batch / step


def hf_prefill(hf, length: int, rng) -> float:
    import torch

    ids = torch.tensor(rng.integers(3, hf.config.vocab_size, (1, length)))
    with torch.no_grad():
        hf(ids)
        start = time.perf_counter()
        hf(ids)
    return length / (time.perf_counter() - start)


def engine_config(name: str, batches: list[int], contexts: list[int], args) -> EngineConfig:
    """`default`: what `meshserve serve` runs with no flags. `tuned`: one 512-token bucket,
    a tight page pool, `max_model_len` fitted to the benchmark, no overlap."""
    if name == "default":
        return EngineConfig()
    max_b, step_tokens = max(batches), max(512, max(batches))
    # Room for the tokens early sequences decode while later ones prefill (ours_decode).
    slack = -(-max_b * max(contexts) // step_tokens) + 2 + args.decode_steps
    max_ctx = max(contexts) + args.rounds * args.new_tokens + slack + 2
    return EngineConfig(
        num_pages=max_b * (-(-max_ctx // 16)) + 8, max_seqs=max_b,
        max_step_tokens=step_tokens, decode_steps=args.decode_steps,
        min_token_bucket=512, max_model_len=max(max_ctx, args.prefill_len + 2),
        overlap_decode=False)


def bench_config(name: str, model, hf, batches, contexts, args, probe, rng,
                 hf_rates: dict) -> list[dict]:
    engine = Engine(model, engine_config(name, batches, contexts, args))
    cfg, rounds, rows = model.config, args.rounds, []
    for context in contexts:
        for batch in batches:
            roofs: list[roofline.Roofline] = []
            if engine.overlap:
                # A chained decode call is in flight between steps: measure while idle.
                roofs.extend(probe.measure() for _ in range(rounds))
                before = lambda: None  # noqa: E731
            else:  # between the steps each roofline judges (synchronous steps)
                before = lambda roofs=roofs: roofs.append(probe.measure())  # noqa: E731
            steps = ours_decode(engine, batch, context, args.new_tokens, rounds, rng, before)
            if not args.skip_hf and (batch, context) not in hf_rates:
                hf_rates[batch, context] = hf_decode(hf, batch, context, args.new_tokens, rng)
            theirs = hf_rates.get((batch, context))
            bytes_moved, flops = step_cost(cfg, batch, context)
            ideals = [batch / r.step_time(bytes_moved, flops) for r in roofs]
            ideal, roof = statistics.median(ideals), median_roofline(roofs)
            if len(ideals) != len(steps):  # rooflines taken before the window
                ideals = [ideal] * len(steps)
            row = {"config": name, "kind": "decode", "batch": batch, "context": context,
                   "ours_tok_s": statistics.median(steps), "hf_tok_s": theirs,
                   "roofline_tok_s": ideal,
                   # Each step against the roofline measured just before it: the
                   # bandwidth flips between two levels, so a ratio of medians would
                   # pair a fast-phase roofline with a slow-phase step.
                   "ours_of_roofline": statistics.median(
                       x / i for x, i in zip(steps, ideals, strict=True)),
                   "hf_of_roofline": None if theirs is None else theirs / ideal,
                   "bound": "memory" if bytes_moved / roof.bandwidth > flops / roof.flops
                   else "compute",
                   **roof_fields(roof, roofs), "steps_tok_s": steps}
            rows.append(row)
            print(json.dumps(row), flush=True)
    roofs = [probe.measure() for _ in range(rounds)]
    roof = median_roofline(roofs)
    ours = ours_prefill(engine, args.prefill_len, rng)
    if not args.skip_hf and "prefill" not in hf_rates:
        hf_rates["prefill"] = hf_prefill(hf, args.prefill_len, rng)
    theirs = hf_rates.get("prefill")
    flops = 2 * args.prefill_len * (cfg.num_parameters(active=True)
                                    - cfg.vocab_size * cfg.hidden_size)
    ideal = args.prefill_len / (flops / roof.flops)
    rows.append({"config": name, "kind": "prefill", "batch": 1, "context": args.prefill_len,
                 "ours_tok_s": ours, "hf_tok_s": theirs, "roofline_tok_s": ideal,
                 "ours_of_roofline": ours / ideal,
                 "ours_of_hf": None if theirs is None else ours / theirs,
                 **roof_fields(roof, roofs)})
    engine.shutdown()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few configs")
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="random model to run (default llama-125m; tiny with --quick)")
    p.add_argument("--configs", default="default",
                   help="engine configurations, comma-separated: default (the server's, "
                   "no flags) and/or tuned (this benchmark's own)")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--contexts", default="128,1024")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps of `tuned`")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed windows per decode figure (a roofline before each step)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out", default=None, help="write results as JSON here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    spec = MODELS[args.model or ("tiny" if args.quick else "llama-125m")]
    batches = [1, 8] if args.quick else [int(x) for x in args.batches.split(",")]
    contexts = [64] if args.quick else [int(x) for x in args.contexts.split(",")]
    if args.quick:
        args.rounds = 1
    rng = np.random.default_rng(0)
    results = {"machine": f"{os.cpu_count()} CPU cores", "config": spec, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        hf, ckpt = make_models(spec, tmp)
        model = load_checkpoint(ckpt, make_mesh(parse_layout("")))
        # The machine's bandwidth moves by up to 2x within seconds, so each figure gets its
        # own roofline, measured between the engine steps it judges.
        probe = roofline.Probe(**(QUICK_ROOFLINE if args.quick else {}))
        hf_rates: dict = {}
        for name in args.configs.split(","):
            results["rows"] += bench_config(name, model, hf, batches, contexts, args, probe,
                                            rng, hf_rates)
    print_table(results)
    if args.out:
        write_json(args.out, results)


MODELS = {"llama-125m": LLAMA_125M, "tiny": TINY, "mixtral-small": MIXTRAL_SMALL}


def median_roofline(measured: list[roofline.Roofline]) -> roofline.Roofline:
    return roofline.Roofline(bandwidth=statistics.median(r.bandwidth for r in measured),
                             flops=statistics.median(r.flops for r in measured))


def roof_fields(roof: roofline.Roofline, measured: list[roofline.Roofline]) -> dict:
    return {"bandwidth_GBps": roof.bandwidth / 1e9, "matmul_GFLOPs": roof.flops / 1e9,
            "bandwidths_GBps": [r.bandwidth / 1e9 for r in measured],
            "matmuls_GFLOPs": [r.flops / 1e9 for r in measured]}


def print_table(results: dict) -> None:
    head = ("config", "kind", "batch", "ctx", "ours tok/s", "HF tok/s", "roofline", "GB/s",
            "GFLOP/s", "ours/roof", "HF/roof")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    fmt = lambda x, p=1: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    for r in results["rows"]:
        hf_roof = r.get("hf_of_roofline")
        if r["kind"] == "prefill":
            hf_roof = None
        print(f"| {r['config']} | {r['kind']} | {r['batch']} | {r['context']} | "
              f"{fmt(r['ours_tok_s'])} | "
              f"{fmt(r['hf_tok_s'])} | {fmt(r['roofline_tok_s'])} | "
              f"{fmt(r['bandwidth_GBps'])} | {fmt(r['matmul_GFLOPs'], 0)} | "
              f"{fmt(r['ours_of_roofline'] * 100, 0)}% | "
              f"{'-' if hf_roof is None else fmt(hf_roof * 100, 0) + '%'} |")
    for r in results["rows"]:
        if r["kind"] == "prefill" and r.get("ours_of_hf"):
            print(f"prefill ({r['config']}): ours / transformers = "
                  f"{r['ours_of_hf'] * 100:.0f}%")


if __name__ == "__main__":
    main()
