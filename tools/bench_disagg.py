"""`meshserve bench-disagg`: colocated slices vs prefill/decode slices, on the same
devices, engines and workload, in one run.

Two slices are loaded once (the same engines serve both configurations, so both run the
same compiled programs): *colocated* routes every request to either slice, which
prefills and decodes it; *disaggregated* makes slice 0 prefill-only and slice 1
decode-only (`serve --slices 2 --prefill-slices 1`), each request's KV moving between
them. Each configuration runs behind a real gRPC server on loopback, alternating for
--rounds rounds so that drift in the machine's speed hits both alike.

The workload is the case disaggregation is for: --short streams decoding (short prompts,
long outputs) while --long long prompts arrive one every --long-gap-ms among them. A
long prompt's prefill chunks run in the same steps as a colocated slice's decodes and
stall them; with P/D they run on the prefill slice only. Reported per configuration:
TTFT (p50/p99; all requests and the long ones), inter-token latency of the short
streams (p50/p99/max), goodput (requests per second meeting every --slo target), and
the KV handoff per request (transfer ms, bytes; from each final response's timings).

    meshserve bench-disagg --demo --cpu-devices 2 --short 12 --long 4 --out disagg.json
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import threading
import time

import numpy as np
from absl import flags

from meshserve.tools.bench_serving import Result, _stats, parse_slo
from meshserve.tools.model_flags import checkpoint_dir, define_model_flags
from meshserve.tools.reports import write_json

CONFIGS = ("colocated", "disaggregated")


def define_flags() -> None:
    define_model_flags()
    d = flags
    d.DEFINE_bool("demo", False, "Use the small random demo model (no model flag needed).")
    d.DEFINE_integer("short", 12, "Short streams (decode-heavy).", lower_bound=1,
                     upper_bound=256)
    d.DEFINE_integer("short_input", 16, "Prompt tokens of a short stream.", lower_bound=1)
    d.DEFINE_integer("short_output", 96, "Output tokens of a short stream.", lower_bound=2)
    d.DEFINE_integer("long", 4, "Long prompts (prefill-heavy).", lower_bound=0,
                     upper_bound=64)
    d.DEFINE_integer("long_input", 1024, "Prompt tokens of a long prompt.", lower_bound=1)
    d.DEFINE_integer("long_output", 8, "Output tokens of a long prompt.", lower_bound=1)
    d.DEFINE_float("long_start_ms", 300.0, "When the first long prompt arrives.",
                   lower_bound=0.0)
    d.DEFINE_float("long_gap_ms", 400.0, "Between long prompts.", lower_bound=0.0)
    d.DEFINE_integer("rounds", 2, "Rounds of (colocated, disaggregated).", lower_bound=1,
                     upper_bound=20)
    d.DEFINE_string("slo", "ttft_ms=3000,tpot_ms=150", "Goodput targets (ttft_ms, tpot_ms, "
                    "e2e_ms).")
    d.DEFINE_integer("page_size", 16, "Tokens per KV page.", lower_bound=1)
    d.DEFINE_integer("max_seqs", 16, "Batch rows per slice.", lower_bound=1)
    d.DEFINE_integer("max_step_tokens", 256, "Tokens per step (long prompts are chunked).",
                     lower_bound=1)
    d.DEFINE_integer("decode_steps", 4, "Decode iterations per device call.", lower_bound=1)
    d.DEFINE_integer("seed", 0, "Seed of the random prompts.")
    d.DEFINE_string("out", None, "Write the results as JSON here.")


@dataclasses.dataclass
class Timed(Result):
    kind: str = "short"
    transfer_ms: float | None = None
    kv_bytes: int = 0


def workload(f, vocab: int) -> list[tuple[float, str, list[int], int]]:
    """(arrival s, kind, prompt, max_tokens), short streams first."""
    rng = np.random.default_rng(f.seed)
    low = min(3, vocab - 1)
    items = [(0.01 * i, "short", rng.integers(low, vocab, f.short_input).tolist(),
              f.short_output) for i in range(f.short)]
    items += [((f.long_start_ms + k * f.long_gap_ms) / 1e3, "long",
               rng.integers(low, vocab, f.long_input).tolist(), f.long_output)
              for k in range(f.long)]
    return sorted(items, key=lambda x: x[0])


async def _one(stub, pb, kind: str, prompt: list[int], out_len: int) -> Timed:
    import grpc

    result = Timed(input_len=len(prompt), kind=kind)
    request = pb.GenerateRequest(token_ids=prompt, max_tokens=out_len, ignore_eos=True)
    try:
        async for response in stub.Generate(request, timeout=600):
            if response.token_ids:
                result.arrived(len(response.token_ids))
            if response.finish_reason:
                result.slice = response.slice
                if response.HasField("prefill_slice"):
                    result.transfer_ms = response.timings.transfer_ms
                    result.kv_bytes = response.timings.kv_transfer_bytes
        result.e2e = time.perf_counter() - result.start
    except grpc.aio.AioRpcError as e:
        result.error = e.code().name
    return result


async def _drive(target: str, items) -> tuple[list[Timed], float]:
    import grpc

    from meshserve.serving.proto import meshserve_pb2 as pb
    from meshserve.serving.proto import meshserve_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.MeshServeStub(channel)
        start = time.perf_counter()

        async def at(when, kind, prompt, out_len):
            await asyncio.sleep(max(0.0, start + when - time.perf_counter()))
            return await _one(stub, pb, kind, prompt, out_len)

        results = await asyncio.gather(*(at(*item) for item in items))
        return list(results), time.perf_counter() - start


def summarize(results: list[Timed], duration: float, slo: dict[str, float]) -> dict:
    ok = [r for r in results if r.error is None]
    short = [r for r in ok if r.kind == "short"]
    long_ = [r for r in ok if r.kind == "long"]
    good = 0
    for r in ok:
        measured = {"ttft_ms": r.ttft * 1e3, "e2e_ms": r.e2e * 1e3,
                    "tpot_ms": (r.e2e - r.ttft) / max(r.output_len - 1, 1) * 1e3}
        good += all(measured[k] <= v for k, v in slo.items())
    itl = [x for r in short for x in r.itl]
    transfers = [r.transfer_ms for r in ok if r.transfer_ms is not None]
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "ttft_long_ms": _stats([r.ttft for r in long_]),
        "ttft_short_ms": _stats([r.ttft for r in short]),
        "itl_short_ms": {**_stats(itl), "max": max(itl) * 1e3 if itl else math.nan},
        "goodput": good / duration, "within_slo": good, "slo": slo,
        "output_throughput": sum(r.output_len for r in ok) / duration,
        "kv_transfer_ms": {"mean": float(np.mean(transfers)) if transfers else math.nan,
                           "p99": float(np.percentile(transfers, 99)) if transfers
                           else math.nan},
        "kv_bytes_per_request": (float(np.mean([r.kv_bytes for r in ok if r.transfer_ms
                                                is not None])) if transfers else 0.0),
    }


class _Server:
    """A MeshServeServer over `slices` on a free loopback port, its loop in a thread."""

    def __init__(self, slices, tokenizer, info):
        from meshserve.serving.server import MeshServeServer, ServerOptions

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = MeshServeServer(slices, tokenizer, info, ServerOptions(port=0))
        port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)
        self.target = f"127.0.0.1:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(
            self.server.stop(0.0, shutdown_engines=False), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _slices(base, config: str):
    from meshserve.serving.slices import BOTH, DECODE, PREFILL

    roles = (BOTH, BOTH) if config == "colocated" else (PREFILL, DECODE)
    return [dataclasses.replace(s, role=role, inflight_requests=0, inflight_tokens=0,
                                routed=0) for s, role in zip(base, roles, strict=True)]


def _merge(runs: list[tuple[list[Timed], float]], slo) -> dict:
    results = [r for rs, _ in runs for r in rs]
    return summarize(results, sum(d for _, d in runs), slo)


def describe(summary: dict) -> str:
    rows = [("TTFT p99 all (ms)", "ttft_ms", "p99"), ("TTFT p99 long (ms)", "ttft_long_ms",
            "p99"), ("TTFT p50 short (ms)", "ttft_short_ms", "p50"),
            ("ITL p50 short (ms)", "itl_short_ms", "p50"),
            ("ITL p99 short (ms)", "itl_short_ms", "p99"),
            ("ITL max short (ms)", "itl_short_ms", "max"),
            ("KV transfer mean (ms)", "kv_transfer_ms", "mean"),
            ("KV transfer p99 (ms)", "kv_transfer_ms", "p99")]
    c, d = summary["colocated"], summary["disaggregated"]
    lines = [f"{'':<24}{'colocated':>12}{'disaggregated':>15}{'P/D ÷ colo':>12}"]
    for label, key, stat in rows:
        a, b = c[key][stat], d[key][stat]
        ratio = b / a if a and not math.isnan(a) and not math.isnan(b) else math.nan
        lines.append(f"{label:<24}{a:>12.1f}{b:>15.1f}{ratio:>12.2f}")
    for label, key in (("goodput (req/s)", "goodput"), ("output tok/s", "output_throughput"),
                       ("KV bytes / request", "kv_bytes_per_request")):
        a, b = c[key], d[key]
        ratio = b / a if a else math.nan
        lines.append(f"{label:<24}{a:>12.1f}{b:>15.1f}{ratio:>12.2f}")
    lines.append(f"within SLO {c['slo']}: {c['within_slo']} vs {d['within_slo']} "
                 f"of {c['completed']} (failed: {c['failed']} vs {d['failed']})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    del argv
    import jax

    from meshserve.engine.engine import EngineConfig
    from meshserve.serving import launch

    f = flags.FLAGS
    slo = parse_slo(f.slo)
    max_len = max(f.short_input + f.short_output, f.long_input + f.long_output)
    # One token and one batch bucket: few programs, compiled once for both setups. No
    # prefix cache: both setups see the same prompts.
    engine_config = EngineConfig(
        page_size=f.page_size, max_seqs=f.max_seqs, max_step_tokens=f.max_step_tokens,
        min_token_bucket=f.max_step_tokens, min_seq_bucket=f.max_seqs,
        max_model_len=max_len, decode_steps=f.decode_steps, prefix_caching=False,
        max_waiting_tokens=1 << 22)
    if f.demo:
        import tempfile

        from meshserve.models.demo import ensure_demo_checkpoint

        ckpt = ensure_demo_checkpoint(tempfile.mkdtemp(prefix="meshserve-demo-") + "/demo")
        model = launch.load(ckpt, f.mesh, 2, f.dtype or "float32", engine_config, warmup=True)
    else:
        with checkpoint_dir() as ckpt:
            model = launch.load(ckpt, f.mesh, 2, f.dtype or "float32", engine_config,
                                warmup=True)
    try:
        for s in model.slices:  # either may prefill or decode (colocated)
            s.engine.warmup_handoff()
        warm_s, _, _ = launch.warm_up(model)
        items = workload(f, model.slices[0].engine.vocab_size)
        runs: dict[str, list] = {c: [] for c in CONFIGS}
        for _ in range(f.rounds):
            for config in CONFIGS:
                server = _Server(_slices(model.slices, config), model.tokenizer, model.info)
                try:
                    runs[config].append(asyncio.run(_drive(server.target, items)))
                finally:
                    server.stop()
        summary = {c: _merge(runs[c], slo) for c in CONFIGS}
    finally:
        for s in model.slices:
            s.engine.shutdown(timeout=10.0)
    summary["setup"] = {
        "devices": [list(s.devices) for s in model.slices], "layout": model.slices[0].layout,
        "backend": jax.default_backend(), "warmup_s": warm_s, "rounds": f.rounds,
        "short": [f.short, f.short_input, f.short_output],
        "long": [f.long, f.long_input, f.long_output, f.long_start_ms, f.long_gap_ms],
        "max_step_tokens": f.max_step_tokens, "max_seqs": f.max_seqs,
        "decode_steps": f.decode_steps, "model": model.info.name,
    }
    print(describe(summary))
    print(json.dumps(summary, indent=1))
    if f.out:
        write_json(f.out, summary)
    return 0
