"""XLA:CPU dots against the panel-packed C++ kernel on a model's projection weights.

    python -m meshserve.tools.bench_matmul                     # the 125M Llama of bench_engine.py
    python -m meshserve.tools.bench_matmul --rows 1,8 --out docs/bench/matmul_cpu.json

Every projection of every layer (and the LM head) once, as a dependent chain (each call's
input comes from the previous output, so calls cannot overlap), at several row counts M
(the decode batch). Prints ms per chain, the weight bytes streamed per second and FLOP/s,
for both in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from meshserve.pallas_kernels import packed_matmul as pm
from meshserve.tools.reports import write_json
from meshserve.tools.roofline import best_time


def _fit(x: jax.Array, k: int) -> jax.Array:
    """The previous output as the next input of width k (a cheap slice or tile)."""
    reps = -(-k // x.shape[1])
    return (jnp.tile(x, (1, reps)) if reps > 1 else x)[:, :k]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--kv-width", type=int, default=256, help="kv heads x head_dim")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rows", default="1,8,32,64,512")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not pm.available():
        sys.exit("the packed matmul kernel does not build here (see the warning above)")
    h, i, kv = args.hidden, args.intermediate, args.kv_width
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)] * args.layers
    shapes.append((h, args.vocab))
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for s in shapes]
    packed = [pm.pack(w) for w in weights]
    total = sum(w.size * 4 for w in weights)

    def chain(matmul):
        def run(ws, x):
            for w, (k, _) in zip(ws, shapes, strict=True):
                x = matmul(_fit(x, k), w)
            return x
        return jax.jit(run)

    xla, ours = chain(jnp.dot), chain(pm.packed_matmul)
    rows = []
    print(f"{len(shapes)} weights, {total / 2**20:.0f} MiB f32")
    print("| rows | XLA ms | XLA GB/s | XLA GFLOP/s | packed ms | packed GB/s | packed GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for m in (int(r) for r in args.rows.split(",")):
        x = jnp.asarray(rng.standard_normal((m, h), np.float32))
        t_xla = best_time(xla, weights, x, repeats=args.repeats)
        t_ours = best_time(ours, packed, x, repeats=args.repeats)
        flops = 2 * m * total / 4
        row = {"rows": m, "xla_s": t_xla, "packed_s": t_ours, "weight_bytes": total,
               "xla_GBps": total / t_xla / 1e9, "packed_GBps": total / t_ours / 1e9,
               "xla_GFLOPs": flops / t_xla / 1e9, "packed_GFLOPs": flops / t_ours / 1e9}
        rows.append(row)
        print(f"| {m} | {t_xla * 1e3:.1f} | {row['xla_GBps']:.1f} | {row['xla_GFLOPs']:.0f} | "
              f"{t_ours * 1e3:.1f} | {row['packed_GBps']:.1f} | {row['packed_GFLOPs']:.0f} |",
              flush=True)
    if args.out:
        write_json(args.out, {"machine": f"{os.cpu_count()} CPU cores", "rows": rows})


if __name__ == "__main__":
    main()
