"""Serving metrics: Prometheus (pull) and TensorBoard (push), from one set of numbers.

Latencies are measured at the server, as a client sees them (TTFT includes
tokenization and routing); queue time is the engine's (arrival → first scheduled).
Gauges and the preemption counter are read from `engine.stats()` when scraped, so
they are never stale and no polling thread touches the engines for Prometheus.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from meshserve.serving.disagg import FAILURE_KINDS
from meshserve.serving.routing import REASONS
from meshserve.serving.slices import BOTH, DECODE, PREFILL, Slice

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
# KV handoffs: bytes of one request's KV (up to 1 GiB), and seconds from its first token
# to the decode slice holding it.
_BYTES_BUCKETS = tuple(float(4 ** k) for k in range(5, 16))
_TRANSFER_BUCKETS = (0.0005,) + _LATENCY_BUCKETS
REJECT_REASONS = (
    "invalid", "overloaded", "unavailable", "unauthenticated", "draining", "no_tokenizer",
    "duplicate_id", "warming_up", "no_chat_template",
)


class _SliceCollector:
    """Per-slice gauges and engine counters, read at scrape time."""

    def __init__(self, slices: Sequence[Slice]):
        self._slices = slices

    def collect(self):
        running = GaugeMetricFamily("meshserve_running_requests", "Requests in the batch.",
                                    labels=["slice"])
        waiting = GaugeMetricFamily("meshserve_waiting_requests", "Requests queued.",
                                    labels=["slice"])
        usage = GaugeMetricFamily("meshserve_kv_cache_usage_ratio",
                                  "Fraction of KV pages in use.", labels=["slice"])
        free = GaugeMetricFamily("meshserve_kv_free_pages", "Free KV pages.", labels=["slice"])
        healthy = GaugeMetricFamily("meshserve_slice_healthy", "1 while the engine runs.",
                                    labels=["slice"])
        preempt = CounterMetricFamily("meshserve_preemptions", "Sequences preempted.",
                                      labels=["slice"])
        routed = CounterMetricFamily("meshserve_routed_requests",
                                     "Requests the router sent to the slice.", labels=["slice"])
        late = CounterMetricFamily("meshserve_compiles_after_warmup",
                                   "Programs compiled after warm-up (a request waited for "
                                   "each; the log names its shape).", labels=["slice"])
        queries = CounterMetricFamily("meshserve_prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.",
                                      labels=["slice"])
        hits = CounterMetricFamily("meshserve_prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache (not computed).",
                                   labels=["slice"])
        parked = GaugeMetricFamily("meshserve_parked_requests", "Prefilled requests holding "
                                   "KV pages until their handoff.", labels=["slice"])
        roles = {k: GaugeMetricFamily(f"meshserve_role_{k}_requests", f"Requests {k}, per "
                                      "slice role (both, prefill, decode).", labels=["role"])
                 for k in ("waiting", "running")}
        per_role = {r: [0, 0] for r in {s.role for s in self._slices}}
        cached = GaugeMetricFamily("meshserve_prefix_cache_pages",
                                   "KV pages in the prefix cache (held or reclaimable).",
                                   labels=["slice"])
        # MoE: per expert summed over layers (layers × experts labels would reach 6k series
        # on a 48-layer, 128-expert model); the hotspot gauge is the worst layer's.
        expert_tokens = CounterMetricFamily(
            "meshserve_expert_tokens", "Token slots routed to each expert, summed over the "
            "MoE layers (MoE models only).", labels=["slice", "expert"])
        hotspot = GaugeMetricFamily(
            "meshserve_expert_hotspot_ratio", "Busiest expert device's token slots over the "
            "mean, worst MoE layer, since start (1 balanced; expert devices: all on one).",
            labels=["slice"])
        dropped = CounterMetricFamily(
            "meshserve_moe_dropped_tokens", "Tokens dropped by expert capacity limits "
            "(always 0: the MoE layers are dropless).", labels=["slice"])
        for s in self._slices:
            label = [str(s.index)]
            st = s.stats()
            if st.expert_tokens is not None:
                for e, n in enumerate(st.expert_tokens.sum(0)):
                    expert_tokens.add_metric([label[0], str(e)], int(n))
                ratios = st.expert_hotspot_ratios
                if ratios is not None and not np.isnan(ratios).all():
                    hotspot.add_metric(label, float(np.nanmax(ratios)))
                dropped.add_metric(label, st.moe_dropped_tokens)
            running.add_metric(label, st.running)
            waiting.add_metric(label, st.waiting)
            usage.add_metric(label, 1.0 - st.free_pages / max(st.total_pages, 1))
            free.add_metric(label, st.free_pages)
            healthy.add_metric(label, 1.0 if s.healthy else 0.0)
            preempt.add_metric(label, st.preemptions)
            routed.add_metric(label, s.routed)
            late.add_metric(label, st.compiles_after_warmup)
            queries.add_metric(label, st.prefix_cache_queries)
            hits.add_metric(label, st.prefix_cache_hits)
            cached.add_metric(label, st.cached_pages)
            parked.add_metric(label, st.parked)
            per_role[s.role][0] += st.waiting
            per_role[s.role][1] += st.running
        for role, (n_waiting, n_running) in per_role.items():
            roles["waiting"].add_metric([role], n_waiting)
            roles["running"].add_metric([role], n_running)
        yield from (running, waiting, usage, free, healthy, preempt, routed, late, queries, hits,
                    cached, parked, *roles.values(), expert_tokens, hotspot, dropped)


class ServingMetrics:
    """Recorded by the service; exported to Prometheus and, optionally, TensorBoard."""

    def __init__(self, slices: Sequence[Slice]):
        self.slices = slices
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("meshserve_time_to_first_token_seconds",
                              "Request arrival at the server to its first token.", ["slice"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("meshserve_inter_token_latency_seconds",
                             "Time between tokens (a chunk's gap spread over its tokens).",
                             ["slice"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("meshserve_e2e_request_latency_seconds",
                             "Request arrival to its last token.", ["slice"],
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("meshserve_queue_time_seconds",
                               "Engine arrival to first scheduled.", ["slice"],
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("meshserve_prompt_tokens", "Prompt tokens processed.",
                                     ["slice"], registry=r)
        self.generation_tokens = Counter("meshserve_generation_tokens", "Tokens generated.",
                                         ["slice"], registry=r)
        self.finished = Counter("meshserve_requests_finished", "Finished requests.",
                                ["slice", "reason"], registry=r)
        self.rejected = Counter("meshserve_requests_rejected", "Requests refused.",
                                ["reason"], registry=r)
        for reason in REJECT_REASONS:  # export zeros so rates work from the start
            self.rejected.labels(reason)
        self.routing = Counter("meshserve_routing_decisions", "Requests routed, by why their "
                               "slice was chosen (cache, load, only_healthy).", ["reason"],
                               registry=r)
        for reason in REASONS:
            self.routing.labels(reason)
        self.matched = Counter("meshserve_routing_matched_tokens", "Prompt tokens the router "
                               "expected the chosen slice to have cached.", ["slice"],
                               registry=r)
        self.cached = Counter("meshserve_routing_cached_tokens", "Prompt tokens routed "
                              "requests found cached.", ["slice"], registry=r)
        self.stale = Counter("meshserve_routing_stale_hits", "Requests that found fewer "
                             "tokens cached than the router expected (evicted or not yet "
                             "published).", ["slice"], registry=r)
        self.stale_tokens = Counter("meshserve_routing_stale_tokens", "Expected cached tokens "
                                    "that were not.", ["slice"], registry=r)
        for s in slices:
            for counter in (self.matched, self.cached, self.stale, self.stale_tokens):
                counter.labels(str(s.index))
        self.role_queue_time = Histogram(
            "meshserve_role_queue_seconds", "Engine arrival to first scheduled, per slice "
            "role (both; prefill, decode: each side of a handoff).", ["role"],
            buckets=_LATENCY_BUCKETS, registry=r)
        for role in {s.role for s in slices}:
            self.role_queue_time.labels(role)
        self.kv_transfer_bytes = Histogram(
            "meshserve_kv_transfer_bytes", "KV bytes moved per request from its prefill "
            "slice to its decode slice.", buckets=_BYTES_BUCKETS, registry=r)
        self.kv_transfer_seconds = Histogram(
            "meshserve_kv_transfer_seconds", "First token out on the prefill slice to the "
            "KV queued on a decode slice (export, copy, import).",
            buckets=_TRANSFER_BUCKETS, registry=r)
        self.kv_transfer_failures = Counter(
            "meshserve_kv_transfer_failures", "KV handoffs that failed, by kind (export, "
            "transfer, no_decode_slice, decode_overloaded, import).", ["kind"], registry=r)
        if any(s.role == PREFILL for s in slices):
            for kind in FAILURE_KINDS:
                self.kv_transfer_failures.labels(kind)
        r.register(_SliceCollector(slices))
        self.startup = Gauge("meshserve_startup_seconds", "Process start to ready, by phase "
                             "(load, warmup, other, ready).", ["phase"], registry=r)
        self.startup_programs = Gauge("meshserve_startup_programs", "Programs built during "
                                      "warm-up, by source (compiled, cache).", ["source"],
                                      registry=r)
        # Running sums for TensorBoard's per-interval means (read by its thread).
        self._lock = threading.Lock()
        self._sums: dict[str, list[float]] = {}
        self.totals = {"finished": 0, "rejected": 0, "prompt_tokens": 0, "generation_tokens": 0}

    def _add(self, name: str, value: float) -> None:
        with self._lock:
            acc = self._sums.setdefault(name, [0.0, 0])
            acc[0] += value
            acc[1] += 1

    def take_means(self) -> dict[str, float]:
        with self._lock:
            sums, self._sums = self._sums, {}
        return {k: s / n for k, (s, n) in sums.items() if n}

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()
        self.totals["rejected"] += 1

    def routed(self, slice_index: int, reason: str, matched_tokens: int) -> None:
        self.routing.labels(reason).inc()
        self.matched.labels(str(slice_index)).inc(matched_tokens)

    def cache_outcome(self, slice_index: int, matched_tokens: int, cached_tokens: int) -> None:
        """A routed request finished having found `cached_tokens` of its prompt cached."""
        label = str(slice_index)
        self.cached.labels(label).inc(cached_tokens)
        if cached_tokens < matched_tokens:
            self.stale.labels(label).inc()
            self.stale_tokens.labels(label).inc(matched_tokens - cached_tokens)

    def role_queue(self, role: str, seconds: float) -> None:
        if role in (BOTH, PREFILL, DECODE):
            self.role_queue_time.labels(role).observe(seconds)

    def kv_transfer(self, nbytes: int, seconds: float) -> None:
        self.kv_transfer_bytes.observe(nbytes)
        self.kv_transfer_seconds.observe(seconds)
        self._add("kv_transfer_ms", seconds * 1e3)

    def transfer_failure(self, kind: str) -> None:
        self.kv_transfer_failures.labels(kind).inc()

    def first_token(self, slice_index: int, seconds: float) -> None:
        self.ttft.labels(str(slice_index)).observe(seconds)
        self._add("ttft_ms", seconds * 1e3)

    def tokens(self, slice_index: int, gap_seconds: float, count: int) -> None:
        """A later chunk of `count` tokens arrived `gap_seconds` after the previous one."""
        per_token = gap_seconds / count
        hist = self.itl.labels(str(slice_index))
        for _ in range(count):
            hist.observe(per_token)
        self._add("itl_ms", per_token * 1e3)

    def finish(self, slice_index: int, reason: str, e2e_seconds: float, queue_ms: float | None,
               prompt_tokens: int, generated_tokens: int) -> None:
        label = str(slice_index)
        self.e2e.labels(label).observe(e2e_seconds)
        if queue_ms is not None:
            self.queue.labels(label).observe(queue_ms / 1e3)
            self._add("queue_ms", queue_ms)
        self._add("e2e_ms", e2e_seconds * 1e3)
        self.finished.labels(label, reason).inc()
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.generation_tokens.labels(label).inc(generated_tokens)
        self.totals["finished"] += 1
        self.totals["prompt_tokens"] += prompt_tokens
        self.totals["generation_tokens"] += generated_tokens


def start_prometheus(metrics: ServingMetrics, port: int, host: str = "127.0.0.1"):
    """Serve /metrics; returns the HTTP server (call .shutdown() to stop it)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server


class TensorBoardWriter:
    """Writes the same scalars every `interval` seconds with tensorboard's own writer
    (no TensorFlow needed: `tensorboard.summary.Writer` writes the event files)."""

    def __init__(self, metrics: ServingMetrics, logdir: str, interval: float = 10.0):
        from tensorboard.summary import Writer

        self._metrics = metrics
        self._writer = Writer(logdir)
        self._interval = interval
        self._stop = threading.Event()
        self._step = 0
        self._thread = threading.Thread(target=self._run, name="tensorboard", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def write_once(self) -> None:
        m = self._metrics
        self._step += 1
        scalars: dict[str, float] = {f"server/{k}": float(v) for k, v in m.totals.items()}
        scalars.update({f"latency/{k}": v for k, v in m.take_means().items()})
        for s in m.slices:
            st = s.stats()
            scalars[f"slice{s.index}/running"] = st.running
            scalars[f"slice{s.index}/waiting"] = st.waiting
            scalars[f"slice{s.index}/kv_cache_usage"] = 1.0 - st.free_pages / max(
                st.total_pages, 1)
            scalars[f"slice{s.index}/preemptions"] = st.preemptions
            scalars[f"slice{s.index}/healthy"] = 1.0 if s.healthy else 0.0
            scalars[f"slice{s.index}/prefix_cache_hits"] = st.prefix_cache_hits
            scalars[f"slice{s.index}/prefix_cache_queries"] = st.prefix_cache_queries
        now = time.time()
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, float(value), self._step, wall_time=now)
        self._writer.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.write_once()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.write_once()
        self._writer.close()
