"""Moving KV arrays between processes with `jax.experimental.transfer`, made safe.

The raw API (`start_transfer_server`, `await_pull(uuid, arrays)`,
`connect(addr).pull(uuid, specs)`) has three sharp edges measured on jax 0.10.2 (see
/work/shared/notes/jax-facts.md): it does not reshard (a destination whose per-shard
layout differs gets silently wrong data), a pull of an unknown or consumed uuid never
returns (its own timeout does not fire), and it is neither authenticated nor encrypted.
So this module:

- describes every offered array (`ArrayLayout`: global shape, dtype, mesh shape and
  axes, partition spec, per-shard shape, shard count) for the side channel to carry, and
  checks it against the puller's destination *before* pulling: equal layouts pull
  directly; same global shape/dtype but another sharding pulls into a staging layout equal
  to the offer's (on the puller's devices) and reshards locally with `device_put`;
  anything else raises `LayoutMismatchError` without touching the transfer server;
- runs every blocking pull in a worker thread and gives up after a timeout
  (`TransferTimeoutError`; the thread is abandoned and counted, never joined);
- keeps offers in a bounded table with a TTL: an offer nobody pulled is reclaimed by
  pulling it from ourselves (which consumes it in the transfer server, so its buffers
  are released) and then dropped;
- binds loopback unless `allow_remote` acknowledges a trusted fabric.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class TransferError(Exception):
    """A KV transfer failed; `kind` labels meshserve_kv_transfer_failures."""

    kind = "error"


class LayoutMismatchError(TransferError):
    kind = "layout"


class TransferTimeoutError(TransferError):
    kind = "timeout"


class OfferUnavailableError(TransferError):
    kind = "unknown_offer"


class InsecureTransferError(ValueError):
    """A non-loopback transfer address without the explicit insecure-fabric flag."""


@dataclasses.dataclass(frozen=True)
class ArrayLayout:
    """Everything that decides which bytes land on which device for one array."""

    shape: tuple[int, ...]
    dtype: str
    mesh_axes: tuple[str, ...]
    mesh_shape: tuple[int, ...]
    # One entry per array dimension: the mesh axes it is split over (() = not split).
    spec: tuple[tuple[str, ...], ...]
    shard_shape: tuple[int, ...]
    num_shards: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * jnp.dtype(self.dtype).itemsize

    def describe(self) -> str:
        mesh = ",".join(f"{a}={n}" for a, n in zip(self.mesh_axes, self.mesh_shape, strict=True))
        return (f"{self.dtype}{list(self.shape)} on mesh({mesh}) spec={list(self.spec)} "
                f"shard={list(self.shard_shape)}x{self.num_shards}")


def _spec_entries(spec: PartitionSpec, ndim: int) -> tuple[tuple[str, ...], ...]:
    out = []
    for i in range(ndim):
        entry = spec[i] if i < len(spec) else None
        if entry is None:
            out.append(())
        elif isinstance(entry, str):
            out.append((entry,))
        else:
            out.append(tuple(entry))
    return tuple(out)


def layout_of(shape: Sequence[int], dtype, sharding: jax.sharding.Sharding) -> ArrayLayout:
    """The layout of an array (or a destination) with this shape, dtype and sharding."""
    shape = tuple(int(d) for d in shape)
    if isinstance(sharding, SingleDeviceSharding):  # no mesh: one whole shard
        return ArrayLayout(shape=shape, dtype=jnp.dtype(dtype).name, mesh_axes=(),
                           mesh_shape=(), spec=((),) * len(shape), shard_shape=shape,
                           num_shards=1)
    if not isinstance(sharding, NamedSharding):
        raise LayoutMismatchError(f"only NamedSharding and SingleDeviceSharding are "
                                  f"supported, got {type(sharding).__name__}")
    mesh = sharding.mesh
    return ArrayLayout(
        shape=shape, dtype=jnp.dtype(dtype).name, mesh_axes=tuple(mesh.axis_names),
        mesh_shape=tuple(int(n) for n in mesh.devices.shape),
        spec=_spec_entries(sharding.spec, len(shape)),
        shard_shape=tuple(int(d) for d in sharding.shard_shape(shape)),
        num_shards=len(sharding.device_set),
    )


def array_layout(x: jax.Array) -> ArrayLayout:
    return layout_of(x.shape, x.dtype, x.sharding)


def _sharding_for(layout: ArrayLayout, devices: Sequence[jax.Device]) -> jax.sharding.Sharding:
    if not layout.mesh_axes:
        return SingleDeviceSharding(devices[0])
    n = int(np.prod(layout.mesh_shape, dtype=np.int64))
    if len(devices) < n:
        raise LayoutMismatchError(
            f"the offer is laid out over {n} devices ({layout.describe()}) but the puller "
            f"has {len(devices)}: cannot stage it")
    mesh = Mesh(np.array(list(devices)[:n], dtype=object).reshape(layout.mesh_shape),
                layout.mesh_axes)
    spec = PartitionSpec(*[(e[0] if len(e) == 1 else e) if e else None for e in layout.spec])
    return NamedSharding(mesh, spec)


@dataclasses.dataclass(frozen=True)
class PullPlan:
    """How to pull one offer into the destination: `stage` are the shardings to pull into
    (equal to the offer's layouts), `reshard[i]` says array i needs a local device_put."""

    stage: tuple[jax.sharding.Sharding, ...]
    reshard: tuple[bool, ...]


def plan_pull(offered: Sequence[ArrayLayout], destination: Sequence[jax.ShapeDtypeStruct],
              allow_reshard: bool = True) -> PullPlan:
    """Check the offer against the destination before anything is pulled; raises
    LayoutMismatchError with the first difference."""
    if len(offered) != len(destination):
        raise LayoutMismatchError(
            f"the offer has {len(offered)} arrays, the destination expects {len(destination)}")
    stage, reshard = [], []
    for i, (off, dst) in enumerate(zip(offered, destination, strict=True)):
        want = layout_of(dst.shape, dst.dtype, dst.sharding)
        if off.shape != want.shape or off.dtype != want.dtype:
            raise LayoutMismatchError(
                f"array {i}: offered {off.dtype}{list(off.shape)}, destination expects "
                f"{want.dtype}{list(want.shape)}")
        if off == want:
            stage.append(dst.sharding)
            reshard.append(False)
            continue
        if not allow_reshard:
            raise LayoutMismatchError(
                f"array {i}: offered {off.describe()}, destination is {want.describe()} "
                f"(the transfer does not reshard)")
        # Staged on the destination's devices first, then on this process's others (an
        # offer split wider than the destination needs that many devices for a moment).
        mine = sorted(dst.sharding.device_set, key=lambda d: d.id)
        staged = _sharding_for(off, mine + [d for d in jax.local_devices(
            backend=mine[0].platform) if d not in mine])
        if layout_of(off.shape, off.dtype, staged) != off:
            raise LayoutMismatchError(f"array {i}: cannot rebuild {off.describe()} here")
        stage.append(staged)
        reshard.append(True)
    return PullPlan(tuple(stage), tuple(reshard))


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(address: str, allow_remote: bool, what: str = "--kv-transfer-address") -> None:
    if not allow_remote and not _is_loopback(address):
        raise InsecureTransferError(
            f"{what} {address} is not loopback: jax.experimental.transfer is neither "
            f"authenticated nor encrypted, so KV (users' data) would cross the network in "
            f"clear. Use it only on a trusted, isolated fabric and say so with "
            f"--kv-transfer-insecure")


@dataclasses.dataclass
class Offer:
    uuid: int
    arrays: list[jax.Array] | None
    layouts: tuple[ArrayLayout, ...]
    expires_at: float
    on_done: Callable[[str], None] | None = None  # called once: "consumed"/"expired"/...

    @property
    def nbytes(self) -> int:
        return sum(layout.nbytes for layout in self.layouts)


@dataclasses.dataclass
class TransferStats:
    offered: int = 0
    consumed: int = 0
    reclaimed: int = 0  # offers nobody pulled, taken back by pulling them ourselves
    expired: int = 0  # offers past their TTL (then reclaimed)
    pulls: int = 0
    resharded: int = 0  # pulls staged in the offer's layout, then resharded here
    abandoned_pulls: int = 0  # pull threads given up on after the timeout (still blocked)
    refused_offers: int = 0  # table full


def _bounded(fn: Callable[[], object], timeout_s: float, name: str) -> object:
    """fn() in a daemon thread, waiting at most timeout_s; raises TransferTimeoutError
    (the thread is left blocked: the transfer API cannot cancel a pull)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            box["error"] = e

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TransferTimeoutError(f"{name} did not complete in {timeout_s:.1f} s")
    if "error" in box:
        raise TransferError(f"{name} failed: {box['error']}") from box["error"]
    return box["value"]


class KVTransport:
    """One process's transfer server: offers arrays for peers to pull, and pulls theirs."""

    def __init__(self, address: str = "127.0.0.1:0", allow_remote: bool = False,
                 ttl_s: float = 30.0, pull_timeout_s: float = 10.0, max_offers: int = 256,
                 device: jax.Device | None = None):
        from jax.experimental import transfer

        check_address(address, allow_remote)
        self.allow_remote = allow_remote
        self.ttl_s = ttl_s
        self.pull_timeout_s = pull_timeout_s
        self.max_offers = max_offers
        client = (device or jax.devices()[0]).client
        host = address.rsplit(":", 1)[0]
        self._server = transfer.start_transfer_server(client, address, [f"{host}:0"])
        self.address = self._server.address()
        self._offers: dict[int, Offer] = {}
        self._lock = threading.Lock()
        self._connections: dict[str, object] = {}
        # Random start: a restarted peer must never reuse a uuid a puller still holds.
        self._ids = itertools.count(secrets.randbits(48) + 1)
        self.stats = TransferStats()

    # Offering side.
    def offer(self, arrays: Sequence[jax.Array],
              on_done: Callable[[str], None] | None = None) -> Offer:
        self.expire()
        layouts = tuple(array_layout(x) for x in arrays)
        with self._lock:
            if len(self._offers) >= self.max_offers:
                self.stats.refused_offers += 1
                raise TransferError(f"{len(self._offers)} KV offers are pending (the most "
                                    f"allowed): refusing another")
            uid = next(self._ids)
            offer = Offer(uid, list(arrays), layouts, time.monotonic() + self.ttl_s, on_done)
            self._offers[uid] = offer
            self.stats.offered += 1
        self._server.await_pull(uid, list(arrays))
        return offer

    def pending_count(self) -> int:
        with self._lock:
            return len(self._offers)

    def pending(self, uid: int) -> bool:
        with self._lock:
            return uid in self._offers

    def _finish(self, uid: int, how: str) -> Offer | None:
        with self._lock:
            offer = self._offers.pop(uid, None)
        if offer is not None:
            offer.arrays = None
            if offer.on_done is not None:
                offer.on_done(how)
        return offer

    def consumed(self, uid: int) -> bool:
        """The peer says it pulled `uid`: drop our references. False if unknown."""
        offer = self._finish(uid, "consumed")
        if offer is not None:
            self.stats.consumed += 1
        return offer is not None

    def withdraw(self, uid: int, how: str = "withdrawn") -> bool:
        """Nobody will pull `uid` (the peer gave up, or the TTL passed): consume it by
        pulling it from ourselves, so the transfer server lets go of its buffers."""
        with self._lock:
            offer = self._offers.get(uid)
        if offer is None:
            return False
        specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                 for x in offer.arrays]
        try:
            _bounded(lambda: self._connect(self.address).pull(uid, specs), self.pull_timeout_s,
                     f"reclaiming KV offer {uid}")
            self.stats.reclaimed += 1
        except TransferError:
            # The peer pulled it after all (or is pulling): our pull is the one left blocked.
            self.stats.abandoned_pulls += 1
        self._finish(uid, how)
        return True

    def expire(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [u for u, o in self._offers.items() if o.expires_at <= now]
        for uid in stale:
            self.stats.expired += 1
            self.withdraw(uid, "expired")
        return len(stale)

    # Pulling side.
    def _connect(self, address: str):
        with self._lock:
            conn = self._connections.get(address)
        if conn is None:
            conn = self._server.connect(address)
            with self._lock:
                self._connections[address] = conn
        return conn

    def pull(self, address: str, uid: int, offered: Sequence[ArrayLayout],
             destination: Sequence[jax.ShapeDtypeStruct], timeout_s: float | None = None,
             allow_reshard: bool = True) -> list[jax.Array]:
        """Pull offer `uid` from the peer at `address` into `destination` (shapes, dtypes,
        shardings). The layouts are checked first (LayoutMismatchError, nothing pulled);
        the wait is bounded (TransferTimeoutError)."""
        check_address(address, self.allow_remote, "the peer's KV transfer address")
        plan = plan_pull(offered, destination, allow_reshard)
        specs = [jax.ShapeDtypeStruct(d.shape, d.dtype, sharding=s)
                 for d, s in zip(destination, plan.stage, strict=True)]
        timeout_s = self.pull_timeout_s if timeout_s is None else timeout_s
        self.stats.pulls += 1
        self.stats.resharded += any(plan.reshard)

        def go() -> list[jax.Array]:
            out = self._connect(address).pull(uid, specs)
            jax.block_until_ready(out)
            return out

        try:
            got = _bounded(go, timeout_s, f"pulling KV offer {uid} from {address}")
        except TransferTimeoutError:
            self.stats.abandoned_pulls += 1
            raise
        return [jax.device_put(x, d.sharding) if r else x
                for x, d, r in zip(got, destination, plan.reshard, strict=True)]
