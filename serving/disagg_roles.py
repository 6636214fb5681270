"""A server's prefill/decode role across processes (`meshserve serve --role ...`).

colocated (default): prefill and decode on this server's own slices.
prefill: also serves the internal Prefill API (serving/prefill_server.py) on the gRPC
  port, with the same TLS and token; public Generate keeps working colocated (handy for
  checks), but a deployment points clients at the decode servers.
decode: clients' requests are prefilled by --prefill-peers and decoded here
  (serving/remote_prefill.py).
Both P/D roles start a KV transfer server (engine/kv_transfer.py), on loopback unless
--kv-transfer-insecure acknowledges a trusted fabric.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

from meshserve.serving.disagg_metrics import DisaggMetrics
from meshserve.serving.prefill_server import PrefillOptions
from meshserve.serving.remote_prefill import DecodeOptions
from meshserve.serving.routing import RoutingConfig
from meshserve.serving.slices import Router, Slice

ROLES = ("colocated", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class DisaggOptions:
    role: str = "colocated"
    kv_transfer_address: str = "127.0.0.1:0"
    kv_transfer_insecure: bool = False  # the operator vouches for the fabric
    prefill: PrefillOptions = dataclasses.field(default_factory=PrefillOptions)
    decode: DecodeOptions | None = None  # role "decode" only

    def check(self) -> None:
        from meshserve.engine.kv_transfer import check_address

        if self.role not in ROLES:
            raise ValueError(f"--role must be one of {ROLES}, got {self.role!r}")
        if self.role == "decode":
            if self.decode is None:
                raise ValueError("--role decode needs --prefill-peers")
            self.decode.check()
        elif self.decode is not None and self.decode.prefill_peers:
            raise ValueError("--prefill-peers needs --role decode")
        if self.role != "colocated":
            check_address(self.kv_transfer_address, self.kv_transfer_insecure)


class Role:
    """What a role adds to a server: its router (decode), its internal service (prefill),
    the transfer server and the metrics."""

    def __init__(self, options: DisaggOptions, slices: Sequence[Slice],
                 routing: RoutingConfig, metrics):
        options.check()
        self.options = options
        self.name = options.role
        self.router: Router | None = None
        self.transport = None
        self.metrics: DisaggMetrics | None = None
        self.servicer = None
        if self.name == "colocated":
            return
        from meshserve.engine.kv_transfer import KVTransport

        o = options
        self.metrics = DisaggMetrics(metrics, self.name)
        timeout = o.decode.transfer_timeout_s if o.decode else o.prefill.reclaim_timeout_s
        self.transport = KVTransport(o.kv_transfer_address, allow_remote=o.kv_transfer_insecure,
                                     ttl_s=o.prefill.offer_ttl_s, pull_timeout_s=timeout,
                                     device=slices[0].engine.model.rules.mesh.devices.flat[0])
        if self.name == "decode":
            from meshserve.serving.remote_prefill import RemotePrefillRouter

            self.router = RemotePrefillRouter(slices, routing, o.decode, self.transport,
                                              self.metrics)

    def add_services(self, server, slices: Sequence[Slice], tokenizer, limits) -> list[str]:
        """Register the role's gRPC services; returns their names (for health/reflection)."""
        if self.name != "prefill":
            return []
        from meshserve.serving.prefill_server import INTERNAL_SERVICE, PrefillServicer
        from meshserve.serving.proto import internal_pb2_grpc as ipb_grpc

        self.servicer = PrefillServicer(slices, tokenizer, limits, self.transport, self.metrics,
                                        self.options.prefill)
        ipb_grpc.add_PrefillServicer_to_server(self.servicer, server)
        return [INTERNAL_SERVICE]

    def drain(self) -> None:
        if self.servicer is not None:
            self.servicer.draining = True

    @property
    def busy(self) -> int:
        """Calls the internal service is still answering (shutdown waits for them)."""
        return sum(self.servicer.inflight.values()) if self.servicer is not None else 0

    async def close(self) -> None:
        if self.router is not None:
            await self.router.peers.close()
        if self.transport is not None:
            await asyncio.to_thread(self.transport.expire, float("inf"))

    def describe(self) -> dict:
        out: dict = {"role": self.name}
        if self.transport is not None:
            out["kv_transfer_address"] = self.transport.address
        if self.router is not None:
            out["prefill_peers"] = list(self.options.decode.prefill_peers)
        return out
