"""From a checkpoint directory to a running server (what `meshserve serve` does).

Start-up: the model is loaded onto every slice, the gRPC server starts (liveness
SERVING, readiness NOT_SERVING), the engines compile their programs (or load them from
the persistent compilation cache), and only then does readiness turn SERVING. The
phases' times are logged, exported as gauges and returned by GetServerInfo.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time

from meshserve.engine.engine import EngineConfig
from meshserve.meshes import CompileCounter, programs_shared_across_device_groups
from meshserve.serving import logs
from meshserve.serving.server import MeshServeServer, ServerOptions
from meshserve.serving.slices import (
    BOTH,
    DECODE,
    PREFILL,
    ModelInfo,
    Slice,
    build_slices,
    model_info,
)


@dataclasses.dataclass
class LoadedModel:
    slices: list[Slice]  # engines built, not yet warmed up or started
    tokenizer: object  # models.tokenizer.Tokenizer | None
    info: ModelInfo
    warmup: bool
    load_seconds: float


def load(ckpt_dir: str, mesh: str, num_slices: int, dtype: str,
         engine_config: EngineConfig, source: str | None = None,
         warmup: bool = False, load_started: float | None = None,
         prefill_slices: int = 0, prefill_mesh: str | None = None) -> LoadedModel:
    """Tokenizer (sentencepiece or HF, BOS/EOS from the config) and one engine per slice.
    load_started: when loading began (time.monotonic(); e.g. before an --hf conversion).
    prefill_slices: that many slices (layout `prefill_mesh`, default `mesh`) prefill only,
    the others decode only (serving/disagg.py)."""
    from meshserve.models.checkpoint import checkpoint_config
    from meshserve.models.tokenizer import find_tokenizer

    start = time.monotonic() if load_started is None else load_started
    if num_slices < 1:
        raise ValueError(f"--slices must be >= 1, got {num_slices}")
    cfg = checkpoint_config(ckpt_dir)
    tokenizer = find_tokenizer(ckpt_dir, cfg)
    info = model_info(ckpt_dir, dtype, source)
    slices = build_slices(ckpt_dir, mesh, num_slices, dtype, engine_config, tokenizer,
                          start=False, prefill_slices=prefill_slices,
                          prefill_layout=prefill_mesh)
    load_seconds = time.monotonic() - start
    logs.event("model_loaded", model=info.name, dtype=dtype, slices=len(slices),
               layout=slices[-1].layout, prefill_slices=prefill_slices,
               prefill_layout=slices[0].layout if prefill_slices else None,
               tokenizer=getattr(tokenizer, "path", None),
               max_model_len=slices[0].engine.max_model_len, seconds=round(load_seconds, 2))
    return LoadedModel(slices, tokenizer, info, warmup, load_seconds)


def warm_up(model: LoadedModel, server_role: str = BOTH) -> tuple[float, int, int]:
    """Compile every engine's programs (when asked) and start the engines; returns
    (seconds, programs built, of which from the persistent cache). server_role: the
    server's cross-process P/D role (`serve --role prefill|decode`), whose handoff
    programs every slice then needs."""
    counter, start = CompileCounter(), time.monotonic()

    def warm(s: Slice) -> None:
        def progress(done: int, total: int, seconds: float) -> None:
            programs, cached = counter.counts()
            logs.event("warmup_progress", slice=s.index, programs_done=done,
                       programs_total=total, seconds=round(seconds, 1),
                       built=programs, from_cache=cached)

        s.engine.warmup(progress=progress)
        role = s.role if s.role != BOTH else server_role
        if role in (PREFILL, DECODE):  # the KV handoff's programs: no handoff compiles
            s.engine.warmup_handoff(export=role == PREFILL, imports=role == DECODE)

    if model.warmup:
        with concurrent.futures.ThreadPoolExecutor(len(model.slices)) as pool:
            for wave in _warmup_waves(model.slices):
                list(pool.map(warm, wave))
    for s in model.slices:
        s.engine.start()
    programs, cached = counter.counts()
    return time.monotonic() - start, programs, cached


def _warmup_waves(slices: list[Slice]) -> list[list[Slice]]:
    """Slices are independent device groups, so their compiles can run side by side. But
    where the persistent cache serves one device group's programs to another (CPU, GPU),
    slices of one layout compile the same programs: one of each layout compiles first,
    and the rest then load its programs instead of compiling them again."""
    if not programs_shared_across_device_groups():
        return [slices]
    first: dict[str, Slice] = {}
    for s in slices:
        first.setdefault(s.layout, s)
    rest = [s for s in slices if first[s.layout] is not s]
    return [list(first.values()), rest] if rest else [slices]


def serve(model: LoadedModel, options: ServerOptions, process_start: float | None = None) -> int:
    """Serve until SIGTERM/SIGINT, drain within the grace period, return 0.
    process_start: time.monotonic() when the process began (for the start-up split)."""
    server = MeshServeServer(model.slices, model.tokenizer, model.info, options)
    begun = time.monotonic() if process_start is None else process_start

    def prepare() -> None:
        seconds, programs, cached = warm_up(model, options.disagg.role)
        ready = time.monotonic() - begun
        server.record_startup(load_seconds=model.load_seconds, warmup_seconds=seconds,
                              ready_seconds=ready, programs=programs, from_cache=cached)

    try:
        asyncio.run(server.run_until_signal(prepare))
    finally:
        for s in model.slices:  # no-op after a clean stop; frees threads after an error
            s.engine.shutdown(timeout=5.0)
    return 0
