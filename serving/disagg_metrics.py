"""Metrics of cross-server prefill/decode: KV bytes and transfer time per request,
transfer failures by kind, and how many requests each role holds in each stage."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BYTES_BUCKETS = tuple(4 ** k * 1024 for k in range(12))  # 1 KiB .. 4 GiB
_SECONDS_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Labels of meshserve_kv_transfer_failures (exported as zeros from the start).
FAILURE_KINDS = ("prefill_unavailable", "prefill_error", "prefill_timeout", "bad_offer",
                 "layout", "transfer_timeout", "transfer_error", "admit", "reclaimed")
STAGES = {"prefill": ("prefilling", "offered"), "decode": ("remote_prefill", "transfer")}


class DisaggMetrics:
    def __init__(self, registry: CollectorRegistry, role: str):
        self.role = role
        r = registry
        self.kv_bytes = Histogram("meshserve_kv_transfer_bytes", "KV bytes moved per "
                                  "request from prefill to decode.", ["path"],
                                  buckets=_BYTES_BUCKETS, registry=r)
        self.kv_seconds = Histogram("meshserve_kv_transfer_seconds", "Time to move one "
                                    "request's KV (remote: the pull; offer: the export).",
                                    ["path"], buckets=_SECONDS_BUCKETS, registry=r)
        self.failures = Counter("meshserve_kv_transfer_failures", "Prefill/transfer "
                                "failures, by kind.", ["kind"], registry=r)
        for kind in FAILURE_KINDS:
            self.failures.labels(kind)
        self.retries = Counter("meshserve_prefill_retries", "Requests retried on another "
                               "prefill peer (nothing streamed yet).", registry=r)
        self.stage = Gauge("meshserve_disagg_requests", "Requests in each prefill/decode "
                           "stage of this server's role.", ["role", "stage"], registry=r)
        self.stage_seconds = Histogram("meshserve_disagg_stage_seconds", "Time per request "
                                       "in each stage (remote_prefill: request sent to first "
                                       "token; transfer: offer received to KV here).",
                                       ["role", "stage"], buckets=_SECONDS_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        for stage in STAGES[role]:
            self.stage.labels(role, stage).set(0)

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

    def transfer(self, nbytes: int, seconds: float, path: str = "remote") -> None:
        self.kv_bytes.labels(path).observe(nbytes)
        self.kv_seconds.labels(path).observe(seconds)

    def kv_offer(self, nbytes: int, seconds: float) -> None:
        self.transfer(nbytes, seconds, "offer")

    def failure(self, kind: str) -> None:
        self.failures.labels(kind).inc()
