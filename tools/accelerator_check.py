"""One command for a machine with a GPU or TPU: are the kernels right, and how fast?

    python -m meshserve.tools.accelerator_check --out accel.json    # on the accelerator
    python -m meshserve.tools.accelerator_check --smoke             # CPU: the kernels in
                                                                    # the Pallas interpreter

1. Kernel vs the pure-JAX reference in float32 and bfloat16 on decode, prefill and mixed
   batches (NaN-poisoned padding): the largest error of each. Also the context-parallel
   path (page mask + log-sum-exp, pages split 2 ways): each part's output and lse against
   the reference's, and the merged parts against the whole attention.
2. Decode attention bandwidth: KV bytes the step must read ÷ its time, as a fraction of
   the device's HBM peak (a table of published figures) and of a device-to-device copy
   measured in the same run, at batch 8/64 × context 1k/8k. On the GPU kernel: the KV
   splits its rule picks (gpu_block_sizes) and its speed over the same step with one split.
3. The engine end to end in bfloat16 on a random 125M-class Llama: greedy tokens against
   transformers' (float32, same weights) — how many agree before the first difference,
   and the largest logit error of the prompt's last position.
4. Engine decode tokens/s at batch 1/8/64.

Prints a table and writes JSON. `--smoke` runs every part at toy sizes so the script
itself is tested on CPU; its timings mean nothing there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from meshserve.pallas_kernels.ragged_paged_attention import ragged_paged_attention
from meshserve.pallas_kernels.ragged_paged_attention.gpu_block_sizes import choose_gpu_blocks
from meshserve.pallas_kernels.ragged_paged_attention.reference import merge_partials
from meshserve.pallas_kernels.ragged_paged_attention.validation import random_ragged_batch
from meshserve.tools import reports

# Published HBM bandwidth per device (bytes/s), by a substring of jax's device_kind.
PEAK_HBM = {
    "H200": 4.8e12, "H100": 3.35e12, "H800": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12,
    "L4": 0.3e12, "B200": 8.0e12, "MI300": 5.3e12,
    "TPU v4": 1.2e12, "TPU v5 lite": 0.819e12, "TPU v5e": 0.819e12, "TPU v5p": 2.765e12,
    "TPU v6": 1.64e12, "TPU7x": 7.37e12,
}
# Llama-3-8B's attention heads: what the bandwidth rows are measured with.
HEADS = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)


@dataclasses.dataclass(frozen=True)
class Sizes:
    parity: dict  # heads for the parity cases
    decode_batches: tuple[int, ...]
    contexts: tuple[int, ...]
    model: dict  # the transformers LlamaConfig of part 3/4
    engine_batches: tuple[int, ...]
    new_tokens: int


FULL = Sizes(
    parity=HEADS, decode_batches=(8, 64), contexts=(1024, 8192),
    model=dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
               num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
               max_position_embeddings=2048, initializer_range=0.05),
    engine_batches=(1, 8, 64), new_tokens=32,
)
SMOKE = Sizes(
    parity=dict(num_q_heads=4, num_kv_heads=2, head_dim=128), decode_batches=(2,),
    contexts=(64,),
    model=dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               initializer_range=0.05),
    engine_batches=(1, 2), new_tokens=4,
)


def kernel_impl(smoke: bool) -> str:
    """The kernel this machine runs (its interpreted twin with --smoke on CPU)."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    if smoke:
        return "tpu-interpret"
    raise SystemExit("no GPU or TPU here: run with --smoke to exercise the script on CPU")


def peak_bandwidth() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_HBM.items() if k.lower() in kind.lower()), None)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes read + written per second by a device-to-device copy (what HBM sustains)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    jax.block_until_ready(copy(x))
    best = min(_timed(copy, x) for _ in range(repeats))
    return 2 * nbytes / best


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def parity_cases(heads: dict, smoke: bool) -> dict[str, list[tuple[int, int]]]:
    n = 64 if smoke else 1024
    return {
        "decode": [(1, n + 7 * i) for i in range(6)],
        "prefill": [(n // 2, n // 2), (n // 4 + 3, n // 4 + 3)],
        "mixed": [(n // 4, n // 2), (1, n), (17, 40), (1, 5), (n // 8, n // 8)],
    }


def kernel_parity(impl: str, sizes: Sizes, smoke: bool) -> list[dict]:
    rows = []
    for dtype, tolerance in ((jnp.float32, 2e-3), (jnp.bfloat16, 6e-2)):
        for name, seqs in parity_cases(sizes.parity, smoke).items():
            tokens = sum(q for q, _ in seqs)
            batch = random_ragged_batch(seqs, **sizes.parity, page_size=16,
                                        num_tokens=tokens + 5, max_seqs=len(seqs) + 2,
                                        dtype=dtype, seed=3)
            ref, ref_pages = jax.jit(lambda *a: ragged_paged_attention(*a, impl="reference"))(
                *batch.args())
            out, pages = jax.jit(lambda *a: ragged_paged_attention(*a, impl=impl))(*batch.args())
            valid = np.asarray(out[:tokens], np.float32)
            error = float(np.max(np.abs(valid - np.asarray(ref[:tokens], np.float32))))
            finite = bool(np.isfinite(valid).all())
            pages_equal = bool(np.array_equal(np.asarray(pages, np.float32),
                                              np.asarray(ref_pages, np.float32), equal_nan=True))
            rows.append({"dtype": jnp.dtype(dtype).name, "case": name, "max_abs_error": error,
                         "finite": finite, "kv_written_equal": pages_equal,
                         "ok": finite and pages_equal and error <= tolerance})
            print(f"  parity {rows[-1]['dtype']:8} {name:8} max err {error:.2e}", flush=True)
        rows.append(split_parity(impl, sizes, smoke, dtype, tolerance))
    return rows


def split_parity(impl: str, sizes: Sizes, smoke: bool, dtype, tolerance: float) -> dict:
    """The mixed batch with its pages split 2 ways (page p on part p % 2), as context
    parallelism runs it: the largest error of any part's output or lse, and of the merge."""
    seqs = parity_cases(sizes.parity, smoke)["mixed"]
    tokens = sum(q for q, _ in seqs)
    batch = random_ragged_batch(seqs, **sizes.parity, page_size=16, num_tokens=tokens + 5,
                                max_seqs=len(seqs) + 2, dtype=dtype, seed=4)
    args = batch.args()
    full, _ = jax.jit(lambda *a: ragged_paged_attention(*a, impl="reference"))(*args)
    error, finite, pages_equal, outs, lses = 0.0, True, True, [], []
    for part in range(2):
        mask = args[5] % 2 == part
        runs = [jax.jit(lambda *a, i=i: ragged_paged_attention(
            *a[:-1], impl=i, page_mask=a[-1], return_lse=True))(*args, mask)
            for i in ("reference", impl)]
        (ref, ref_lse, ref_pages), (out, lse, pages) = runs
        for got, want in ((out, ref), (lse, ref_lse)):
            got, want = np.asarray(got[:tokens]), np.asarray(want[:tokens])
            finite = finite and bool(np.isfinite(got).all())
            error = max(error, float(np.max(np.abs(got - want))))
        pages_equal = pages_equal and bool(np.array_equal(
            np.asarray(pages, np.float32), np.asarray(ref_pages, np.float32), equal_nan=True))
        outs.append(out)
        lses.append(lse)
    merged = np.asarray(merge_partials(jnp.stack(outs), jnp.stack(lses))[:tokens])
    merge_error = float(np.max(np.abs(merged - np.asarray(full[:tokens], np.float32))))
    error = max(error, merge_error)
    row = {"dtype": jnp.dtype(dtype).name, "case": "mixed, pages split 2 ways (lse path)",
           "max_abs_error": error, "merge_max_abs_error": merge_error, "finite": finite,
           "kv_written_equal": pages_equal,
           "ok": finite and pages_equal and error <= tolerance}
    print(f"  parity {row['dtype']:8} split x2 max err {error:.2e} (merge {merge_error:.2e})",
          flush=True)
    return row


def gpu_kv_splits(impl: str, batch) -> int | None:
    """KV splits the GPU kernel's rule picks for this decode batch (None for other kernels)."""
    if impl not in ("gpu", "gpu-interpret"):
        return None
    table, pages = batch.args()[5], batch.kv_pages
    kv_heads = pages.shape[2] // 2
    return choose_gpu_blocks(num_tokens=batch.q.shape[0], max_seqs=table.shape[0],
                             num_kv_heads=kv_heads, group=batch.q.shape[1] // kv_heads,
                             page_size=pages.shape[1], pages_per_seq=table.shape[1]).kv_splits


def _median_step_seconds(impl: str, batch, gpu_options: dict | None = None) -> float:
    step = jax.jit(lambda *a: ragged_paged_attention(*a, impl=impl, gpu_options=gpu_options),
                   donate_argnums=(3,))
    args = list(batch.args())
    args[3] = jnp.copy(args[3])  # the step donates it; the batch's own pages stay usable
    out, args[3] = step(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        out, args[3] = step(*args)
        jax.block_until_ready((out, args[3]))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_bandwidth(impl: str, sizes: Sizes, peak: float | None, copy_bw: float) -> list[dict]:
    """On the GPU kernel also the same step without split-KV (one split), as a ratio."""
    rows = []
    heads = sizes.parity
    for context in sizes.contexts:
        for batch_size in sizes.decode_batches:
            seqs = [(1, context)] * batch_size
            batch = random_ragged_batch(seqs, **heads, page_size=16, dtype=jnp.bfloat16,
                                        nan_fill=False, extra_pages=0, seed=1)
            seconds = _median_step_seconds(impl, batch)
            splits = gpu_kv_splits(impl, batch)
            unsplit = None
            if splits is not None and splits > 1:
                unsplit = _median_step_seconds(impl, batch, {"num_kv_splits": 1})
            kv_bytes = batch_size * context * 2 * heads["num_kv_heads"] * heads["head_dim"] * 2
            achieved = kv_bytes / seconds
            rows.append({"batch": batch_size, "context": context, "median_ms": seconds * 1e3,
                         "kv_bytes": kv_bytes, "bytes_per_s": achieved,
                         "of_peak": None if peak is None else achieved / peak,
                         "of_copy": achieved / copy_bw, "kv_splits": splits,
                         "unsplit_over_split": None if unsplit is None else unsplit / seconds})
            print(f"  decode b{batch_size} ctx{context}: {seconds * 1e3:.3f} ms, "
                  f"{achieved / 1e9:.0f} GB/s"
                  + ("" if splits is None else f", {splits} kv splits")
                  + ("" if unsplit is None
                     else f" ({unsplit / seconds:.2f}x the speed of 1 split)"),
                  flush=True)
    return rows


def engine_end_to_end(impl: str, sizes: Sizes, workdir: str, smoke: bool) -> tuple[dict, list]:
    """Greedy tokens of the engine (bf16 on the accelerator, f32 in --smoke) vs
    transformers in float32 on the same random weights, then decode tokens/s."""
    import torch
    import transformers

    from meshserve.engine.dense import DenseGenerator
    from meshserve.engine.engine import Engine, EngineConfig
    from meshserve.engine.sampling_params import SamplingParams
    from meshserve.meshes import make_mesh, parse_layout
    from meshserve.models.loading import load_checkpoint
    from meshserve.tools.convert import convert

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes.model)).eval()
    hf_dir, ckpt = os.path.join(workdir, "hf"), os.path.join(workdir, "ckpt")
    hf.save_pretrained(hf_dir)
    convert(hf_dir, ckpt, dtype="float32", progress=False)
    dtype = jnp.float32 if smoke else jnp.bfloat16
    model = load_checkpoint(ckpt, make_mesh(parse_layout("")), dtype)
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, sizes.model["vocab_size"], 48)]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        hf_logits = hf(ids).logits[0, -1].float().numpy()
        hf_tokens = hf.generate(ids, max_new_tokens=sizes.new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ours_logits = np.asarray(DenseGenerator(model).prefill_logits([prompt])[0][-1], np.float32)
    step_tokens = 64 if smoke else 512
    config = EngineConfig(max_seqs=max(sizes.engine_batches), max_model_len=512,
                          max_step_tokens=step_tokens, min_token_bucket=step_tokens)
    # --smoke: the engine's own CPU choice (tests/test_engine_interpret runs the engine on
    # the interpreted kernels; here it would only add minutes).
    engine = Engine(model, config, attention_impl=None if smoke else impl)
    out = engine.generate([prompt], SamplingParams(max_tokens=sizes.new_tokens, ignore_eos=True))
    ours_tokens = [t for chunk in out[0] for t in chunk.token_ids]
    agree = next((i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens, strict=True)) if a != b),
                 len(hf_tokens))
    parity = {"dtype": jnp.dtype(dtype).name, "tokens": len(hf_tokens), "agree": agree,
              "last_logit_max_abs_error": float(np.max(np.abs(ours_logits - hf_logits))),
              "logit_scale": float(np.max(np.abs(hf_logits)))}
    print(f"  engine vs transformers: {agree}/{len(hf_tokens)} tokens agree", flush=True)
    rates = []
    for batch_size in sizes.engine_batches:
        prompts = [prompt[: 16 + i] for i in range(batch_size)]
        params = SamplingParams(max_tokens=sizes.new_tokens, ignore_eos=True)
        engine.generate(prompts, params)  # compiles this batch's programs
        start = time.perf_counter()
        engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        rates.append({"batch": batch_size, "new_tokens": sizes.new_tokens,
                      "tok_s": batch_size * sizes.new_tokens / seconds})
        print(f"  engine decode batch {batch_size}: {rates[-1]['tok_s']:.0f} tok/s", flush=True)
    engine.shutdown()
    return parity, rates


def run(smoke: bool) -> dict:
    sizes = SMOKE if smoke else FULL
    impl = kernel_impl(smoke)
    peak = peak_bandwidth()
    copy_bw = copy_bandwidth(64 << 20 if smoke else 1 << 30)
    began = time.perf_counter()
    report = {
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "jax": jax.__version__, "kernel": impl, "smoke": smoke, "peak_hbm_bytes_per_s": peak,
        "copy_bytes_per_s": copy_bw,
    }
    report["parity"] = kernel_parity(impl, sizes, smoke)
    report["decode_bandwidth"] = decode_bandwidth(impl, sizes, peak, copy_bw)
    with tempfile.TemporaryDirectory(prefix="meshserve-accel-") as workdir:
        report["engine"], report["engine_decode"] = engine_end_to_end(impl, sizes, workdir, smoke)
    report["seconds"] = time.perf_counter() - began
    report["ok"] = all(r["ok"] for r in report["parity"])
    return report


def print_table(report: dict) -> None:
    print(f"\n{report['device']} ({report['backend']}, jax {report['jax']}), "
          f"kernel {report['kernel']}{' [smoke: timings mean nothing]' if report['smoke'] else ''}")
    print("| check | result |\n|---|---|")
    for r in report["parity"]:
        print(f"| parity {r['dtype']} {r['case']} | max abs error {r['max_abs_error']:.2e}"
              f"{'' if r['ok'] else ' FAIL'} |")
    for r in report["decode_bandwidth"]:
        peak = "n/a" if r["of_peak"] is None else f"{r['of_peak']:.0%}"
        print(f"| decode attention b{r['batch']} ctx{r['context']} | {r['median_ms']:.3f} ms, "
              f"{r['bytes_per_s'] / 1e9:.0f} GB/s = {peak} of HBM peak, "
              f"{r['of_copy']:.0%} of a copy"
              + ("" if r.get("kv_splits") is None else f", {r['kv_splits']} kv splits")
              + ("" if r.get("unsplit_over_split") is None
                 else f" ({r['unsplit_over_split']:.2f}x the speed of 1 split)") + " |")
    e = report["engine"]
    print(f"| engine {e['dtype']} vs transformers f32 | {e['agree']}/{e['tokens']} greedy tokens "
          f"agree; last logits max error {e['last_logit_max_abs_error']:.3f} "
          f"(scale {e['logit_scale']:.1f}) |")
    for r in report["engine_decode"]:
        print(f"| engine decode batch {r['batch']} | {r['tok_s']:.0f} tok/s |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes; on CPU the TPU kernel runs in the interpreter")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args(argv)
    report = run(args.smoke)
    print_table(report)
    if args.out:
        reports.write_json(args.out, report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
