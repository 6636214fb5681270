"""All-gather vs ring attention for one prefill chunk on `sequence` (no earlier context).

The chunk's tokens are split contiguously over S devices, as the `seq` rule leaves the
projections. Two ways to run its causal attention inside `shard_map`:

- **gather** (what the engine does): one all-gather of q|k|v; each device attends every
  query over the keys of the pages it owns (page p on device p mod S), then one
  all-to-all sends each device the (out | lse) partials of its own tokens to merge.
- **ring**: each device keeps its queries; the K/V blocks go round the ring with S - 1
  `ppermute`s, and an online softmax accumulates each block's contribution.

Both compute the same masked FLOPs here (dense blocks, no causal skipping), so the
difference is communication. The ring applies only to a chunk with no earlier context:
with chunked prefill the earlier chunks' KV sit round-robin on every device and a ring
would have to circulate all of it (docs/design.md). Prints a table and JSON.

    python -m meshserve.tools.bench_ring --cpu_devices 8 --lengths 1024,2048,4096
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

flags.DEFINE_string("lengths", "1024,2048,4096", "Chunk lengths (tokens).")
flags.DEFINE_string("ways", "2,4", "Sequence splits to compare.")
flags.DEFINE_integer("num_heads", 4, "Query heads.")
flags.DEFINE_integer("num_kv_heads", 2, "KV heads.")
flags.DEFINE_integer("head_dim", 32, "Head dimension.")
flags.DEFINE_integer("page_size", 16, "Tokens per KV page (ownership: page mod S).")
flags.DEFINE_integer("repeats", 3, "Timed calls (the best is reported).", lower_bound=1)
flags.DEFINE_integer("cpu_devices", 8, "Simulated CPU devices (0: the real devices).",
                     lower_bound=0)


def _attend(q, k, v, qpos, kpos, key_ok):
    """Causal attention of q [Tq, Hq, D] over k, v [Tk, Hkv, D]: (out f32, lse f32)."""
    import jax.numpy as jnp

    from meshserve.pallas_kernels.ragged_paged_attention.reference import MASK_VALUE

    group = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    s = jnp.einsum("qhd,khd->hqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    mask = (kpos[None, :] <= qpos[:, None]) & key_ok[None, :]
    s = jnp.where(mask[None], s, MASK_VALUE)
    m = s.max(axis=-1)
    p = jnp.where(mask[None], jnp.exp(s - m[..., None]), 0.0)
    denom = p.sum(axis=-1)
    out = jnp.einsum("hqk,khd->qhd", p, v) / jnp.maximum(denom, 1e-30).T[..., None]
    lse = jnp.where(denom > 0, m + jnp.log(jnp.maximum(denom, 1e-30)), MASK_VALUE).T
    return out, lse


def gather_shard(q, k, v, *, axis: str, ways: int, page_size: int):
    import jax
    import jax.numpy as jnp

    from meshserve.pallas_kernels.ragged_paged_attention.reference import merge_partials

    hq, hkv = q.shape[1], k.shape[1]
    qkv = jax.lax.all_gather(jnp.concatenate([q, k, v], axis=1), axis, axis=0, tiled=True)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    total = q.shape[0]
    me = jax.lax.axis_index(axis)
    # This device's pages: every ways-th page, starting at page `me`.
    pages = total // page_size // ways
    cols = (jnp.arange(pages) * ways + me)[:, None] * page_size + jnp.arange(page_size)
    kpos = cols.reshape(-1)
    pos = jnp.arange(total)
    out, lse = _attend(q, k[kpos], v[kpos], pos, kpos, jnp.ones(kpos.shape, bool))
    packed = jnp.concatenate([out, lse[..., None]], axis=-1)
    packed = packed.reshape(ways, -1, hq, packed.shape[-1])
    parts = jax.lax.all_to_all(packed, axis, split_axis=0, concat_axis=0)
    return merge_partials(parts[..., :-1], parts[..., -1])


def ring_shard(q, k, v, *, axis: str, ways: int):
    import jax
    import jax.numpy as jnp

    from meshserve.pallas_kernels.ragged_paged_attention.reference import merge_partials

    block = q.shape[0]
    me = jax.lax.axis_index(axis)
    qpos = me * block + jnp.arange(block)
    perm = [(i, (i + 1) % ways) for i in range(ways)]
    outs, lses = [], []
    for step in range(ways):
        src = (me - step) % ways  # whose K/V block this device holds now
        out, lse = _attend(q, k, v, qpos, src * block + jnp.arange(block),
                           jnp.ones((block,), bool))
        outs.append(out)
        lses.append(lse)
        if step + 1 < ways:
            k, v = jax.lax.ppermute((k, v), axis, perm)
    return merge_partials(jnp.stack(outs), jnp.stack(lses))


def measure(total: int, ways: int, num_heads: int = 4, num_kv_heads: int = 2,
            head_dim: int = 32, page_size: int = 16, repeats: int = 3) -> list[dict]:
    """Both methods on one chunk of `total` tokens over `ways` devices: time, collectives
    and bytes; raises if their outputs differ."""
    import functools

    import jax
    import numpy as np

    from meshserve.meshes import ShardingRules, make_mesh, parse_layout
    from meshserve.tools.bench_mesh_hlo import program_collectives

    rules = ShardingRules.create(make_mesh(parse_layout(f"sequence={ways}")))
    mesh, axis, spec = rules.mesh, rules.mesh_axis("seq"), rules.spec(("seq",))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    shapes = [(total, num_heads, head_dim)] + [(total, num_kv_heads, head_dim)] * 2
    q, k, v = (jax.device_put(jax.random.normal(key, s), rules.sharding(("seq",)))
               for key, s in zip(keys, shapes, strict=True))
    fns = {
        "gather": functools.partial(gather_shard, axis=axis, ways=ways,
                                    page_size=page_size),
        "ring": functools.partial(ring_shard, axis=axis, ways=ways),
    }
    rows, results = [], {}
    for name, fn in fns.items():
        run = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                                    check_vma=False))
        compiled = run.lower(q, k, v).compile()
        counts, nbytes = program_collectives(compiled.as_text(), {axis: ways})
        results[name] = np.asarray(run(q, k, v))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run(q, k, v).block_until_ready()
            best = min(best, time.perf_counter() - start)
        rows.append({"tokens": total, "sequence": ways, "method": name, "ms": 1e3 * best,
                     "collectives": {k: c for k, c in counts.items() if c},
                     "bytes_per_token": sum(nbytes.values()) / total,
                     # what crosses the links: an all-gather or all-to-all keeps 1/S of
                     # its buffer local, a permute sends all of its
                     "wire_bytes_per_token": sum(
                         b * (1 if kind == "collective-permute" else (ways - 1) / ways)
                         for kind, b in nbytes.items()) / total})
    np.testing.assert_allclose(results["gather"], results["ring"], rtol=1e-4, atol=1e-5)
    return rows


def main(argv: list[str]) -> int:
    del argv
    import jax

    f = flags.FLAGS
    if f.cpu_devices:
        jax.config.update("jax_num_cpu_devices", f.cpu_devices)
    rows = []
    for ways in [int(w) for w in f.ways.split(",")]:
        for total in [int(t) for t in f.lengths.split(",")]:
            rows += measure(total, ways, f.num_heads, f.num_kv_heads, f.head_dim,
                            f.page_size, f.repeats)
            print(f"{total} tokens on sequence={ways} done", file=sys.stderr, flush=True)
    print("| tokens | sequence | method | ms | collectives | buffer B per token | "
          "wire B per token |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        coll = ", ".join(f"{n} {k}" for k, n in r["collectives"].items())
        print(f"| {r['tokens']} | {r['sequence']} | {r['method']} | {r['ms']:.1f} | {coll} | "
              f"{r['bytes_per_token']:.0f} | {r['wire_bytes_per_token']:.0f} |")
    print(json.dumps({"rows": rows, "platform": jax.default_backend(),
                      "host_cores": os.cpu_count(),
                      "command": "python -m meshserve.tools.bench_ring " + " ".join(sys.argv[1:])}))
    return 0


if __name__ == "__main__":
    app.run(main)
