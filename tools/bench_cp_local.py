"""One device's local part of context-parallel attention on CPU: the C++ kernel's
page-mask path against the pure-JAX `local_partial_attention`, and the kernel over all
pages for scale. Pages are split `--ways` ways (page p on device p mod S); the timed call
is attention only (the step's K/V already written), on device 0's share.

    python -m meshserve.tools.bench_cp_local --out docs/bench/cp_local_cpu.json

Prints a table and JSON; ratios are of medians measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from meshserve.engine.context_parallel import local_partial_attention
from meshserve.pallas_kernels.ragged_paged_attention import cpu_kernel
from meshserve.pallas_kernels.ragged_paged_attention.validation import random_ragged_batch
from meshserve.tools import reports

HEADS = dict(num_q_heads=16, num_kv_heads=4, head_dim=128)


def _median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(cases: dict[str, list[tuple[int, int]]], ways: int, repeats: int) -> list[dict]:
    cpu_kernel.load()
    masked = jax.jit(lambda q, p, lens, t, cu, n, m: cpu_kernel.attention_from_pages(
        q, p, lens, t, cu, n, page_mask=m))
    whole = jax.jit(cpu_kernel.attention_from_pages)
    pure = jax.jit(lambda q, p, lens, t, cu, n: local_partial_attention(
        q, p, lens, t, cu, n, ways=ways, index=jnp.int32(0), sliding_window=None))
    rows = []
    for name, seqs in cases.items():
        batch = random_ragged_batch(seqs, **HEADS, page_size=16, nan_fill=False, seed=1)
        q, _, _, pages, lens, table, cu, n = batch.args()
        meta = (q, pages, lens, table, cu, n)
        row = {"case": name, "ways": ways,
               "kernel_masked_ms": _median_ms(masked, (*meta, table % ways == 0), repeats),
               "pure_jax_local_ms": _median_ms(pure, meta, repeats),
               "kernel_all_pages_ms": _median_ms(whole, meta, repeats)}
        row["pure_over_kernel"] = row["pure_jax_local_ms"] / row["kernel_masked_ms"]
        row["all_pages_over_masked"] = row["kernel_all_pages_ms"] / row["kernel_masked_ms"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ways", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="toy sizes (tests)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        cases = {"decode 2 x 64": [(1, 64)] * 2, "prefill 32": [(32, 32)]}
    else:
        cases = {"decode 8 x 2048": [(1, 2048)] * 8, "prefill 512": [(512, 512)]}
    rows = run(cases, args.ways, 3 if args.quick else args.repeats)
    print(f"| case (ways={args.ways}, heads 16/4 x 128) | C++ kernel, page mask | pure-JAX local "
          "| C++ kernel, all pages |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['kernel_masked_ms']:.2f} ms | {r['pure_jax_local_ms']:.2f} ms "
              f"({r['pure_over_kernel']:.2f}x) | {r['kernel_all_pages_ms']:.2f} ms "
              f"({r['all_pages_over_masked']:.2f}x) |")
    report = {"device": jax.devices()[0].device_kind, "rows": rows}
    if args.out:
        reports.write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
