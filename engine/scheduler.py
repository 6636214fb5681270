"""Continuous batching: which sequences run this step, with how many tokens.

Per data shard: a token budget per step, a fixed number of batch slots and a page pool.
Decodes go first, then prefill chunks of running sequences, then admissions. When pages
run out the newest running sequence is preempted (its pages freed; it is recomputed
from prompt + output later, so its output never changes).

Prefix cache (EngineConfig.prefix_caching): an admitted sequence starts from the longest
chain of cached full pages its tokens and salt name (pages.PageAllocator), shared
read-only, and computes only the rest; its own pages join the cache once full and
computed (`commit`), so requests running side by side share them too.
"""

from __future__ import annotations

import dataclasses
import itertools

from meshserve.engine.config import EngineConfig
from meshserve.engine.pages import PageAllocator
from meshserve.engine.prefix_cache import CacheEventLog, extend_digests, reusable_tokens
from meshserve.engine.sequence import Sequence, Status


@dataclasses.dataclass
class Scheduled:
    seq: Sequence
    num_new: int  # tokens fed this step (decode loop: 1 per iteration)
    sample: bool  # the token sampled after them is kept
    max_steps: int = 1  # decode loop: iterations this row may run
    # Chained decode (planned while the previous call runs): tokens that call adds before
    # this one starts, and the row of its outputs this row continues (-1: not chained).
    ahead: int = 0
    prev_row: int = -1


@dataclasses.dataclass
class StepPlan:
    decode: bool
    shards: list[list[Scheduled]]

    @property
    def empty(self) -> bool:
        return not any(self.shards)


class Scheduler:
    def __init__(self, cfg: EngineConfig, num_shards: int, num_pages: int, max_model_len: int):
        self.cfg = cfg
        self.max_model_len = max_model_len
        self.allocators = [PageAllocator(num_pages, cfg.prefix_caching, self._event)
                           for _ in range(num_shards)]
        # Page-hash events for routers, from the first page on (Engine.cache_events).
        self.events = CacheEventLog(cfg.cache_event_capacity) if cfg.prefix_caching else None
        # Prefix-cache statistics in tokens, over first admissions (vLLM's meaning): prompt
        # tokens looked up, and those found cached.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._free_slots = [list(range(cfg.max_seqs - 1, -1, -1)) for _ in range(num_shards)]
        self.running: list[list[Sequence]] = [[] for _ in range(num_shards)]
        self.waiting: list[Sequence] = []
        self.preemptions = 0
        self._order = itertools.count()

    # -- bookkeeping -------------------------------------------------------------------
    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.cfg.page_size)

    def add(self, seq: Sequence) -> None:
        seq.order = next(self._order)
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: (s.priority, s.arrival, s.order))

    def release(self, seq: Sequence) -> None:
        """Give back pages and slot (on finish, abort or preemption); cached pages stay
        cached."""
        if seq.shard is not None:
            self.allocators[seq.shard].release(seq.pages)
            self._free_slots[seq.shard].append(seq.slot)
            if seq in self.running[seq.shard]:
                self.running[seq.shard].remove(seq)
        seq.pages, seq.shard, seq.slot, seq.pages_cached = [], None, None, 0
        if seq in self.waiting:
            self.waiting.remove(seq)

    def park(self, seq: Sequence) -> None:
        """Take a sequence out of the batch (slot freed) keeping its pages (handoff.py)."""
        self.running[seq.shard].remove(seq)
        self._free_slots[seq.shard].append(seq.slot)
        seq.slot = None

    def release_parked(self, seq: Sequence) -> None:
        if seq.shard is not None:
            self.allocators[seq.shard].release(seq.pages)
        seq.pages, seq.shard, seq.pages_cached = [], None, 0

    def commit(self, seq: Sequence, valid: int | None = None) -> None:
        """Cache the full pages among `seq`'s first `valid` tokens (default: all computed).

        Called with the results of every call. A sequence that ends inside a decode loop
        may have had its last fed position rewritten while the loop ran on for other rows
        (engine/step.py), so a finishing sequence commits one token less."""
        if not self.cfg.prefix_caching or seq.shard is None:
            return
        valid = seq.num_computed if valid is None else valid
        full = min(valid // self.cfg.page_size, len(seq.pages))
        if full <= seq.pages_cached:
            return
        digests = self._digests(seq, full)
        alloc = self.allocators[seq.shard]
        for i in range(seq.pages_cached, full):
            alloc.register(seq.pages[i], digests[i])
        seq.pages_cached = full

    def finish(self, seq: Sequence, reason: str) -> None:
        self.commit(seq, seq.num_computed - 1)
        self.release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.commit(seq)  # no call runs while planning: everything computed is valid
        self.release(seq)
        seq.num_computed = 0
        self.preemptions += 1
        self._enqueue(seq)

    @property
    def num_running(self) -> int:
        return sum(len(r) for r in self.running)

    def free_pages(self) -> int:
        return sum(a.free for a in self.allocators)

    # -- planning ----------------------------------------------------------------------
    def _ensure_pages(self, shard: int, seq: Sequence, tokens: int) -> bool:
        """Give `seq` pages for `tokens` tokens, preempting the newest sequences of its
        shard if needed. False if `seq` itself had to be preempted."""
        need = self.pages_for(tokens) - len(seq.pages)
        alloc = self.allocators[shard]
        while need > alloc.free:
            victim = max(self.running[shard], key=lambda s: s.order)
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.pages.extend(alloc.allocate(need, after=seq.pages[-1] if seq.pages else None))
        return True

    def _decode_steps(self, seq: Sequence, ahead: int = 0) -> int:
        """Iterations `seq` may run once `ahead` more of its tokens are out. Each iteration
        yields one token; the last one may sit at max_model_len - 1."""
        return max(0, min(
            self.cfg.decode_steps,
            seq.remaining_output - ahead,
            self.max_model_len - seq.num_tokens - ahead,
        ))

    # -- the prefix cache --------------------------------------------------------------
    def _event(self, kind: str, digest: bytes) -> None:
        if self.events is not None:
            self.events.append(kind, digest)

    def cached_pages(self) -> int:
        return sum(a.cached for a in self.allocators)

    def _digests(self, seq: Sequence, pages: int) -> list[bytes]:
        if len(seq.page_digests) < pages:
            extend_digests(seq.page_digests, seq.all_tokens, self.cfg.page_size, pages,
                           seq.cache_root)
        return seq.page_digests[:pages]

    def _cached_pages(self, shard: int, seq: Sequence) -> list[int]:
        """The cached pages `seq` may start from on `shard`: full pages only, and never its
        last token (see prefix_cache.reusable_tokens), so the first token it computes
        goes into a page of its own."""
        if not self.cfg.prefix_caching or seq.kv_import is not None:
            return []  # an imported sequence brings its KV
        usable = reusable_tokens(len(seq.prompt_ids), seq.num_tokens, seq.params)
        pages = usable // self.cfg.page_size
        return self.allocators[shard].lookup(self._digests(seq, pages)) if pages else []

    def _admission(self, seq: Sequence, budgets: list[int]) -> tuple[int, list[int]] | None:
        """(shard, cached pages to start from) for `seq`, or None: the shard with the
        longest cached prefix, then the most free pages."""
        best, best_key = None, None
        for shard, alloc in enumerate(self.allocators):
            if not self._free_slots[shard] or budgets[shard] <= 0:
                continue
            hits = self._cached_pages(shard, seq)
            # Admit only when the whole known context fits, so chunked prefill of a long
            # prompt does not thrash against the decodes already running. Holding cached
            # pages nobody holds takes them out of the free ones.
            need = self.pages_for(seq.num_tokens + 1) - len(hits)
            if alloc.free - alloc.unheld(hits) < need:
                continue
            key = (len(hits), alloc.free)
            if best_key is None or key > best_key:
                best, best_key = (shard, hits), key
        return best

    def schedule(self) -> StepPlan:
        budgets = [self.cfg.max_step_tokens] * len(self.allocators)
        admissible = (
            bool(self.waiting) and self._admission(self.waiting[0], budgets) is not None
        )
        everyone_decodes = all(s.is_decoding for r in self.running for s in r)
        if self.num_running and everyone_decodes and not admissible and self.cfg.decode_steps > 1:
            return self._plan_decode()
        return self._plan_mixed(budgets)

    def _plan_decode(self) -> StepPlan:
        shards: list[list[Scheduled]] = []
        for shard, running in enumerate(self.running):
            plan = []
            for seq in sorted(running, key=lambda s: s.order):
                if seq.status is not Status.RUNNING:
                    continue  # preempted while planning an older sequence
                steps = self._decode_steps(seq)
                # Iteration i writes position num_tokens - 1 + i.
                if self._ensure_pages(shard, seq, seq.num_tokens + steps - 1):
                    plan.append(Scheduled(seq, 1, True, steps))
            shards.append([p for p in plan if p.seq.status is Status.RUNNING])
        return StepPlan(decode=True, shards=shards)

    def plan_after(self, plan: StepPlan) -> StepPlan | None:
        """The decode call to run right after `plan` (a decode call whose results are not
        read yet), or None. A row continues only if it may run all of `plan`'s iterations:
        a row that stops early there starts stopped (on device); one that ends on the host
        (stop string, abort) is dropped when the results come. No admissions (nothing may
        wait) and no preemptions (pages must be free)."""
        k = self.cfg.decode_steps
        if not plan.decode or self.waiting or k < 2:
            return None
        rows: list[list[tuple[int, Sequence, int]]] = []
        for shard, items in enumerate(plan.shards):
            keep = []
            for row, item in enumerate(items):
                seq = item.seq
                if seq.status is not Status.RUNNING or item.max_steps < k:
                    continue
                steps = self._decode_steps(seq, ahead=k)
                if steps > 0:
                    keep.append((row, seq, steps))
            need = sum(
                max(0, self.pages_for(seq.num_tokens + k + steps - 1) - len(seq.pages))
                for _, seq, steps in keep
            )
            if need > self.allocators[shard].free:
                return None
            rows.append(keep)
        if not any(rows):
            return None
        shards = []
        for shard, keep in enumerate(rows):
            for _, seq, steps in keep:
                self._ensure_pages(shard, seq, seq.num_tokens + k + steps - 1)  # free: checked
            shards.append(
                [Scheduled(seq, 1, True, steps, ahead=k, prev_row=row) for row, seq, steps in keep]
            )
        return StepPlan(decode=True, shards=shards)

    def _plan_mixed(self, budgets: list[int]) -> StepPlan:
        shards: list[list[Scheduled]] = [[] for _ in self.allocators]
        for shard, running in enumerate(self.running):
            for seq in sorted(running, key=lambda s: s.order):
                if seq.status is not Status.RUNNING or budgets[shard] <= 0:
                    continue
                n = min(seq.tokens_to_compute, budgets[shard])
                if self._ensure_pages(shard, seq, seq.num_computed + n):
                    shards[shard].append(Scheduled(seq, n, seq.num_computed + n == seq.num_tokens))
                    budgets[shard] -= n
            shards[shard] = [p for p in shards[shard] if p.seq.status is Status.RUNNING]
            budgets[shard] = self.cfg.max_step_tokens - sum(p.num_new for p in shards[shard])
        while self.waiting:
            seq = self.waiting[0]
            admission = self._admission(seq, budgets)
            if admission is None:
                break
            shard, hits = admission
            self.waiting.pop(0)
            seq.shard, seq.slot = shard, self._free_slots[shard].pop()
            seq.status, seq.fresh_slot = Status.RUNNING, True
            self.running[shard].append(seq)
            alloc = self.allocators[shard]
            alloc.acquire(hits)
            seq.pages_cached = len(hits)
            seq.num_computed = len(hits) * self.cfg.page_size
            if seq.kv_import is not None:  # copied in before this step (handoff.py)
                seq.num_computed = seq.kv_import.num_computed
            if seq.cached_tokens is None:  # first admission: what the request reports
                seq.cached_tokens = seq.num_computed
                if self.cfg.prefix_caching:
                    self.prefix_queries += len(seq.prompt_ids)
                    self.prefix_hits += seq.num_computed
            n = min(seq.tokens_to_compute, budgets[shard])
            fresh = self.pages_for(seq.num_computed + n) - len(hits)
            seq.pages = hits + alloc.allocate(fresh, after=hits[-1] if hits else None)
            shards[shard].append(Scheduled(seq, n, seq.num_computed + n == seq.num_tokens))
            budgets[shard] -= n
        return StepPlan(decode=False, shards=shards)
