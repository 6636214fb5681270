"""Slices (one engine on its own device group each) and the router that picks one.

`--slices N` splits the devices into N equal groups; each group gets its own mesh, its
own copy of the weights and its own engine with its own batch and KV pages. Requests
go to the healthy slice with the least work; a slice whose engine died is skipped.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence

from meshserve.engine.engine import Engine, EngineConfig, EngineDeadError, EngineOverloadedError
from meshserve.engine.outputs import EngineStats
from meshserve.engine.sampling_params import SamplingParams
from meshserve.serving import logs


class NoHealthySliceError(Exception):
    """Every slice's engine has stopped: the request cannot be served (UNAVAILABLE)."""


@dataclasses.dataclass
class Slice:
    index: int
    engine: Engine
    layout: str  # the per-slice mesh layout, e.g. "data=1,tensor=2,expert=1,sequence=1"
    devices: tuple[str, ...]
    # Router-side accounting, updated at once (engine stats lag behind by a step), so a
    # burst of simultaneous requests is spread instead of all landing on one slice.
    inflight_requests: int = 0
    inflight_tokens: int = 0
    routed: int = 0

    @property
    def healthy(self) -> bool:
        return bool(self.engine.healthy)

    def stats(self) -> EngineStats:
        return self.engine.stats()


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What GetServerInfo reports about the model (the same on every slice)."""

    name: str
    architecture: str
    dtype: str
    demo: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


def model_info(ckpt_dir: str, dtype: str, source: str | None = None) -> ModelInfo:
    from meshserve.models.checkpoint import read_manifest
    from meshserve.models.config import ModelConfig

    manifest = read_manifest(ckpt_dir)
    cfg = ModelConfig.from_json(manifest["config"])
    name = manifest.get("label") or os.path.basename(
        os.path.normpath(source or manifest.get("source") or ckpt_dir)
    )
    return ModelInfo(
        name=name,
        architecture=cfg.architecture,
        dtype=dtype,
        demo=bool(manifest.get("demo", False)),
        bos_token_id=cfg.bos_token_id,
        eos_token_ids=tuple(cfg.eos_token_ids),
    )


def build_slices(ckpt_dir: str, layout_text: str, num_slices: int, dtype: str,
                 engine_config: EngineConfig, tokenizer, warmup: bool = False,
                 start: bool = True) -> list[Slice]:
    """Load the checkpoint once per slice, each into its own mesh, and start the engines.

    warmup compiles every program before the engine thread starts (it must not run
    beside the step loop), so that no request waits for a compilation later. With
    start=False the engines are neither warmed up nor started: the caller does both.
    """
    import jax.numpy as jnp

    from meshserve.meshes import parse_layout, split_slices
    from meshserve.models.checkpoint import checkpoint_config
    from meshserve.models.loading import load_checkpoint, memory_plan

    layout = parse_layout(layout_text)
    if layout.slices != 1 and layout.slices != num_slices:
        raise ValueError(
            f"--mesh says slices={layout.slices} but --slices is {num_slices}; give one"
        )
    layout = dataclasses.replace(layout, slices=max(num_slices, layout.slices))
    meshes = split_slices(layout)
    # Refuse a layout that cannot hold the weights plus one full-length sequence before
    # anything is loaded.
    cfg = checkpoint_config(ckpt_dir)
    max_len = engine_config.max_model_len or cfg.max_position_embeddings
    memory_plan(cfg, meshes[0], jnp.dtype(dtype), max_len,
                max_step_tokens=engine_config.max_step_tokens,
                capacity_bytes=engine_config.device_memory_bytes).check()
    slices: list[Slice] = []
    try:
        for index, mesh in enumerate(meshes):
            model = load_checkpoint(ckpt_dir, mesh, jnp.dtype(dtype))
            engine = Engine(model, engine_config, tokenizer)
            if index == 0:  # what is allocated per device, KV pool as sized
                pool = engine.kv_pool
                actual = memory_plan(cfg, mesh, jnp.dtype(dtype),
                                     pool.pages * engine_config.page_size,
                                     max_step_tokens=engine_config.max_step_tokens,
                                     capacity_bytes=engine_config.device_memory_bytes)
                logs.event("memory_plan", detail=actual.describe(), kv_pool=pool.describe())
            if start and warmup:
                engine.warmup()
            if start:
                engine.start()
            devices = tuple(str(d) for d in mesh.devices.flat)
            slices.append(Slice(index, engine, layout.to_string(), devices))
    except BaseException:
        for s in slices:
            s.engine.shutdown(timeout=5.0)
        raise
    return slices


class Router:
    """Least-loaded healthy slice first; ties go to more free KV pages, then to the slice
    that was sent fewer requests (round robin when idle)."""

    def __init__(self, slices: Sequence[Slice]):
        if not slices:
            raise ValueError("the router needs at least one slice")
        self.slices = list(slices)
        self._lock = threading.Lock()

    def healthy(self) -> list[Slice]:
        return [s for s in self.slices if s.healthy]

    def _order(self) -> list[Slice]:
        def key(s: Slice) -> tuple[int, int, int]:
            st = s.stats()
            load = st.waiting_tokens + st.running_tokens + s.inflight_tokens
            return (load, -st.free_pages, s.routed)

        return sorted(self.healthy(), key=key)

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
               cost_tokens: int, priority: int = 0, cache_salt: str = ""):
        """Add the request to the best slice; returns (slice, handle).

        Raises InvalidRequestError at once; EngineOverloadedError only when every healthy
        slice's waiting queue is full; NoHealthySliceError when no slice can take it.
        """
        with self._lock:
            order = self._order()
            if not order:
                raise NoHealthySliceError("no healthy slice: every engine has stopped")
            overloaded: EngineOverloadedError | None = None
            for s in order:
                try:
                    handle = s.engine.add_request(prompt_ids, params, request_id=request_id,
                                                  priority=priority, cache_salt=cache_salt)
                except EngineOverloadedError as e:
                    overloaded = e
                    continue
                except EngineDeadError:
                    continue  # died since the health check: try the next slice
                s.inflight_requests += 1
                s.inflight_tokens += cost_tokens
                s.routed += 1
                return s, handle
            if overloaded is not None:
                raise overloaded
            raise NoHealthySliceError("no healthy slice: every engine has stopped")

    def release(self, s: Slice, cost_tokens: int) -> None:
        with self._lock:
            s.inflight_requests -= 1
            s.inflight_tokens -= cost_tokens
