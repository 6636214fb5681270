"""Benchmark ragged paged attention: Pallas kernels vs the pure-JAX reference.

    python -m meshserve.tools.bench_kernels --out bench.json            # every scenario
    python -m meshserve.tools.bench_kernels --quick --scenarios decode  # small shapes, smoke test

Prints a table (time, achieved bytes/s and FLOP/s) and optionally writes JSON.

On CPU the reference and the C++ CPU kernel can be timed: the TPU kernel needs Mosaic (a
TPU) and the GPU kernel needs Triton (a GPU). Interpret mode runs them on CPU, but an
interpreter's speed says nothing about the kernel's, so on CPU those rows are reported as
unmeasured instead. The CPU kernel takes f32 only (rows in other dtypes say so).

Bytes and FLOPs are the minimal work of the step (each attended K/V byte read once, q read,
output and new K/V written; 4 FLOPs per (query head, attended key, head_dim) for QK^T and PV),
so the rates are comparable across implementations that waste different amounts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from meshserve.pallas_kernels.ragged_paged_attention import (
    cpu_kernel,
    ragged_paged_attention_gpu,
    ragged_paged_attention_reference,
    ragged_paged_attention_tpu,
)
from meshserve.pallas_kernels.ragged_paged_attention.validation import random_ragged_batch

IMPLS = ("reference", "cpu", "tpu", "gpu")
_KERNEL_BACKENDS = {"tpu": ("tpu",), "gpu": ("gpu", "cuda", "rocm"), "cpu": ("cpu",)}


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    seqs: tuple[tuple[int, int], ...]  # (q_len, kv_len) per sequence
    num_tokens: int  # bucket T
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    sliding_window: int | None = None


def scenarios(quick: bool) -> list[Scenario]:
    """Realistic serving shapes (Llama-3-8B-like heads); --quick shrinks them ~16x."""
    ctx, batch, chunk = (256, 16, 64) if quick else (2048, 64, 256)
    rng = np.random.default_rng(0)
    decode_lens = [int(x) for x in rng.integers(ctx // 2, ctx + 1, size=batch - 4)]
    mixed = [(chunk, chunk), (chunk, 2 * chunk), (chunk, 3 * chunk), (chunk, 4 * chunk)]
    mixed += [(1, n) for n in decode_lens]
    return [
        Scenario(f"decode_b{batch}_ctx{ctx}", tuple((1, ctx) for _ in range(batch)), batch),
        Scenario(
            f"decode_b{batch}_ctx{ctx}_ps32",
            tuple((1, ctx) for _ in range(batch)),
            batch,
            page_size=32,
        ),
        Scenario(f"mixed_{4}x{chunk}_prefill_{batch - 4}_decode", tuple(mixed), 4 * chunk + batch),
        Scenario(
            f"decode_b{batch}_ctx{ctx}_window{ctx // 4}",
            tuple((1, ctx) for _ in range(batch)),
            batch,
            sliding_window=ctx // 4,
        ),
        Scenario(f"prefill_1x{ctx // 2}", ((ctx // 2, ctx // 2),), ctx // 2),
    ]


def work(s: Scenario, itemsize: int) -> tuple[int, int]:
    """(minimal bytes moved, FLOPs) of one attention step."""
    attended = 0  # (query token, key) pairs
    kv_read = 0  # distinct key positions read
    for q_len, kv_len in s.seqs:
        first = kv_len - q_len
        for pos in range(first, kv_len):
            lo = 0 if s.sliding_window is None else max(0, pos - s.sliding_window + 1)
            attended += pos + 1 - lo
        lo = 0 if s.sliding_window is None else max(0, first - s.sliding_window + 1)
        kv_read += kv_len - lo
    tokens = sum(q for q, _ in s.seqs)
    row = s.head_dim * itemsize
    nbytes = (
        kv_read * 2 * s.num_kv_heads * row  # K and V reads
        + tokens * 2 * s.num_q_heads * row  # q in, out
        + tokens * 2 * s.num_kv_heads * row
    )  # new K/V written
    return nbytes, 4 * attended * s.num_q_heads * s.head_dim


def _time(fn, args, repeats: int) -> list[float]:
    # kv_pages (argument 3) is donated and threaded through, as the engine does, so aliased
    # kernels update it in place instead of copying the cache every call.
    step = jax.jit(fn, donate_argnums=(3,))
    args = list(args)
    args[3] = jnp.array(args[3], copy=True)  # the caller's cache survives for the next impl
    out, args[3] = step(*args)  # compile + warm up
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out, args[3] = step(*args)
        jax.block_until_ready((out, args[3]))
        times.append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace) -> dict:
    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype)
    if backend == "cpu":
        print(
            "NOTE: CPU backend - the reference and the C++ CPU kernel are timed. The Pallas "
            "kernels need a TPU (Mosaic) or a GPU (Triton); interpret mode runs them on CPU but "
            "its timings are meaningless, so their rows are marked 'unmeasured'.\n"
        )
    rows = []
    chosen = [
        s
        for s in scenarios(args.quick)
        if not args.scenarios or any(k in s.name for k in args.scenarios.split(","))
    ]
    for s in chosen:
        batch = random_ragged_batch(
            list(s.seqs),
            num_q_heads=s.num_q_heads,
            num_kv_heads=s.num_kv_heads,
            head_dim=s.head_dim,
            page_size=s.page_size,
            num_tokens=s.num_tokens,
            extra_pages=8,
            dtype=dtype,
            nan_fill=False,
            seed=1,
        )
        nbytes, flops = work(s, dtype.itemsize)
        for impl in args.impls.split(","):
            row = {
                "scenario": s.name,
                "impl": impl,
                "num_tokens": s.num_tokens,
                "num_seqs": len(s.seqs),
                "page_size": s.page_size,
                "sliding_window": s.sliding_window,
                "bytes": nbytes,
                "flops": flops,
            }
            if impl in _KERNEL_BACKENDS and backend not in _KERNEL_BACKENDS[impl]:
                row["status"] = f"unmeasured: needs a {impl.upper()} (backend is {backend})"
                rows.append(row)
                continue
            fn = {
                "reference": ragged_paged_attention_reference,
                "cpu": cpu_kernel.ragged_paged_attention_cpu,
                "tpu": ragged_paged_attention_tpu,
                "gpu": ragged_paged_attention_gpu,
            }[impl]
            kw = {"sliding_window": s.sliding_window}
            try:
                times = _time(lambda *a, fn=fn, kw=kw: fn(*a, **kw), batch.args(), args.repeats)
            except Exception as e:  # noqa: BLE001 - a failing kernel is a result, not a crash
                row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                continue
            med = statistics.median(times)
            row.update(
                status="measured",
                median_s=med,
                min_s=min(times),
                bytes_per_s=nbytes / med,
                flops_per_s=flops / med,
            )
            rows.append(row)
            print(f"  {s.name} / {impl}: {med * 1e3:.2f} ms", flush=True)
    return {
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "dtype": dtype.name,
        "repeats": args.repeats,
        "note": "bytes/FLOPs are the step's minimal work; TPU/GPU rows are unmeasured on CPU",
        "results": rows,
    }


def print_table(report: dict) -> None:
    head = f"{'scenario':40} {'impl':10} {'median ms':>10} {'GB/s':>8} {'GFLOP/s':>9}  status"
    print(f"\nbackend={report['backend']} device={report['device']} dtype={report['dtype']}")
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        if r["status"] == "measured":
            nums = (
                f"{r['median_s'] * 1e3:10.2f} {r['bytes_per_s'] / 1e9:8.2f} "
                f"{r['flops_per_s'] / 1e9:9.2f}"
            )
        else:
            nums = f"{'-':>10} {'-':>8} {'-':>9}"
        print(f"{r['scenario']:40} {r['impl']:10} {nums}  {r['status']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma list of " + str(IMPLS))
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="q/k/v and cache dtype (float32 is the fast one on CPU)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small shapes for a smoke run")
    parser.add_argument(
        "--scenarios",
        default="",
        help="comma list of substrings selecting scenarios (default: all)",
    )
    args = parser.parse_args(argv)
    for impl in args.impls.split(","):
        if impl not in IMPLS:
            parser.error(f"unknown impl {impl!r}; choose from {IMPLS}")
    report = run(args)
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
