"""The KV handoff of a request from its prefill slice to a decode slice, in one server.

A request starts on a prefill slice as a prefill-only request (serving/slices.Router).
When its first token is out (and streamed to the client at once) the engine parks it;
`hand_off` then, on a worker thread: exports the parked KV (a gather on the prefill
mesh), picks a decode slice (free pages, then least running + queued tokens), copies
the KV there with `jax.device_put` (resharding between the two layouts), queues it with
`add_prefilled` and frees the prefill side's pages. The client's stream goes on from
the decode slice with the second token: the engines never emit a token twice.

Failures: an export, copy or import that fails (or no decode slice takes it) frees the
pages on both sides and ends the request with UNAVAILABLE after the token already sent
(SliceFailedError), counted in meshserve_kv_transfer_failures by kind. A request
cancelled meanwhile (client gone, deadline, shutdown) is never added to a decode slice
after its cancellation, and one already added is aborted there (Generation.abort).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING

from meshserve.engine.engine import EngineDeadError, EngineOverloadedError
from meshserve.engine.handoff import HandoffError, NotParkedError
from meshserve.serving.proto import meshserve_pb2 as pb

if TYPE_CHECKING:
    from meshserve.serving.core import Generation

# Failure kinds (the label of meshserve_kv_transfer_failures).
EXPORT, TRANSFER, NO_DECODE_SLICE, DECODE_OVERLOADED, IMPORT = (
    "export", "transfer", "no_decode_slice", "decode_overloaded", "import")
FAILURE_KINDS = (EXPORT, TRANSFER, NO_DECODE_SLICE, DECODE_OVERLOADED, IMPORT)


class HandoffFailed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass
class HandoffRecord:
    """What one request's handoff cost (the final response's timings)."""

    prefill_slice: int
    prefill_queue_ms: float | None
    prefill_ms: float | None
    ttft_ms: float | None  # the prefill engine's: engine arrival → first token
    started: float = 0.0  # perf_counter when the first token was out
    transfer_s: float = 0.0  # first token out → KV in the decode slice's hands
    copy_s: float = 0.0  # of which the device_put between the meshes
    nbytes: int = 0
    decode_slice: int | None = None
    decode_started: float | None = None  # perf_counter when queued on the decode slice

    def fill(self, timings: pb.Timings, decode_queue_ms: float | None, end: float) -> None:
        timings.queue_ms = self.prefill_queue_ms or 0.0
        timings.ttft_ms = self.ttft_ms or 0.0
        timings.prefill_ms = self.prefill_ms or 0.0
        timings.transfer_ms = self.transfer_s * 1e3
        timings.decode_queue_ms = decode_queue_ms or 0.0
        if self.decode_started is not None:
            timings.decode_ms = (end - self.decode_started) * 1e3
        timings.kv_transfer_bytes = self.nbytes


async def hand_off(gen: Generation, prefilled) -> None:
    """Move `gen` from its prefill slice to a decode slice (see the module docstring).
    `prefilled`: the prefill engine's PREFILLED chunk. Raises HandoffFailed."""
    core = gen.core
    record = HandoffRecord(gen.slice.index, prefilled.queue_ms,
                           None, prefilled.ttft_ms, started=time.perf_counter())
    gen.handoff = record
    try:
        await asyncio.to_thread(_move, gen, record)
    except HandoffFailed as e:
        core.metrics.transfer_failure(e.kind)
        raise
    core.metrics.kv_transfer(record.nbytes, record.transfer_s)
    if prefilled.queue_ms is not None:
        core.metrics.role_queue("prefill", prefilled.queue_ms / 1e3)


def _move(gen: Generation, record: HandoffRecord) -> None:
    """The blocking half (a worker thread): export, copy, import, release."""
    core, rid, cost = gen.core, gen.request_id, gen.prepared.cost_tokens
    prefill = gen.slice
    try:
        try:
            handoff = prefill.engine.export_kv(rid)
        except (NotParkedError, EngineDeadError) as e:
            raise HandoffFailed(EXPORT, f"exporting the KV failed: {e}") from None
        record.prefill_ms = handoff.prefill_ms
        record.nbytes = handoff.layout.nbytes
        order = core.router.decode_order(handoff.layout.pages + 1)
        if not order:
            raise HandoffFailed(NO_DECODE_SLICE, "no healthy decode slice")
        overloaded = None
        for target in order:
            copy_started = time.perf_counter()
            try:
                placed = target.engine.receive_kv(handoff)
            except Exception as e:  # noqa: BLE001 - any copy failure is a transfer failure
                raise HandoffFailed(TRANSFER, f"copying the KV to slice {target.index} "
                                    f"failed: {type(e).__name__}: {e}") from None
            record.copy_s = time.perf_counter() - copy_started
            with gen.stage_lock:
                if gen.cancelled:
                    return  # close() aborted the prefill side; nothing starts here
                try:
                    handle = target.engine.add_prefilled(placed, request_id=rid,
                                                         priority=gen.prepared.priority)
                except EngineOverloadedError as e:
                    overloaded = e
                    continue
                except EngineDeadError:
                    continue
                except HandoffError as e:
                    raise HandoffFailed(IMPORT, f"slice {target.index} refused the KV: {e}"
                                        ) from None
                now = time.perf_counter()
                record.transfer_s = now - record.started
                record.decode_slice, record.decode_started = target.index, now
                core.router.release(prefill, cost)
                core.router.assign(target, cost)
                gen.prefill_slice, gen.slice, gen.handle = prefill, target, handle
            return
        if overloaded is not None:
            raise HandoffFailed(DECODE_OVERLOADED, f"every decode slice is full: {overloaded}")
        raise HandoffFailed(NO_DECODE_SLICE, "no healthy decode slice")
    finally:
        prefill.engine.release_parked(rid)  # the KV is a copy now (or not needed)
