"""Expert dispatch compared: the psum combine against all-to-all, per expert layout.

    python -m meshserve.tools.bench_moe_dispatch --cpu-devices 8 --out /tmp/moe-dispatch.json

One MoE layer (`engine.experts.ExpertParallel`, the grouped compute inside) with random
weights and routing, jitted on each layout, for a decode batch (`--decode-rows` tokens
per data shard) and a prefill chunk (`--prefill-rows`). Per case it reports the
collectives of the compiled program (count and bytes per device, from the HLO, as
`bench-mesh` counts them) and the median time of `--reps` calls, the two dispatches
alternating call by call so that both see the same machine load. Prints a table and JSON.

On simulated CPU devices the timings only show what communication and scheduling cost
(all "devices" share the host's cores, and a collective is a memory copy); the counts and
bytes are what an accelerator would move.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from meshserve.engine.experts import DISPATCHES, experts_backend
from meshserve.meshes import ShardingRules, make_mesh, parse_layout
from meshserve.models.moe import EXPERT_IN_AXES, EXPERT_OUT_AXES, route
from meshserve.tools.bench_mesh_hlo import program_collectives

TOKENS = ("batch", "seq", "embed")


def _case(rules: ShardingRules, rows: int, args, seed: int) -> tuple:
    """Sharded layer inputs: x [data, rows, hidden], its routing, the expert weights."""
    data = rules.axis_size("batch")
    h, e, i = args.hidden, args.experts, args.inner
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (data, rows, h))
    ids, w = route(x, jax.random.normal(keys[1], (h, e)), args.top_k, normalize=True)
    weights = [jax.random.normal(keys[2 + j], shape) / np.sqrt(shape[1])
               for j, shape in enumerate([(e, h, i), (e, h, i), (e, i, h)])]
    put = lambda a, axes: jax.device_put(a, rules.sharding(axes, a.shape))  # noqa: E731
    return (put(x, TOKENS), put(ids, TOKENS), put(w, TOKENS),
            put(weights[0], EXPERT_IN_AXES), put(weights[1], EXPERT_IN_AXES),
            put(weights[2], EXPERT_OUT_AXES))


def _jitted(fn):
    return jax.jit(lambda *a: fn(*a))  # the ExpertsFn itself is not hashable


def measure(layout: str, rows: int, args) -> list[dict]:
    spec = parse_layout(layout)
    rules = ShardingRules.create(make_mesh(spec))
    inputs = _case(rules, rows, args, seed=rows)
    fns = {d: _jitted(experts_backend(rules, "grouped", d)) for d in DISPATCHES}
    out = {}
    for d, fn in fns.items():
        counts, nbytes = program_collectives(fn.lower(*inputs).compile().as_text(),
                                             spec.axis_sizes())
        out[d] = {"layout": layout, "dispatch": d, "rows_per_data_shard": rows,
                  "collectives": {k: v for k, v in counts.items() if v},
                  "collective_bytes": {k: v for k, v in nbytes.items() if v},
                  "bytes_per_token": sum(nbytes.values()) / rows, "times_ms": [],
                  "result": fn(*inputs)}
    np.testing.assert_allclose(out["all_to_all"].pop("result"), out["psum"].pop("result"),
                               atol=1e-4, rtol=1e-4)
    for _ in range(args.reps):
        for d, fn in fns.items():
            t0 = time.perf_counter()
            fn(*inputs).block_until_ready()
            out[d]["times_ms"].append((time.perf_counter() - t0) * 1e3)
    for r in out.values():
        times = r.pop("times_ms")
        r["median_ms"], r["p10_ms"] = statistics.median(times), float(np.percentile(times, 10))
    a2a, psum = out["all_to_all"], out["psum"]
    a2a["time_ratio_to_psum"] = a2a["median_ms"] / psum["median_ms"]
    return list(out.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-devices", type=int, default=8, help="simulated CPU devices (0: real)")
    p.add_argument("--layouts", default="data=4,expert=2;data=2,expert=4;expert=8")
    p.add_argument("--decode-rows", type=int, default=4)
    p.add_argument("--prefill-rows", type=int, default=256)
    # The tiny Mixtral of the tests: hidden 64, 8 experts of 32, top 2.
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--inner", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    results = [r for layout in args.layouts.split(";")
               for rows in (args.decode_rows, args.prefill_rows)
               for r in measure(layout, rows, args)]
    print("| layout | rows/data shard | dispatch | collectives per layer call | bytes/device"
          " | bytes/token | median ms | p10 ms | a2a ÷ psum time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        kinds = ", ".join(f"{n} {k}" for k, n in r["collectives"].items())
        ratio = r.get("time_ratio_to_psum")
        print(f"| {r['layout']} | {r['rows_per_data_shard']} | {r['dispatch']} | {kinds} | "
              f"{sum(r['collective_bytes'].values())} | {r['bytes_per_token']:.0f} | "
              f"{r['median_ms']:.3f} | {r['p10_ms']:.3f} | "
              f"{'' if ratio is None else f'{ratio:.2f}'} |")
    doc = {"command": "python -m meshserve.tools.bench_moe_dispatch", "args": vars(args),
           "devices": jax.device_count(), "platform": jax.devices()[0].platform,
           "results": results}
    print(json.dumps(doc))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
