"""Metrics of cross-server prefill/decode. KV bytes and transfer time per request and
failures by kind go to the in-server P/D's metrics (ServingMetrics: the same
meshserve_kv_transfer_bytes/_seconds and meshserve_kv_transfer_failures{kind}, on the
decode server); this adds retries and how many requests each role holds per stage."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

_SECONDS_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Labels of meshserve_kv_transfer_failures across servers (exported as zeros).
FAILURE_KINDS = ("prefill_unavailable", "prefill_error", "prefill_timeout", "bad_offer",
                 "layout", "transfer_timeout", "transfer_error", "admit", "reclaimed")
STAGES = {"prefill": ("prefilling", "offered"), "decode": ("remote_prefill", "transfer")}
TIMED = {"prefill": ("prefilling", "export", "offered"),
         "decode": ("remote_prefill", "transfer", "pull")}


class DisaggMetrics:
    def __init__(self, serving, role: str):
        self.role = role
        self.serving = serving  # ServingMetrics
        r = serving.registry
        for kind in FAILURE_KINDS:
            serving.kv_transfer_failures.labels(kind)
        self.retries = Counter("meshserve_prefill_retries", "Requests retried on another "
                               "prefill peer (nothing streamed yet).", registry=r)
        self.stage = Gauge("meshserve_disagg_requests", "Requests in each prefill/decode "
                           "stage of this server's role.", ["role", "stage"], registry=r)
        self.stage_seconds = Histogram("meshserve_disagg_stage_seconds", "Time per request "
                                       "in each stage (remote_prefill: request sent to first "
                                       "token; transfer: first token to KV here; pull: the "
                                       "pull alone; prefilling: to the first token; export: "
                                       "gathering the KV; offered: offer to acknowledgement).",
                                       ["role", "stage"], buckets=_SECONDS_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        for stage in STAGES[role]:
            self.stage.labels(role, stage).set(0)
        for stage in TIMED[role]:
            self.stage_seconds.labels(role, stage)

    def enter(self, stage: str) -> None:
        self._move(stage, 1)

    def leave(self, stage: str, seconds: float | None = None) -> None:
        self._move(stage, -1)
        if seconds is not None:
            self.stage_seconds.labels(self.role, stage).observe(seconds)

    def _move(self, stage: str, delta: int) -> None:
        with self._lock:
            n = self._counts[stage] = self._counts.get(stage, 0) + delta
        self.stage.labels(self.role, stage).set(n)

    def count(self, stage: str) -> int:
        with self._lock:
            return self._counts.get(stage, 0)

    def timed(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(self.role, stage).observe(seconds)

    def transfer(self, nbytes: int, seconds: float) -> None:
        """One request's KV here: first token out to the KV on this server."""
        self.serving.kv_transfer(nbytes, seconds)

    def failure(self, kind: str) -> None:
        self.serving.transfer_failure(kind)
