"""Metrics that the ecosystem's tools read, beside ServingMetrics' `meshserve_*` series,
in the same registry (so on `--metrics-port` and on the HTTP API's /metrics alike).

- vLLM's names and meanings, labelled `model_name` and `engine` (the slice index: vLLM
  labels its data-parallel engines so), so a Gateway API Inference Extension endpoint
  picker (`vllm:num_requests_waiting`, `vllm:num_requests_running`,
  `vllm:kv_cache_usage_perc`, `vllm:cache_config_info{block_size,num_gpu_blocks}`) and
  vLLM's Grafana dashboards work unchanged. Gauges are read from `engine.stats()` at
  scrape time. As in vLLM, prompt tokens count once a request's prefill is done (its
  first token) and generation tokens as they stream, so both move while requests run.
- Server-side TPOT (`meshserve_time_per_output_token_seconds`: a request's time from
  first to last token over its tokens after the first) and, with `--slo`, goodput
  (`meshserve_requests_within_slo`: completed requests that met every target).
- Where a step's host time goes (`meshserve_step_host_seconds{slice,phase}`): planning
  and building the batch ("schedule"), moving its inputs to the devices ("transfer"),
  launching the program ("dispatch"), blocking on its results ("device_wait", which on
  an accelerator is mostly device time) and applying them ("results"). What the device
  does meanwhile (kernels, collectives) is for the profiler (serving/profiling.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from meshserve.serving.slices import Slice

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards' quantiles mean the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Finer at the low end for the server's own TPOT: CPU and accelerator decode steps differ
# by orders of magnitude.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
STEP_PHASES = ("schedule", "transfer", "dispatch", "device_wait", "results")
STEP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Engine finish reasons as vLLM names them in vllm:request_success{finished_reason}.
_VLLM_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft_ms=500,tpot_ms=50` (also e2e_ms) → {"ttft_ms": 500.0, "tpot_ms": 50.0}."""
    slo: dict[str, float] = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--slo terms are KEY=MS with KEY one of {SLO_KEYS}, got {part!r}")
        try:
            slo[key] = float(value)
        except ValueError:
            raise ValueError(f"--slo {key} must be a number of milliseconds, got {value!r}") \
                from None
        if not slo[key] > 0:
            raise ValueError(f"--slo {key} must be > 0, got {value}")
    return slo


def met_slo(slo: Mapping[str, float], ttft_s: float | None, tpot_s: float | None,
            e2e_s: float) -> bool:
    """Whether a completed request met every target (a request of one token has no TPOT
    and meets any TPOT target)."""
    measured = {"ttft_ms": None if ttft_s is None else ttft_s * 1e3,
                "tpot_ms": None if tpot_s is None else tpot_s * 1e3, "e2e_ms": e2e_s * 1e3}
    for key, limit in slo.items():
        value = measured[key]
        if value is None:
            if key == "ttft_ms":
                return False
            continue
        if value > limit:
            return False
    return True


class _VllmGauges:
    """vLLM's scheduler and cache gauges, per slice, read at scrape time."""

    def __init__(self, slices: Sequence[Slice], model_name: str):
        self._slices = slices
        self._model = model_name

    def collect(self):
        labels = ["model_name", "engine"]
        running = GaugeMetricFamily("vllm:num_requests_running",
                                    "Number of requests in model execution batches.",
                                    labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting",
                                    "Number of requests waiting to be processed.", labels=labels)
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc",
                                  "KV-cache usage. 1 means 100 percent usage.", labels=labels)
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine "
                                 "CacheConfig (block_size: tokens per KV page; "
                                 "num_gpu_blocks: KV pages).",
                                 labels=[*labels, "block_size", "num_gpu_blocks"])
        preempt = CounterMetricFamily("vllm:num_preemptions",
                                      "Cumulative number of preemption from the engine.",
                                      labels=labels)
        for s in self._slices:
            label = [self._model, str(s.index)]
            st = s.stats()
            running.add_metric(label, st.running)
            waiting.add_metric(label, st.waiting)
            usage.add_metric(label, 1.0 - st.free_pages / max(st.total_pages, 1))
            info.add_metric([*label, str(s.engine.config.page_size), str(st.total_pages)], 1.0)
            preempt.add_metric(label, st.preemptions)
        yield from (running, waiting, usage, info, preempt)


class CompatMetrics:
    """Recorded by the shared request path (serving/core.py) beside ServingMetrics."""

    def __init__(self, registry: CollectorRegistry, slices: Sequence[Slice], model_name: str,
                 slo: Mapping[str, float] | None = None):
        self.model_name = model_name
        self.slo = dict(slo or {})
        r = registry
        labels = ["model_name", "engine"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", labels,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", labels,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", labels,
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", labels,
                               buckets=REQUEST_BUCKETS, registry=r)
        self.request_tpot = Histogram("vllm:request_time_per_output_token_seconds",
                                      "Histogram of time_per_output_token_seconds per request.",
                                      labels, buckets=ITL_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.", labels,
                                         registry=r)
        self.success = Counter("vllm:request_success", "Count of successfully processed "
                               "requests.", [*labels, "finished_reason"], registry=r)
        self.tpot = Histogram("meshserve_time_per_output_token_seconds",
                              "Per request: first to last token over the tokens after the "
                              "first (requests of 2+ tokens).", ["slice"],
                              buckets=TPOT_BUCKETS, registry=r)
        self.within_slo = Counter("meshserve_requests_within_slo", "Completed requests that "
                                  "met every --slo target (goodput; 0 without --slo).",
                                  ["slice"], registry=r)
        self.step_host = Histogram("meshserve_step_host_seconds", "Host time of a step, by "
                                   "phase (schedule, transfer, dispatch, device_wait, "
                                   "results).", ["slice", "phase"], buckets=STEP_BUCKETS,
                                   registry=r)
        r.register(_VllmGauges(slices, model_name))
        for s in slices:  # export zeros from the start, so rates and ratios work at once
            label = (model_name, str(s.index))
            for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl,
                           self.e2e, self.queue, self.request_tpot):
                metric.labels(*label)
            self.within_slo.labels(str(s.index))
            self.tpot.labels(str(s.index))
            for phase in STEP_PHASES:
                self.step_host.labels(str(s.index), phase)

    def observe_steps(self, slices: Sequence[Slice]) -> None:
        """Have each slice's engine report its step phases into meshserve_step_host_seconds
        (the latest server to call this gets them: tests run servers over shared engines)."""
        for s in slices:
            children = {p: self.step_host.labels(str(s.index), p) for p in STEP_PHASES}
            s.engine.step_observer = lambda phase, seconds, c=children: c[phase].observe(seconds)

    def _labels(self, slice_index: int) -> tuple[str, str]:
        return self.model_name, str(slice_index)

    def first_token(self, slice_index: int, seconds: float, prompt_tokens: int) -> None:
        label = self._labels(slice_index)
        self.ttft.labels(*label).observe(seconds)
        self.prompt_tokens.labels(*label).inc(prompt_tokens)

    def tokens(self, slice_index: int, gap_seconds: float, count: int) -> None:
        """A later chunk of `count` tokens `gap_seconds` after the previous one: vLLM
        observes one inter-token latency per token."""
        hist = self.itl.labels(*self._labels(slice_index))
        for _ in range(count):
            hist.observe(gap_seconds / count)

    def generated(self, slice_index: int, count: int) -> None:
        self.generation_tokens.labels(*self._labels(slice_index)).inc(count)

    def finish(self, slice_index: int, reason: str, e2e_seconds: float,
               queue_ms: float | None, ttft_seconds: float | None,
               tpot_seconds: float | None, completed: bool) -> None:
        label = self._labels(slice_index)
        self.e2e.labels(*label).observe(e2e_seconds)
        if queue_ms is not None:
            self.queue.labels(*label).observe(queue_ms / 1e3)
        if tpot_seconds is not None:
            self.request_tpot.labels(*label).observe(tpot_seconds)
            self.tpot.labels(str(slice_index)).observe(tpot_seconds)
        if completed and reason in _VLLM_REASONS:
            self.success.labels(*label, _VLLM_REASONS[reason]).inc()
        if (completed and self.slo and reason != "abort"
                and met_slo(self.slo, ttft_seconds, tpot_seconds, e2e_seconds)):
            self.within_slo.labels(str(slice_index)).inc()
