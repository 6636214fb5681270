"""Prefill/decode disaggregation: one engine prefills, another decodes.

A prefill-only request (`Engine.add_request(..., prefill_only=True)`) runs its prompt,
samples and streams its first token, then *parks*: it leaves the running batch (its
batch slot is freed) but keeps its KV pages, and those pages are gathered into one
array in logical page order, handed out by `export_kv`: [layers, rows, page_size,
2 * kv_heads, head_dim], K/V interleaved as in the pool. So the payload does not depend
on the prefill engine's layout (data shards, tensor or sequence split): any transport
can move it and any decode layout can take it. `release_parked` frees the pages; a
parked request nobody exports or releases is freed after `EngineConfig.park_timeout_s`.

`add_prefilled` on the decode engine queues the request like any other (same waiting
limits); once admitted (pages for the whole context plus one token are free) the KV is
scattered into its pages by a jitted update that donates the pool, right before the
step that feeds the first token, and decoding continues. Everything else the decode side
needs follows from token ids: sampling randomness depends only on (seed, token index),
so the handoff carries the seed in use, and penalty statistics are rebuilt from the
tokens fed so far (engine/sampler.py).

Scheduler state and the pool arrays belong to the engine thread (every step replaces
the arrays): the gather is dispatched there as the request parks, right behind the
step that computed its pages (so `export_kv` never waits for a step), and releases and
expiries run there between steps, queued under the engine's lock.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from meshserve.engine.detokenizer import IncrementalDetokenizer
from meshserve.engine.handle import RequestHandle
from meshserve.engine.kv_handoff import (
    HANDOFF_AXES,
    PREFILLED,
    HandoffError,
    KVHandoff,
    KVLayout,
    NotParkedError,
    bucket_rows,
)
from meshserve.engine.outputs import StreamChunk, Usage
from meshserve.engine.paged_attention import CACHE_AXES
from meshserve.engine.sequence import Sequence, Status

if TYPE_CHECKING:
    from meshserve.engine.scheduler import StepPlan

# The handoff's data types live in engine/kv_handoff.py (a transport may use them alone).
__all__ = ["PREFILLED", "DisaggregationMixin", "HandoffError", "Handoffs", "KVHandoff",
           "KVLayout", "NotParkedError"]


@dataclasses.dataclass
class _Parked:
    seq: Sequence
    deadline: float
    handoff: KVHandoff  # gathered as it parked


class Handoffs:
    """One engine's parked requests and the programs that move KV in and out of its pool
    (engine thread only, except where a method says otherwise)."""

    def __init__(self, engine):
        self._engine = engine
        self._lock: threading.Condition = engine._lock
        self._parked: dict[str, _Parked] = {}
        self._releases: collections.deque[str] = collections.deque()
        rules = engine.model.rules
        self._rules = rules
        # One stacked cache (scanned layers): the gather/scatter programs read per-layer
        # arrays, so handoffs are refused rather than moving the wrong pages.
        self.scanned = bool(getattr(engine, "scanned", False))
        self.kv_split = rules.axis_size("kv_split")
        self._gather = jax.jit(self._gather_impl)
        self._scatter = jax.jit(self._scatter_impl, donate_argnums=(0,))
        self._set_stats = jax.jit(self._set_stats_impl, donate_argnums=(0, 1))
        self.expired = 0
        self.exported = 0
        self.imported = 0

    def check_supported(self) -> None:
        if self.scanned:
            raise HandoffError("KV handoff needs per-layer caches: this engine runs with "
                               "scan_layers (EngineConfig.scan_layers=False to use it)")

    # -- layouts -----------------------------------------------------------------------
    def pool_layout(self, pages: int = 1, rows: int = 1) -> KVLayout:
        mc, cfg = self._engine.model.config, self._engine.config
        return KVLayout(mc.num_layers, cfg.page_size, mc.num_kv_heads, mc.head_dim,
                        str(jnp.dtype(self._engine.model.dtype)), pages, rows)

    def handoff_sharding(self, layout: KVLayout) -> jax.sharding.NamedSharding:
        return self._rules.sharding(HANDOFF_AXES, layout.shape)

    def _rows(self, shard: int, pages: list[int]) -> np.ndarray:
        """Rows of the pool array holding a shard's pages (paged_attention.py's layout:
        with a split S, page p sits on split device p % S at local row p // S)."""
        n, s = self._engine.num_pages, self.kv_split
        p = np.asarray(pages, np.int64)
        return (shard * n + (p % s) * (n // s) + p // s).astype(np.int32)

    # -- jitted programs ---------------------------------------------------------------
    def _gather_impl(self, kv, rows):
        # Out-of-range rows (padding) come back as zeros, never another request's KV.
        out = jnp.stack([layer.at[rows].get(mode="fill", fill_value=0) for layer in kv])
        return self._rules.constrain(out, HANDOFF_AXES)

    def _scatter_impl(self, kv, data, rows):
        return [self._rules.constrain(layer.at[rows].set(data[i], mode="drop"), CACHE_AXES)
                for i, layer in enumerate(kv)]

    def _set_stats_impl(self, counts, seen, shard, slot, fed, outputs):
        vocab = counts.shape[-1]
        seen_row = jnp.zeros((vocab,), bool).at[fed].set(True, mode="drop")
        count_row = jnp.zeros((vocab,), counts.dtype).at[outputs].add(1, mode="drop")
        stats = ("cache_batch", None, None)
        counts = self._rules.constrain(counts.at[shard, slot].set(count_row), stats)
        seen = self._rules.constrain(seen.at[shard, slot].set(seen_row), stats)
        return counts, seen

    def warmup(self, export: bool, imports: bool) -> int:
        """Compile the gather (export) and scatter (imports) programs of every bucket now,
        so no handoff stalls a step for a compile; returns how many were run. They read
        or write no page (every row is out of range)."""
        self.check_supported()
        eng = self._engine
        sizes = sorted({bucket_rows(p, eng.pages_per_seq) for p in range(1, eng.pages_per_seq + 1)})
        nowhere = eng.num_pages * eng.data_shards
        for rows in sizes:
            out = self._gather(eng._kv, np.full(rows, nowhere, np.int32))
            if imports:
                eng._kv = self._scatter(eng._kv, out, np.full(rows, nowhere, np.int32))
        if imports:
            fill = np.full(eng.max_model_len, eng.vocab_size, np.int32)
            eng._counts, eng._seen = self._set_stats(
                eng._counts, eng._seen, np.int32(0), np.int32(0), fill, fill)
        jax.block_until_ready(eng._kv)
        return len(sizes) * (int(export or imports) + int(imports)) + int(imports)

    # -- the prefill side --------------------------------------------------------------
    def maybe_park(self, seq: Sequence, handle: RequestHandle) -> bool:
        """After a step: park a prefill-only sequence that has its first token (and did
        not finish with it), streaming that token with finish_reason PREFILLED."""
        if not seq.prefill_only or not seq.output_ids or seq.status is not Status.RUNNING:
            return False
        eng = self._engine
        eng.scheduler.park(seq)
        seq.status = Status.PARKED
        # The gather is dispatched now, behind the step that computed the pages: export_kv
        # then never waits for the engine's next turn (a long prefill chunk, say).
        handoff = self._gather_handoff(seq)
        with self._lock:
            self._parked[seq.request_id] = _Parked(
                seq, time.monotonic() + eng.config.park_timeout_s, handoff)
            eng._live.pop(seq.request_id, None)
            self._lock.notify_all()  # the loop's wait now has a deadline
        new = tuple(seq.output_ids[seq.sent_tokens:])
        seq.sent_tokens = len(seq.output_ids)
        logprobs, seq.pending_logprobs = tuple(seq.pending_logprobs), []
        ms = lambda t: None if t is None else (t - seq.arrival) * 1e3  # noqa: E731
        # Held-back text stays in the detokenizer: the decode side's copy holds it too.
        handle.put(StreamChunk(
            request_id=seq.request_id, token_ids=new, text=seq.detokenizer.take(),
            logprobs=logprobs, finish_reason=PREFILLED,
            usage=Usage(len(seq.prompt_ids), len(seq.output_ids), seq.cached_tokens or 0),
            queue_ms=ms(seq.first_scheduled), ttft_ms=ms(seq.first_token),
        ))
        return True

    def export(self, request_id: str) -> KVHandoff:
        """(Any thread.) The parked request's handoff (the same one each time); its pages
        stay held, for another park_timeout_s from now."""
        with self._lock:
            entry = self._parked.get(request_id)
            if entry is None:
                raise NotParkedError(f"request {request_id!r} is not parked")
            entry.deadline = time.monotonic() + self._engine.config.park_timeout_s
            self.exported += 1
            return entry.handoff

    def _gather_handoff(self, seq: Sequence) -> KVHandoff:
        eng = self._engine
        pages = eng.scheduler.pages_for(seq.num_computed)
        layout = self.pool_layout(pages, bucket_rows(pages, eng.pages_per_seq))
        rows = np.full(layout.rows, eng.num_pages * eng.data_shards, np.int32)
        rows[:pages] = self._rows(seq.shard, seq.pages[:pages])
        kv = self._gather(eng._kv, rows)
        ms = lambda a, b: None if a is None or b is None else (b - a) * 1e3  # noqa: E731
        return KVHandoff(
            request_id=seq.request_id, prompt_ids=tuple(seq.prompt_ids),
            output_ids=tuple(seq.output_ids), params=seq.params, seed=seq.seed,
            num_computed=seq.num_computed, priority=seq.priority, cache_root=seq.cache_root,
            cached_tokens=seq.cached_tokens or 0, layout=layout, kv=kv,
            queue_ms=ms(seq.arrival, seq.first_scheduled),
            prefill_ms=ms(seq.first_scheduled, seq.first_token),
        )

    def release(self, request_id: str) -> bool:
        """(Any thread.) Free a parked request's pages (by the engine's next turn); False
        if it is not parked."""
        with self._lock:
            if request_id not in self._parked:
                return False
            self._releases.append(request_id)
            self._lock.notify_all()
        if self._engine._thread is None:
            self.run_tasks()
        return True

    def _release(self, request_id: str) -> None:
        with self._lock:
            entry = self._parked.pop(request_id, None)
        if entry is not None:
            self._engine.scheduler.release_parked(entry.seq)
            entry.seq.status = Status.FINISHED

    @property
    def parked(self) -> int:
        with self._lock:
            return len(self._parked)

    def parked_ids(self) -> list[str]:
        with self._lock:
            return list(self._parked)

    # -- the decode side ---------------------------------------------------------------
    def receive(self, handoff: KVHandoff) -> KVHandoff:
        """(Any thread.) The handoff with its KV on this engine's mesh, copied there and
        resharded by jax.device_put; blocks until the copy is done."""
        self.check_supported()
        if handoff.kv is None:
            raise HandoffError("the handoff carries no KV array")
        handoff.layout.check_pool(self.pool_layout())
        handoff.layout.check_array(handoff.kv)
        sharding = self.handoff_sharding(handoff.layout)
        if getattr(handoff.kv, "sharding", None) == sharding:
            return handoff
        kv = jax.block_until_ready(jax.device_put(handoff.kv, sharding))
        return dataclasses.replace(handoff, kv=kv)

    def new_sequence(self, handoff: KVHandoff, request_id: str, priority: int | None
                     ) -> Sequence:
        """(Any thread.) A sequence that continues `handoff` once admitted."""
        eng = self._engine
        layout = handoff.layout
        layout.check_pool(self.pool_layout())
        prompt, output = list(handoff.prompt_ids), list(handoff.output_ids)
        if not output or handoff.num_computed != len(prompt) + len(output) - 1:
            raise HandoffError(
                f"the handoff must have every token but the last sampled one computed "
                f"({handoff.num_computed} computed of {len(prompt)} prompt + "
                f"{len(output)} output tokens)")
        if layout.pages != eng.scheduler.pages_for(handoff.num_computed):
            raise HandoffError(f"{layout.pages} KV pages for {handoff.num_computed} tokens "
                               f"of {layout.page_size} per page")
        params = handoff.params.validate(eng.vocab_size, eng.config.max_logprobs)
        if len(output) >= params.max_tokens:
            raise HandoffError(f"{len(output)} tokens out already; max_tokens is "
                               f"{params.max_tokens}")
        eng.check_prompt(prompt, params)
        bad = [t for t in output if not 0 <= t < eng.vocab_size]
        if bad:
            raise HandoffError(f"output ids {bad[:5]} are outside the vocabulary")
        eos = () if params.ignore_eos else eng.model.config.eos_token_ids
        detok = IncrementalDetokenizer(eng.tokenizer, prompt, params.stop)
        for t in output:  # the same state the prefill side's detokenizer is in
            detok.add(t)
        detok.take()  # that text was streamed by the prefill side
        return Sequence(
            request_id=request_id, prompt_ids=prompt, params=params, seed=handoff.seed,
            stop_ids=tuple(dict.fromkeys((*eos, *params.stop_token_ids))),
            detokenizer=detok,
            priority=handoff.priority if priority is None else priority,
            output_ids=output, sent_tokens=len(output), cache_root=handoff.cache_root,
            cached_tokens=handoff.cached_tokens, kv_import=handoff,
        )

    def before_launch(self, plan: StepPlan) -> None:
        """Copy the KV of sequences admitted in `plan` into their pages (and rebuild their
        penalty statistics) before the step that feeds their first token."""
        eng = self._engine
        for shard, items in enumerate(plan.shards):
            for item in items:
                seq = item.seq
                handoff = seq.kv_import
                if handoff is None or seq.status is not Status.RUNNING:
                    continue
                seq.kv_import = None
                layout = handoff.layout
                rows = np.full(layout.rows, eng.num_pages * eng.data_shards, np.int32)
                rows[: layout.pages] = self._rows(shard, seq.pages[: layout.pages])
                eng._kv = self._scatter(eng._kv, handoff.kv, rows)
                self.imported += 1
                p = seq.params
                if (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) != (1, 0, 0):
                    self._rebuild_stats(seq, shard)

    def _rebuild_stats(self, seq: Sequence, shard: int) -> None:
        """The slot's statistics as if this engine had fed the computed tokens: every fed
        token seen, fed output tokens counted (the step would reset a fresh slot)."""
        eng = self._engine
        fed = seq.all_tokens[: seq.num_computed]
        size = eng.max_model_len
        pad = lambda ids: np.asarray(  # noqa: E731
            list(ids) + [eng.vocab_size] * (size - len(ids)), np.int32)
        outputs = fed[len(seq.prompt_ids):]
        eng._counts, eng._seen = self._set_stats(
            eng._counts, eng._seen, np.int32(shard), np.int32(seq.slot), pad(fed), pad(outputs))
        seq.fresh_slot = False

    # -- the engine loop ---------------------------------------------------------------
    def has_work(self) -> bool:
        """(Under the engine lock.) Releases are queued or a parked request expired."""
        if self._releases:
            return True
        now = time.monotonic()
        return any(e.deadline <= now for e in self._parked.values())

    def wait_timeout(self) -> float | None:
        """(Under the engine lock.) How long the idle loop may sleep: until the next
        parked request expires."""
        if not self._parked:
            return None
        return max(0.0, min(e.deadline for e in self._parked.values()) - time.monotonic())

    def run_tasks(self) -> bool:
        """Free released and expired parked requests (engine thread); True if any."""
        now = time.monotonic()
        with self._lock:
            released, self._releases = list(self._releases), collections.deque()
            expired = [rid for rid, e in self._parked.items() if e.deadline <= now]
        for rid in released:
            self._release(rid)
        for rid in expired:
            if rid not in released:
                self.expired += 1
                self._release(rid)
        return bool(released or expired)

    def fail_all(self) -> None:
        """The engine stopped: nothing stays parked."""
        with self._lock:
            self._releases.clear()
            self._parked.clear()


class DisaggregationMixin:
    """The engine's prefill/decode handoff API (see the module docstring)."""

    _handoff: Handoffs

    def export_kv(self, request_id: str) -> KVHandoff:
        """The parked request's KVHandoff (its KV gathered on this engine's mesh as it
        parked, possibly still being computed; pages stay held until `release_parked`).
        Raises NotParkedError. Never waits for the engine."""
        return self._handoff.export(request_id)

    def release_parked(self, request_id: str) -> bool:
        """Free a parked request's pages (done by the engine's next turn); False if it is
        not parked. `abort` does the same for a parked request."""
        return self._handoff.release(request_id)

    def receive_kv(self, handoff: KVHandoff) -> KVHandoff:
        """The handoff with its KV copied onto this engine's mesh (blocks until there):
        what `add_prefilled` does first, separate so a caller can time the transfer."""
        return self._handoff.receive(handoff)

    def add_prefilled(self, handoff: KVHandoff, request_id: str | None = None,
                      priority: int | None = None) -> RequestHandle:
        """Queue a prefilled request to decode here. Its stream starts after the tokens
        the prefill side streamed (never repeating them); the final usage counts all of
        them. Raises HandoffError (InvalidRequestError), EngineOverloadedError,
        EngineDeadError as `add_request` does."""
        handoff = self.receive_kv(handoff)
        seq = self._handoff.new_sequence(handoff, request_id or handoff.request_id, priority)
        return self._submit(seq)

    def warmup_handoff(self, export: bool = True, imports: bool = True) -> int:
        """Compile the handoff programs (before `start()`, like `warmup`): `export` for a
        prefill engine, `imports` for a decode engine."""
        return self._handoff.warmup(export, imports)

    def handoff_layout(self) -> KVLayout:
        """This engine's pool as a KVLayout (pages = rows = 1): what a handoff must match
        (`KVLayout.check_pool`) before a transport moves anything."""
        return self._handoff.pool_layout()

    def handoff_sharding(self, layout: KVLayout) -> jax.sharding.NamedSharding:
        """Where `receive_kv` puts a handoff's array on this engine's mesh (a transport
        that cannot reshard pulls into the sender's layout, then `receive_kv` reshards)."""
        return self._handoff.handoff_sharding(layout)

    def parked_requests(self) -> list[str]:
        return self._handoff.parked_ids()
