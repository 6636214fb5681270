"""Planning and measuring one layout for `meshserve bench-mesh`.

A layout is first checked and sized by the memory planner (nothing is loaded); one that
fits is loaded once per slice, warmed up, and driven by the same workload the server
would see: per-slice engines behind `serving.slices.Router`, the server's router, with
requests arriving on a Poisson clock and streamed back as the engines produce them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import time
from collections.abc import Callable

import numpy as np

from meshserve.engine.engine import Engine, EngineConfig
from meshserve.engine.experts import hotspot_ratios
from meshserve.engine.sampling_params import SamplingParams
from meshserve.meshes import LayoutError, MeshLayout, bytes_per_device, make_mesh, split_slices
from meshserve.models.config import ModelConfig
from meshserve.models.loading import (
    layout_problems,
    load_checkpoint,
    memory_plan,
    param_specs,
    sharding_rules,
)
from meshserve.tools.bench_mesh_hlo import (
    decode_collectives,
    megatron_min_all_reduces,
    program_collectives,
)
from meshserve.tools.bench_mesh_report import REQUIRED_KEYS
from meshserve.tools.bench_serving import Result, arrival_times, lengths, summarize


@dataclasses.dataclass(frozen=True)
class Workload:
    """vLLM `bench serve` random dataset: uniform lengths, Poisson (gamma) arrivals."""

    num_requests: int = 32
    request_rate: float = math.inf
    max_concurrency: int | None = None
    input_len: int = 64
    output_len: int = 32
    range_ratio: float = 0.0
    burstiness: float = 1.0
    seed: int = 0
    max_duration: float = 600.0  # per layout: later requests are cancelled and fail
    # After the workload, one prompt of this many tokens alone (0: none): its TTFT.
    long_prompt_len: int = 0

    def requests(self, vocab_size: int) -> tuple[list[list[int]], list[int], np.ndarray]:
        """The same prompts, output lengths and arrival times for every layout."""
        rng = np.random.default_rng(self.seed)
        ins = lengths(rng, self.input_len, self.range_ratio, self.num_requests)
        outs = lengths(rng, self.output_len, self.range_ratio, self.num_requests)
        low = min(3, vocab_size - 1)  # skip the usual unk/bos/eos ids, as bench-serving
        prompts = [rng.integers(low, vocab_size, size=int(n)).tolist() for n in ins]
        starts = arrival_times(rng, self.num_requests, self.request_rate, self.burstiness)
        return prompts, [int(o) for o in outs], starts

    def max_total_len(self) -> int:
        hi = lambda mean: max(1, int(mean * (1 + self.range_ratio)))  # noqa: E731
        return max(hi(self.input_len) + hi(self.output_len), self.long_prompt_len + 1)

    def concurrency(self) -> int:
        return min(self.num_requests, self.max_concurrency or self.num_requests)


def engine_config_for(workload: Workload, base: EngineConfig, model_max_len: int) -> EngineConfig:
    """Fill the workload-dependent blanks: model length and a page pool holding a full
    batch of the longest requests (so every layout gets the same KV room per request)."""
    max_len = base.max_model_len or min(model_max_len, workload.max_total_len())
    num_pages = base.num_pages or base.max_seqs * math.ceil(max_len / base.page_size) + 1
    return dataclasses.replace(base, max_model_len=max_len, num_pages=num_pages)


def plan_layout(cfg: ModelConfig, layout: MeshLayout, dtype, engine_cfg: EngineConfig,
                capacity_bytes: int | None, num_devices: int) -> dict:
    """fits / reason and per-device bytes, from the layout rules and the memory planner."""
    row: dict = {**dict.fromkeys(REQUIRED_KEYS), "layout": layout.to_string(with_slices=True),
                 "fits": False}
    problems = layout_problems(cfg, layout)
    if layout.num_devices > num_devices:
        problems.append(f"needs {layout.num_devices} devices, {num_devices} exist")
    if problems:
        row["reason"] = "; ".join(problems)
        return row
    engine_cfg = layout_engine_config(engine_cfg, layout)
    try:
        plan = memory_plan(cfg, make_mesh(layout), dtype,
                           engine_cfg.num_pages * engine_cfg.page_size,
                           max_step_tokens=engine_cfg.max_step_tokens,
                           capacity_bytes=capacity_bytes)
    except (LayoutError, ValueError) as e:
        row["reason"] = str(e)
        return row
    row.update(weights_bytes_per_device=plan.weights_bytes, kv_bytes_per_device=plan.kv_bytes,
               reserve_bytes_per_device=plan.reserve_bytes,
               capacity_bytes_per_device=plan.capacity_bytes, fits=plan.fits)
    if not plan.fits:
        row["reason"] = f"does not fit: {plan.describe()}"
    if cfg.moe_layers:  # part of weights_bytes_per_device: what expert parallelism splits
        rules = sharding_rules(cfg, make_mesh(layout))
        row["expert_weights_bytes_per_device"] = sum(
            bytes_per_device(spec, rules) for spec in param_specs(cfg, dtype)
            if "experts" in spec.axes)
    return row


def routing_summary(slices: list, expert_devices: int) -> dict:
    """MoE routing over the run, all slices together: token slots per (MoE layer, expert),
    and per layer the busiest expert device's slots ÷ the mean (docs/design.md)."""
    stats = [s.engine.stats() for s in slices]
    if stats[0].expert_tokens is None:
        return {}
    counts = sum(st.expert_tokens for st in stats)
    ratios = hotspot_ratios(counts, expert_devices)
    return {"expert_tokens": counts.tolist(), "expert_devices": expert_devices,
            "expert_hotspot_ratio_per_layer": ratios.tolist(),
            "expert_hotspot_ratio": float(np.nanmax(ratios)) if counts.any() else None,
            "moe_dropped_tokens": sum(st.moe_dropped_tokens for st in stats)}


class _CompileCounter:
    """Counts XLA compilations (a compile during the measured run would be a warm-up
    gap, and its seconds would land in some request's latency)."""

    def __init__(self) -> None:
        from jax import monitoring

        self.count = 0
        self.active = False
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, _secs: float, **_kw) -> None:
        if self.active and "backend_compile" in name:
            self.count += 1


_COUNTER: _CompileCounter | None = None


def _compile_counter() -> _CompileCounter:
    global _COUNTER
    if _COUNTER is None:  # jax.monitoring has no unregister: one listener per process
        _COUNTER = _CompileCounter()
    return _COUNTER


def layout_engine_config(engine_cfg: EngineConfig, layout: MeshLayout) -> EngineConfig:
    """The pool rounded up to a multiple of `sequence`: each sequence's pages are split
    over it (context parallelism) and every device holds the same number."""
    ways = layout.sequence
    if engine_cfg.num_pages is None or engine_cfg.num_pages % ways == 0:
        return engine_cfg
    pages = math.ceil(engine_cfg.num_pages / ways) * ways
    return dataclasses.replace(engine_cfg, num_pages=pages)


def build_engines(ckpt: str, layout: MeshLayout, dtype, engine_cfg: EngineConfig) -> list:
    """One engine per slice, warmed up before its loop starts (as serving's build_slices).

    Warm-up runs twice: the step programs return the cache and token statistics with the
    shardings XLA propagated (not the ones they were created with), so the first pass
    compiles its first bucket for the initial shardings and the second pass compiles
    the steady-state variant; every later pass is a no-op.
    """
    from meshserve.serving.slices import Slice

    slices = []
    try:
        for index, mesh in enumerate(split_slices(layout)):
            engine = Engine(load_checkpoint(ckpt, mesh, dtype), engine_cfg, None)
            engine.warmup()
            engine.warmup()
            slices.append(Slice(index, engine, layout.to_string(),
                                tuple(str(d) for d in mesh.devices.flat)))
    except BaseException:
        shutdown(slices)
        raise
    for s in slices:
        s.engine.start()
    return slices


def shutdown(slices: list) -> None:
    for s in slices:
        s.engine.shutdown(timeout=10.0)
    slices.clear()
    gc.collect()  # drop the weights and caches before the next layout loads


def decode_hlo(engine: Engine, seqs: int) -> str:
    """HLO text of the engine's compiled decode program for the `seqs` bucket, with the
    engine's current (steady-state) cache shardings: the program the workload runs."""
    from meshserve.engine.batching import build_inputs
    from meshserve.engine.scheduler import StepPlan

    cfg = engine.config
    # decode_steps=1 has no decode loop: decodes run as mixed steps of one token each.
    loop = cfg.decode_steps > 1
    t, s = cfg.buckets(loop, seqs)
    plan = StepPlan(decode=loop, shards=[[] for _ in range(engine.data_shards)])
    inputs = engine._put(build_inputs(plan, cfg, engine.pages_per_seq, 0, t, s))
    lowered = engine._fns.lower(engine._kv, engine._counts, engine._seen, inputs, loop)
    return lowered.compile().as_text()


def prefill_hlo(engine: Engine) -> tuple[str, int]:
    """HLO text of the mixed step at the largest token bucket (a prefill chunk), and that
    bucket: every collective in it runs once per chunk."""
    from meshserve.engine.batching import build_inputs
    from meshserve.engine.scheduler import StepPlan

    cfg = engine.config
    t, s = cfg.buckets(False, 1, cfg.max_step_tokens)
    plan = StepPlan(decode=False, shards=[[] for _ in range(engine.data_shards)])
    inputs = engine._put(build_inputs(plan, cfg, engine.pages_per_seq, 0, t, s))
    lowered = engine._fns.lower(engine._kv, engine._counts, engine._seen, inputs, False)
    return lowered.compile().as_text(), t


async def _one(router, index: int, prompt: list[int], out_len: int) -> Result:
    from meshserve.serving.slices import NoHealthySliceError

    result = Result(input_len=len(prompt))
    cost = len(prompt) + out_len  # what the server's router balances (prompt + max_tokens)
    params = SamplingParams(max_tokens=out_len, ignore_eos=True)
    try:
        routed = router.submit(prompt, params, f"bench-{index}", cost)
        chosen, handle = routed.slice, routed.handle
    except (NoHealthySliceError, RuntimeError, ValueError) as e:
        result.error = type(e).__name__
        return result
    try:
        async for chunk in handle.stream():
            n = len(chunk.token_ids)
            if n:
                result.arrived(n)
            if chunk.error:
                result.error = "engine error"
        result.e2e = time.perf_counter() - result.start
        if result.ttft is None and result.error is None:
            result.error = "no tokens"
    finally:
        if result.e2e is None:
            handle.cancel()
        router.release(chosen, cost)
    return result


async def drive(router, workload: Workload, requests) -> dict:
    """Send the workload through the router; the summary of tools/bench_serving."""
    prompts, outs, starts = requests
    limit = asyncio.Semaphore(workload.concurrency())
    t0 = time.perf_counter()

    async def scheduled(i: int) -> Result:
        await asyncio.sleep(max(0.0, starts[i] - (time.perf_counter() - t0)))
        async with limit:
            return await _one(router, i, prompts[i], outs[i])

    tasks = [asyncio.create_task(scheduled(i)) for i in range(len(prompts))]
    done, pending = await asyncio.wait(tasks, timeout=workload.max_duration)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    results = [t.result() if t in done else Result(len(prompts[i]), error="max_duration")
               for i, t in enumerate(tasks)]
    return {"results": results, "duration": time.perf_counter() - t0}


def run_layout(ckpt: str, cfg: ModelConfig, layout: MeshLayout, dtype, engine_cfg: EngineConfig,
               workload: Workload, slo: dict[str, float],
               log: Callable[[str], None] = print) -> dict:
    """Load, warm up, measure and count collectives for one fitting layout."""
    from meshserve.serving.slices import Router

    counter = _compile_counter()
    t0 = time.perf_counter()
    engine_cfg = layout_engine_config(engine_cfg, layout)
    slices = build_engines(ckpt, layout, dtype, engine_cfg)
    try:
        loaded = time.perf_counter() - t0
        per_shard = math.ceil(workload.concurrency() / (layout.slices * layout.data))
        seqs = min(engine_cfg.max_seqs, per_shard)
        engine = slices[0].engine
        collectives = decode_collectives(decode_hlo(engine, seqs), layout.axis_sizes())
        hlo, chunk = prefill_hlo(engine)
        prefill_counts, prefill_bytes = program_collectives(hlo, layout.axis_sizes())
        # The axis the weights are split over (Megatron's all-reduces run over it).
        weight_axis = engine.model.rules.mapping.get("heads")
        log(f"  loaded and warmed up {layout.slices} slice(s) in {loaded:.1f}s; measuring")
        counter.count, counter.active = 0, True
        try:
            run = asyncio.run(drive(Router(slices), workload, workload.requests(cfg.vocab_size)))
        finally:
            counter.active = False
        # Warm-up runs only padding, which is not counted: these are the workload's.
        routing = routing_summary(slices, layout.expert)
        long_ttft = None
        if workload.long_prompt_len:
            long = dataclasses.replace(workload, num_requests=1, request_rate=math.inf,
                                       input_len=workload.long_prompt_len, output_len=1,
                                       range_ratio=0.0)
            alone = asyncio.run(drive(Router(slices), long, long.requests(cfg.vocab_size)))
            result = alone["results"][0]
            if result.error is not None:
                raise RuntimeError(f"the {long.input_len}-token prompt failed: {result.error}")
            long_ttft = 1e3 * result.ttft
    finally:
        shutdown(slices)
    summary = summarize(run["results"], run["duration"], slo)
    minimum = megatron_min_all_reduces(cfg.num_layers, layout.tensor)
    model_parallel = collectives.per_step_over((weight_axis,))["all-reduce"]
    by_axis: dict[str, dict[str, int]] = {}
    for c in collectives.items:
        if c.where == "step":
            counts = by_axis.setdefault("+".join(c.axes), {})
            counts[c.kind] = counts.get(c.kind, 0) + 1
    return {
        "ttft_ms_p50": summary["ttft_ms"]["p50"], "ttft_ms_p99": summary["ttft_ms"]["p99"],
        "tpot_ms_p50": summary["tpot_ms"]["p50"], "tpot_ms_p99": summary["tpot_ms"]["p99"],
        "itl_ms_p50": summary["itl_ms"]["p50"], "e2e_ms_p99": summary["e2e_ms"]["p99"],
        "output_tokens_per_s": summary["output_throughput"],
        "request_throughput_rps": summary["request_throughput"],
        "goodput_rps": summary["goodput"],
        "completed": summary["completed"], "failed": summary["failed"],
        "errors": summary["errors"], "duration_s": summary["duration_s"],
        "total_output_tokens": summary["total_output_tokens"],
        "load_and_warmup_s": loaded, "compiles_during_run": counter.count,
        "collectives_per_step": collectives.per_step,
        "collective_bytes_per_step": collectives.bytes_per_step,
        "collectives_by_axis_per_step": by_axis,
        "collectives_conditional": collectives.conditional,
        "collectives_nested_loop": collectives.nested_loop,
        "collectives_per_call": collectives.per_call,
        "collective_sources": collectives.sources(),
        "collectives_decode_seqs": seqs,
        # The mixed step at its largest bucket, per token of that chunk (prefill).
        "collectives_per_prefill_chunk": prefill_counts,
        "prefill_chunk_tokens": chunk,
        "collective_bytes_per_prefill_token": {k: v / chunk for k, v in prefill_bytes.items()},
        "long_prompt_tokens": workload.long_prompt_len or None,
        "long_prompt_ttft_ms": long_ttft,
        "megatron_min_all_reduces": minimum,
        "model_parallel_axis": weight_axis,
        "model_parallel_all_reduces_per_step": model_parallel,
        "all_reduce_ratio_to_megatron": model_parallel / minimum if minimum else None,
        **routing,
    }
