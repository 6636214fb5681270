"""Slices (one engine on its own device group each) and the router that picks one.

`--slices N` splits the devices into N equal groups; each group gets its own mesh, its
own copy of the weights and its own engine with its own batch and KV pages. Requests
go to a healthy slice chosen by load and, with the prefix cache, by the prompt prefix
it already holds (serving/routing.py); a slice whose engine died is skipped.

Prefill/decode disaggregation (`--prefill-slices P`): the first P slices (their own
layout, `--prefill-mesh`) only prefill; the router sends new requests there and, once
the first token is out, picks a decode slice for the KV (serving/disagg.py).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence

from meshserve.engine.engine import (
    Engine,
    EngineConfig,
    EngineDeadError,
    EngineOverloadedError,
    RequestHandle,
)
from meshserve.engine.outputs import EngineStats
from meshserve.engine.sampling_params import SamplingParams
from meshserve.serving import logs
from meshserve.serving.routing import (
    CACHE,
    LOAD,
    ONLY_HEALTHY,
    PrefixIndex,
    RoutingConfig,
    cache_score,
    request_digests,
    skewed,
)

# Slice roles: both (prefill and decode, colocated), prefill only, decode only.
BOTH, PREFILL, DECODE = "both", "prefill", "decode"


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
    role: str = BOTH

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
    from meshserve.models.checkpoint import checkpoint_config, read_manifest

    manifest = read_manifest(ckpt_dir)
    cfg = checkpoint_config(ckpt_dir)
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


def _meshes(layout_text: str, num_slices: int, prefill_slices: int,
            prefill_layout_text: str | None) -> list[tuple[object, str, str]]:
    """(mesh, layout, role) per slice: prefill slices first, on the first devices."""
    import jax

    from meshserve.meshes import parse_layout, split_slices

    layout = parse_layout(layout_text)
    if layout.slices != 1 and layout.slices != num_slices:
        raise ValueError(
            f"--mesh says slices={layout.slices} but --slices is {num_slices}; give one"
        )
    num_slices = max(num_slices, layout.slices)
    if not prefill_slices:
        if prefill_layout_text:
            raise ValueError("--prefill-mesh needs --prefill-slices")
        layout = dataclasses.replace(layout, slices=num_slices)
        return [(m, layout.to_string(), BOTH) for m in split_slices(layout)]
    if not 0 < prefill_slices < num_slices:
        raise ValueError(f"--prefill-slices must be in [1, --slices - 1 = {num_slices - 1}] "
                         f"(the other slices decode), got {prefill_slices}")
    pre = parse_layout(prefill_layout_text) if prefill_layout_text else layout
    pre = dataclasses.replace(pre, slices=prefill_slices)
    dec = dataclasses.replace(layout, slices=num_slices - prefill_slices)
    devices = jax.devices()
    if pre.num_devices + dec.num_devices > len(devices):
        raise ValueError(f"{prefill_slices} prefill slices of {pre.to_string()} and "
                         f"{dec.slices} decode slices of {dec.to_string()} need "
                         f"{pre.num_devices + dec.num_devices} devices, {len(devices)} exist")
    return ([(m, pre.to_string(), PREFILL) for m in split_slices(pre, devices)]
            + [(m, dec.to_string(), DECODE)
               for m in split_slices(dec, devices[pre.num_devices:])])


def build_slices(ckpt_dir: str, layout_text: str, num_slices: int, dtype: str,
                 engine_config: EngineConfig, tokenizer, warmup: bool = False,
                 start: bool = True, prefill_slices: int = 0,
                 prefill_layout: str | None = None) -> list[Slice]:
    """Load the checkpoint once per slice, each into its own mesh, and start the engines.

    warmup compiles every program before the engine thread starts (it must not run
    beside the step loop), so that no request waits for a compilation later. With
    start=False the engines are neither warmed up nor started: the caller does both.
    prefill_slices: that many slices (of `prefill_layout`, default the same) prefill only.
    """
    import jax.numpy as jnp

    from meshserve.models.checkpoint import checkpoint_config
    from meshserve.models.loading import load_checkpoint, memory_plan

    meshes = _meshes(layout_text, num_slices, prefill_slices, prefill_layout)
    # Refuse a layout that cannot hold the weights plus one full-length sequence before
    # anything is loaded.
    cfg = checkpoint_config(ckpt_dir)
    max_len = engine_config.max_model_len or cfg.max_position_embeddings
    for mesh in {layout: mesh for mesh, layout, _ in meshes}.values():
        memory_plan(cfg, mesh, jnp.dtype(dtype), max_len,
                    max_step_tokens=engine_config.max_step_tokens,
                    capacity_bytes=engine_config.device_memory_bytes).check()
    slices: list[Slice] = []
    try:
        for index, (mesh, layout, role) in enumerate(meshes):
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
            slices.append(Slice(index, engine, layout, devices, role=role))
    except BaseException:
        for s in slices:
            s.engine.shutdown(timeout=5.0)
        raise
    return slices


@dataclasses.dataclass(frozen=True)
class Routed:
    """Where the router sent a request and why (serving.routing.REASONS), with the prompt
    tokens it expected that slice to have cached."""

    slice: Slice
    handle: RequestHandle
    reason: str
    matched_tokens: int


class Router:
    """Picks a healthy slice for each request (serving/routing.py for the policy).

    Load is a slice's queued + running tokens plus what the router sent it that has not
    finished (engine stats lag a step behind), ties going to more free KV pages, then to
    the slice that was sent fewer requests (round robin when idle). Cache-aware
    (RoutingConfig.cache_aware, with two or more slices and the engines' prefix cache
    on): while loads are balanced the slice with the best `matched - load_weight * load`
    score wins. A slice out of rotation (its engine stopped) or restarted (a new engine)
    starts with an empty index.

    With prefill and decode slices, new requests go to the prefill slices only (the same
    policy among them), prefill-only; `decode_order` ranks the decode slices for a KV
    handoff.
    """

    def __init__(self, slices: Sequence[Slice], config: RoutingConfig | None = None):
        if not slices:
            raise ValueError("the router needs at least one slice")
        self.slices = list(slices)
        self.entry = [s for s in self.slices if s.role != DECODE]  # where requests start
        self.decoders = [s for s in self.slices if s.role == DECODE]
        self.disaggregated = bool(self.decoders)
        if not self.entry or (self.disaggregated and any(s.role == BOTH for s in slices)):
            raise ValueError("slices must all be colocated, or prefill and decode ones")
        self.config = config or RoutingConfig()
        self._lock = threading.Lock()
        self._indexes: dict[int, PrefixIndex] = {}
        self.page_size = self.slices[0].engine.config.page_size
        self.cache_aware = (self.config.cache_aware and len(self.entry) > 1
                            and all(s.engine.config.prefix_caching for s in self.entry))
        with self._lock:
            for s in self.entry:  # read what the engines cached before this router
                self._index(s)

    def healthy(self) -> list[Slice]:
        return [s for s in self.slices if s.healthy]

    def serving(self) -> bool:
        """A request can be served: a healthy slice to start on (and one to decode on)."""
        return (any(s.healthy for s in self.entry)
                and (not self.disaggregated or any(s.healthy for s in self.decoders)))

    def decode_order(self, pages: int) -> list[Slice]:
        """Healthy decode slices best first for a request needing `pages` KV pages: those
        with that many free first, then the fewest running + queued + handed-off tokens,
        then the most free pages."""
        def key(s: Slice) -> tuple[bool, int, int]:
            st = s.stats()
            return (st.free_pages < pages, st.running_tokens + st.waiting_tokens
                    + s.inflight_tokens, -st.free_pages)

        with self._lock:
            return sorted((s for s in self.decoders if s.healthy), key=key)

    def assign(self, s: Slice, cost_tokens: int) -> None:
        """Count a request handed off to `s` (undo with `release`)."""
        with self._lock:
            s.inflight_requests += 1
            s.inflight_tokens += cost_tokens
            s.routed += 1

    def _index(self, s: Slice) -> PrefixIndex | None:
        """The slice's prefix index, brought up to date; None (and forgotten) while the
        slice is out of rotation."""
        if not self.cache_aware:
            return None
        index = self._indexes.get(s.index)
        if not s.healthy:
            self._indexes.pop(s.index, None)
            return None
        if index is None or index.engine is not s.engine:
            index = self._indexes[s.index] = PrefixIndex(s.engine)
        index.update()
        return index

    def index_size(self, s: Slice) -> int:
        """Page digests the router believes the slice holds, brought up to date (0 when it
        keeps no index)."""
        with self._lock:
            index = self._index(s)
            return len(index) if index is not None else 0

    def _order(self, healthy: list[Slice], digests: list[bytes]) -> tuple[list[Slice], str,
                                                                              dict[int, int]]:
        """Slices best first, the reason, and each slice's expected cached tokens."""
        stats = {s.index: s.stats() for s in healthy}
        load = {s.index: stats[s.index].waiting_tokens + stats[s.index].running_tokens
                + s.inflight_tokens for s in healthy}

        def by_load(s: Slice) -> tuple[int, int, int]:
            return (load[s.index], -stats[s.index].free_pages, s.routed)

        matched = {}
        for s in healthy:
            index = self._index(s)
            matched[s.index] = index.matched_pages(digests) * self.page_size if index else 0
        if len(healthy) == 1:
            return healthy, ONLY_HEALTHY, matched
        if (not self.cache_aware or not any(matched.values())
                or skewed(list(load.values()), self.config)):
            return sorted(healthy, key=by_load), LOAD, matched
        order = sorted(healthy, key=lambda s: (
            -cache_score(matched[s.index], load[s.index], self.config), *by_load(s)))
        return order, CACHE if matched[order[0].index] else LOAD, matched

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
               cost_tokens: int, priority: int = 0, cache_salt: str = "") -> Routed:
        """Add the request to the best slice.

        Raises InvalidRequestError at once; EngineOverloadedError only when every healthy
        slice's waiting queue is full; NoHealthySliceError when no slice can take it.
        """
        digests = (request_digests(prompt_ids, params, cache_salt, self.page_size)
                   if self.cache_aware else [])
        with self._lock:
            healthy = [s for s in self.entry if s.healthy]
            for s in self.entry:
                if s not in healthy:
                    self._index(s)  # out of rotation: forget its index
            if not healthy:
                raise NoHealthySliceError("no healthy slice: every engine has stopped")
            order, reason, matched = self._order(healthy, digests)
            overloaded: EngineOverloadedError | None = None
            for s in order:
                try:
                    handle = s.engine.add_request(prompt_ids, params, request_id=request_id,
                                                  priority=priority, cache_salt=cache_salt,
                                                  prefill_only=self.disaggregated)
                except EngineOverloadedError as e:
                    overloaded = e
                    continue
                except EngineDeadError:
                    continue  # died since the health check: try the next slice
                s.inflight_requests += 1
                s.inflight_tokens += cost_tokens
                s.routed += 1
                if s is not order[0]:
                    reason = LOAD  # the first choice's queue was full
                return Routed(s, handle, reason, matched[s.index])
            if overloaded is not None:
                raise overloaded
            raise NoHealthySliceError("no healthy slice: every engine has stopped")

    def release(self, s: Slice, cost_tokens: int) -> None:
        with self._lock:
            s.inflight_requests -= 1
            s.inflight_tokens -= cost_tokens
