"""The engine: continuous batching over a paged KV cache on one mesh (one slice).

`add_request` may be called from any thread; a background thread (or explicit `step()`
calls) runs the scheduler and the compiled step, and streams chunks to each request's
handle. The scheduler's state belongs to that thread alone (engine/snapshot.py says how
the others see it). See engine/API.md.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from meshserve.engine.admission import check_prompt
from meshserve.engine.batching import build_inputs
from meshserve.engine.config import EngineConfig
from meshserve.engine.detokenizer import IncrementalDetokenizer
from meshserve.engine.handle import RequestHandle
from meshserve.engine.handoff import DisaggregationMixin, Handoffs
from meshserve.engine.kv_pool import plan_num_pages
from meshserve.engine.layer_scan import place_layers
from meshserve.engine.outputs import EngineStats, StreamChunk, TokenLogprob, Usage
from meshserve.engine.paged_attention import AttentionSpecs, init_paged_cache
from meshserve.engine.prefix_cache import CacheEventLog, root_digest
from meshserve.engine.sampling_params import InvalidRequestError, SamplingParams
from meshserve.engine.scheduler import Scheduler, StepPlan
from meshserve.engine.sequence import Sequence, Status
from meshserve.engine.snapshot import engine_stats, take_snapshot
from meshserve.engine.step import StepFunctions, StepInputs, StepOutputs
from meshserve.engine.warmup import WarmupMixin
from meshserve.engine.watchdog import StepWatchdog
from meshserve.models.loading import ShardedModel
from meshserve.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "EngineDeadError", "EngineOverloadedError", "RequestHandle"]


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (requests or tokens); retry later."""


class EngineDeadError(RuntimeError):
    """The engine stopped or failed and accepts no requests."""


class Engine(DisaggregationMixin, WarmupMixin):
    def __init__(
        self,
        model: ShardedModel,
        config: EngineConfig | None = None,
        tokenizer: Tokenizer | None = None,
        attention_impl: str | None = None,
    ):
        self.config = cfg = config or EngineConfig()
        # experts None: expert parallel over the mesh (engine.experts)
        model, self.matmul, experts, self.scanned = place_layers(model, cfg)
        self.model = model
        self.tokenizer = tokenizer
        mc = model.config
        self.vocab_size = mc.vocab_size
        self.max_model_len = min(
            cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        self.pages_per_seq = math.ceil(self.max_model_len / cfg.page_size)
        self.kv_pool = plan_num_pages(model, cfg, self.max_model_len)
        self.num_pages = self.kv_pool.pages
        rules = model.rules
        self.data_shards = rules.axis_size("batch")
        self._kv = init_paged_cache(
            mc, rules, self.data_shards, self.num_pages, cfg.page_size, model.dtype,
            self.scanned)
        stats_shape = (self.data_shards, cfg.max_seqs, mc.vocab_size)
        stats_sharding = rules.sharding(("cache_batch", None, None), stats_shape)
        self._counts = jax.jit(
            lambda: jnp.zeros(stats_shape, jnp.int32), out_shardings=stats_sharding
        )()
        self._seen = jax.jit(lambda: jnp.zeros(stats_shape, bool), out_shardings=stats_sharding)()
        specs = AttentionSpecs.create(rules, mc, attention_impl, self.scanned)
        self._fns = StepFunctions(
            model, specs, cfg.max_logprobs, cfg.decode_steps, self.matmul, experts
        )
        self.scheduler = Scheduler(cfg, self.data_shards, self.num_pages, self.max_model_len)
        # MoE: token slots per (MoE layer, expert), summed on the host from each call's
        # outputs (they come back with the tokens: no extra device sync).
        self._expert_tokens = np.zeros((len(mc.moe_layers), mc.num_experts), np.int64)
        self._lock = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self._live: dict[str, tuple[Sequence, RequestHandle]] = {}
        self._snap = take_snapshot(self.scheduler, self._expert_tokens)  # under _lock
        self._seeds = random.Random(cfg.seed)
        self._finished = 0
        self._thread: threading.Thread | None = None
        # A decode call launched behind the running one, with its plan (see `_chain`).
        self._chained: tuple[StepPlan, StepOutputs] | None = None
        # Chain decode calls (one process only: a multi-host follower runs what it is sent).
        self.overlap = cfg.overlap_decode
        self._chained_calls = 0
        # Set by warmup(): later compiles are counted (and logged) as misses.
        self._compiles_at_warmup: int | None = None
        # Device calls launched per program (decode, tokens bucket, seqs bucket).
        self.program_calls: collections.Counter[tuple[bool, int, int]] = collections.Counter()
        self.compiles_after_warmup = 0
        self._stopping = False
        self.error: str | None = None
        # Called from the step loop with (phase, seconds) of host time: "schedule" (plan
        # and batch arrays), "transfer" (inputs to the devices), "dispatch" (launching the
        # program), "device_wait" (blocked on the results), "results" (applying them).
        self.step_observer: Callable[[str, float], None] | None = None
        self.watchdog = (StepWatchdog(self, cfg.step_timeout, cfg.compile_timeout)
                         if cfg.step_timeout is not None else None)
        self._handoff = Handoffs(self)  # prefill/decode disaggregation (engine/handoff.py)

    # -- public API --------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None and not self._stopping

    @property
    def compiles(self) -> int:
        return self._fns.compiles

    def add_request(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | bytes = b"",
        prefill_only: bool = False,
    ) -> RequestHandle:
        """Queue a request. Requests with different `cache_salt`s never share KV pages (a
        salt never matches pages stored without it): tenant isolation. `prefill_only`: stop
        after the first token and park the KV for `export_kv` (engine/handoff.py)."""
        params = (params or SamplingParams()).validate(self.vocab_size, self.config.max_logprobs)
        salt = cache_salt.encode() if isinstance(cache_salt, str) else bytes(cache_salt)
        prompt = self.check_prompt(prompt_ids, params)
        if prefill_only:
            self._handoff.check_supported()
        request_id = request_id or f"req-{uuid.uuid4().hex[:12]}"
        eos = () if params.ignore_eos else self.model.config.eos_token_ids
        seq = Sequence(
            request_id=request_id,
            prompt_ids=prompt,
            params=params,
            seed=params.seed if params.seed is not None else self._seeds.getrandbits(63),
            stop_ids=tuple(dict.fromkeys((*eos, *params.stop_token_ids))),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt, params.stop),
            priority=priority,
            cache_root=root_digest(salt),
            prefill_only=prefill_only,
        )
        return self._submit(seq)

    def check_prompt(self, prompt_ids: Seq[int], params: SamplingParams) -> list[int]:
        """The prompt as ints, or InvalidRequestError (ids, lengths, pages)."""
        return check_prompt(prompt_ids, params, self.vocab_size, self.max_model_len,
                            self.scheduler.pages_for, self.num_pages)

    def _submit(self, seq: Sequence) -> RequestHandle:
        request_id, prompt = seq.request_id, seq.prompt_ids
        handle = RequestHandle(request_id, self)
        with self._lock:
            if not self.healthy:
                raise EngineDeadError(self.error or "the engine is shutting down")
            if request_id in self._live:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            waiting = self._snap.waiting + len(self._inbox)
            if waiting >= self.config.max_waiting_requests:
                raise EngineOverloadedError(
                    f"{waiting} requests are waiting "
                    f"(limit {self.config.max_waiting_requests})"
                )
            tokens = self._snap.waiting_tokens + sum(s.num_tokens for s in self._inbox)
            tokens += len(prompt)
            if tokens > self.config.max_waiting_tokens:
                raise EngineOverloadedError(
                    f"waiting prompts would hold {tokens} tokens "
                    f"(limit {self.config.max_waiting_tokens})"
                )
            self._live[request_id] = (seq, handle)
            self._inbox.append(seq)
            self._lock.notify_all()
        return handle

    def abort(self, request_id: str) -> bool:
        with self._lock:
            if request_id not in self._live:
                return self._handoff.release(request_id)
            self._aborts.append(request_id)
            self._lock.notify_all()
        return True

    def stats(self) -> EngineStats:
        with self._lock:  # the owner's latest snapshot, and the inbox it has not taken yet
            snap, inbox = self._snap, self._inbox
            inbox_tokens = sum(q.num_tokens for q in inbox)
            return engine_stats(
                snap, len(inbox), inbox_tokens, total_pages=self.num_pages * self.data_shards,
                expert_devices=self.model.rules.axis_size("experts"), finished=self._finished,
                compiles=self.compiles, chained_calls=self._chained_calls,
                compiles_after_warmup=self.compiles_after_warmup, parked=self._handoff.parked)

    def cache_events(self) -> CacheEventLog | None:
        """The log of this engine's page-hash events (stored, evicted) that routers read,
        kept from the engine's first page on; None with the prefix cache off."""
        return self.scheduler.events

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="meshserve-engine", daemon=True)
            self._thread.start()
            if self.watchdog is not None:
                self.watchdog.start()
        return self

    def shutdown(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self._thread is not None:  # a hung device call may never return: no wait
            self._thread.join(0 if self.watchdog and self.watchdog.failure else timeout)
        self._fail_all("the engine shut down", reason="abort")

    def generate(
        self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[list[StreamChunk]]:
        """Run prompts to completion (without the background thread) and return their
        chunks; convenient for tools and tests."""
        if isinstance(params, SamplingParams) or params is None:
            params = [params] * len(prompts)
        handles = [self.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        while self.step():
            pass
        return [list(h) for h in handles]

    # -- the loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while (
                    not self._stopping
                    and not self._inbox
                    and not self._aborts
                    and not self.scheduler.num_running
                    and not self.scheduler.waiting
                    and self._chained is None
                    and not self._handoff.has_work()
                ):
                    self._lock.wait(self._handoff.wait_timeout())
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - any failure must end every stream
                self.error = f"engine step failed: {type(e).__name__}: {e}"
                self._fail_all(self.error, reason="abort")
                return

    def _drain_inbox(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
            for seq in new:  # under the lock: admission limits never miss these
                self.scheduler.add(seq)
            for request_id in aborts:
                entry = self._live.get(request_id)
                if entry is None:  # parked since the abort came: free its pages
                    self._handoff.release(request_id)
                elif entry[0].status is not Status.FINISHED:
                    self.scheduler.finish(entry[0], "abort")
                    self._emit(entry[0], entry[1])
            self._publish()
        if self._handoff.run_tasks():
            self._publish()

    def _publish(self) -> None:
        """The owner shows other threads the scheduler's state (engine/snapshot.py)."""
        snap = take_snapshot(self.scheduler, self._expert_tokens)
        with self._lock:
            self._snap = snap

    def _observe(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        if self.step_observer is not None:
            self.step_observer(phase, now - since)
        return now

    def step(self) -> bool:
        """Read the results of one device call (launching it first unless it was chained
        behind the previous one). False when there is no work."""
        return self._step() if self.watchdog is None else self.watchdog.watched(self._step)

    def _step(self) -> bool:
        started = time.perf_counter()
        self._drain_inbox()
        if self._chained is None:
            plan = self.scheduler.schedule()
            if plan.empty:
                return False
            now = time.monotonic()
            for rows in plan.shards:
                for item in rows:
                    item.seq.first_scheduled = item.seq.first_scheduled or now
            self._handoff.before_launch(plan)  # imported KV into its pages
            inputs = build_inputs(plan, self.config, self.pages_per_seq, 0)
            self._observe("schedule", started)
            pending = self.launch(inputs, plan.decode)
        else:
            (plan, pending), self._chained = self._chained, None
        # The device runs asynchronously: take in requests that arrived meanwhile now, so
        # the next schedule() finds them queued. (Aborts of sequences in this call are
        # safe: their pages are only reused by a later call, ordered after this one.)
        self._drain_inbox()
        if self.overlap:
            self._chain(plan, pending)
        waited = time.perf_counter()
        out = jax.device_get(pending)  # the one host sync per call
        applying = self._observe("device_wait", waited)
        self._apply(plan, out)
        self._publish()
        self._observe("results", applying)
        return True

    def _chain(self, plan: StepPlan, pending: StepOutputs) -> None:
        """Plan and launch the decode call after `plan` before reading its results, so the
        host's planning, input transfer and result handling overlap device work."""
        started = time.perf_counter()
        nxt = self.scheduler.plan_after(plan)
        if nxt is None:
            return
        seqs = pending.stopped.shape[1]  # the same bucket: the rows continue by index
        inputs = build_inputs(nxt, self.config, self.pages_per_seq, 0, seqs, seqs)
        self._observe("schedule", started)
        self._chained = (nxt, self._run(inputs, True, (pending.last_tokens, pending.stopped)))
        self._chained_calls += 1

    def launch(self, inputs: StepInputs, decode: bool) -> StepOutputs:
        """The device half of a step: host arrays in, device arrays out (asynchronously).

        Everything that decides *what* runs happens before this on the host; a multi-host
        leader sends `inputs` to its followers, which call this same method.
        """
        return self._run(inputs, decode)

    def _run(self, inputs: StepInputs, decode: bool, prev=None) -> StepOutputs:
        """Launch one call on the engine's state (StepFunctions.run says what `prev` is)."""
        started = time.perf_counter()
        tokens, seqs = np.shape(inputs.tokens)[1], np.shape(inputs.kv_lens)[1]
        if self.watchdog is not None:
            self.watchdog.launching((bool(decode), tokens, seqs))
        placed = self._put(inputs)
        started = self._observe("transfer", started)
        self._kv, self._counts, self._seen, out = self._fns.run(
            self._kv, self._counts, self._seen, placed, decode, prev
        )
        self._observe("dispatch", started)
        self.program_calls[decode, tokens, seqs] += 1
        if self._compiles_at_warmup is not None:
            fresh = self.compiles - self._compiles_at_warmup - self.compiles_after_warmup
            if fresh > 0:  # a program warm-up missed: a request waited for a compile
                self.compiles_after_warmup += fresh
                log.warning("compiled after warm-up: %s step, %d tokens x %d sequences "
                            "(%d such compiles so far)", "decode" if decode else "mixed",
                            np.shape(inputs.tokens)[1], np.shape(inputs.kv_lens)[1],
                            self.compiles_after_warmup)
        return out

    def execute(self, inputs: StepInputs, decode: bool) -> StepOutputs:
        """`launch`, then wait: host arrays out."""
        return jax.device_get(self.launch(inputs, decode))

    def _put(self, inputs: StepInputs) -> StepInputs:
        rules = self.model.rules

        def place(x):
            x = np.asarray(x)
            axes = ("batch",) + (None,) * (x.ndim - 1) if x.ndim else ()
            return jax.device_put(x, rules.sharding(axes, x.shape))

        return jax.tree.map(place, inputs)

    # -- results -----------------------------------------------------------------------
    def _apply(self, plan: StepPlan, out) -> None:
        steps = int(out.steps)
        if out.expert_tokens is not None:
            self._expert_tokens += np.asarray(out.expert_tokens).sum(0)
        for shard, rows in enumerate(plan.shards):
            for i, item in enumerate(rows):
                seq = item.seq
                if seq.status is not Status.RUNNING:
                    continue  # aborted while the step ran
                seq.fresh_slot = False
                if not plan.decode:
                    seq.num_computed += item.num_new
                    if item.sample:
                        self._append(seq, out, 0, shard, i)
                else:
                    for k in range(min(steps, item.max_steps)):
                        seq.num_computed += 1
                        if self._append(seq, out, k, shard, i):
                            break
                if seq.status is Status.RUNNING:
                    self.scheduler.commit(seq)
                handle = self._live[seq.request_id][1]
                if not self._handoff.maybe_park(seq, handle):
                    self._emit(seq, handle)

    def _append(self, seq: Sequence, out, k: int, shard: int, row: int) -> bool:
        token = int(out.tokens[k, shard, row])
        seq.output_ids.append(token)
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        if seq.params.logprobs:
            n = seq.params.logprobs
            top = tuple(
                (int(a), float(b))
                for a, b in zip(
                    out.top_ids[k, shard, row, :n], out.top_logprobs[k, shard, row, :n], strict=True
                )
            )
        else:
            top = ()
        seq.pending_logprobs.append(TokenLogprob(token, float(out.logprobs[k, shard, row]), top))
        seq.detokenizer.add(token)
        reason = None
        if token in seq.stop_ids or seq.detokenizer.stopped:
            reason = "stop"
        elif seq.remaining_output <= 0 or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason:
            self.scheduler.finish(seq, reason)
        return reason is not None

    def _emit(self, seq: Sequence, handle: RequestHandle, error: str | None = None) -> None:
        finished = seq.status is Status.FINISHED
        new = tuple(seq.output_ids[seq.sent_tokens :])
        if not new and not finished:
            return
        seq.sent_tokens = len(seq.output_ids)
        logprobs, seq.pending_logprobs = tuple(seq.pending_logprobs), []
        chunk = StreamChunk(
            request_id=seq.request_id,
            token_ids=new,
            text=seq.detokenizer.take(final=finished),
            logprobs=logprobs,
        )
        if finished:
            ms = lambda t: None if t is None else (t - seq.arrival) * 1e3  # noqa: E731
            chunk = dataclasses.replace(
                chunk, finish_reason=seq.finish_reason, error=error,
                usage=Usage(len(seq.prompt_ids), len(seq.output_ids), seq.cached_tokens or 0),
                queue_ms=ms(seq.first_scheduled), ttft_ms=ms(seq.first_token))
            with self._lock:
                if self._live.pop(seq.request_id, None) is not None:
                    self._finished += 1
            self._publish()  # a client that saw its stream end reads stats without it
        handle.put(chunk)

    def _fail_all(self, message: str, reason: str) -> None:
        """End every stream with `message`. Off the engine thread (a watchdog, while a
        device call hangs) the scheduler is not touched: each stream gets a final chunk
        now and nothing after it (RequestHandle drops later chunks)."""
        with self._lock:
            live = list(self._live.values())
            self._inbox.clear()
            t = self._thread  # the owner: the engine thread, else any caller of step()
            owner = t is None or t is threading.current_thread() or not t.is_alive()
        self._handoff.fail_all()
        for seq, handle in live:
            if not owner:
                handle.put(StreamChunk(seq.request_id, (), "", finish_reason=reason,
                                       error=message))
            elif seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, reason)
                self._emit(seq, handle, error=message)
        if owner:
            self._publish()
