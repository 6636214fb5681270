"""KV handoff pulls between two processes on loopback through engine/kv_transfer.py
(layout check, bounded worker-thread pull): time and bandwidth per handoff size.

    python -m meshserve.tools.bench_kv_transfer [--repeats 20] [--out results.json]

A child process offers bf16 arrays shaped like KV handoffs ([layers, rows, page_size,
2 * kv_heads, head_dim]); this process pulls each one. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

# (layers, rows, page_size, 2 * kv_heads, head_dim): the demo model's handoff of a short
# prompt, then 1B- and 8B-class models' handoffs of 1k and 4k tokens.
SHAPES = ((2, 8, 16, 4, 64), (16, 64, 16, 16, 64), (32, 256, 16, 16, 128))


def _child() -> None:
    import jax.numpy as jnp

    from meshserve.engine.kv_transfer import KVTransport

    t = KVTransport("127.0.0.1:0", ttl_s=600.0)
    for line in sys.stdin:
        shape = tuple(json.loads(line))
        if not shape:
            return
        x = (jnp.arange(int(jnp.prod(jnp.array(shape))), dtype=jnp.float32).reshape(shape)
             % 251).astype(jnp.bfloat16)
        x.block_until_ready()
        offer = t.offer([x])
        print(json.dumps({"address": t.address, "uuid": offer.uuid,
                          "layouts": [dataclasses.asdict(la) for la in offer.layouts]}),
              flush=True)


def _layouts(raw):
    from meshserve.engine.kv_transfer import ArrayLayout

    return [ArrayLayout(**{k: tuple(tuple(e) if isinstance(e, list) else e for e in v)
                           if isinstance(v, list) else v for k, v in d.items()}) for d in raw]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child()
        return
    import jax
    import jax.numpy as jnp

    from meshserve.engine.kv_transfer import KVTransport

    child = subprocess.Popen([sys.executable, "-m", "meshserve.tools.bench_kv_transfer",
                              "--child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=os.environ)
    local = KVTransport("127.0.0.1:0", pull_timeout_s=60.0)
    mesh_sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(jax.devices()[:1], ("x",)), jax.sharding.PartitionSpec())
    rows = []
    try:
        for shape in SHAPES:
            times = []
            for i in range(args.repeats + 1):
                child.stdin.write(json.dumps(shape) + "\n")
                child.stdin.flush()
                meta = json.loads(child.stdout.readline())
                dst = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=mesh_sharding)]
                began = time.perf_counter()
                local.pull(meta["address"], meta["uuid"], _layouts(meta["layouts"]), dst)
                if i:  # the first pull of a size also connects and allocates
                    times.append(time.perf_counter() - began)
            nbytes = 2
            for d in shape:
                nbytes *= d
            med = statistics.median(times)
            rows.append({"shape": list(shape), "bytes": nbytes, "median_ms": med * 1e3,
                         "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
                         "gb_per_s": nbytes / med / 1e9})
    finally:
        child.stdin.write("[]\n")
        child.stdin.flush()
        child.wait(30)
    print(f"{'shape':<28} {'MiB':>9} {'median ms':>10} {'p90 ms':>8} {'GB/s':>7}")
    for r in rows:
        print(f"{str(r['shape']):<28} {r['bytes'] / 2**20:>9.2f} {r['median_ms']:>10.2f} "
              f"{r['p90_ms']:>8.2f} {r['gb_per_s']:>7.2f}")
    result = {"repeats": args.repeats, "device": jax.devices()[0].platform, "rows": rows}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
