"""Per-device memory planning: refuse a layout before anything is loaded."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import jax

from meshserve.meshes.rules import LogicalAxes, ShardingRules


class DoesNotFitError(ValueError):
    """A layout needs more memory per device than the device has."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor's global shape, element size and logical axes."""

    shape: tuple[int, ...]
    itemsize: int
    axes: LogicalAxes


def bytes_per_device(spec: TensorSpec, rules: ShardingRules) -> int:
    """Bytes one device holds of `spec` under `rules` (replicated axes count fully)."""
    partition = rules.spec(spec.axes)
    ways = 1
    for dim, axis in zip(spec.shape, partition, strict=False):
        if axis is not None:
            split = math.prod(rules.mesh.shape[a] for a in
                              ((axis,) if isinstance(axis, str) else axis))
            ways *= split
            if dim % split:
                raise ValueError(f"dimension {dim} of {spec} does not divide {axis}")
    return math.prod(spec.shape) * spec.itemsize // ways


def device_capacity_bytes(device: jax.Device | None = None) -> int:
    """Usable bytes on one device. CPU devices are simulated and share host memory, so
    each gets an equal share of what the host has available."""
    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except (RuntimeError, NotImplementedError):
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    available = _host_available_bytes()
    return available // max(1, len(jax.local_devices(backend=device.platform)))


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    layout: str
    weights_bytes: int
    kv_bytes: int
    reserve_bytes: int
    capacity_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    def describe(self) -> str:
        def gib(n: int) -> str:
            return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"

        return (
            f"memory per device for layout {self.layout}: weights {gib(self.weights_bytes)}, "
            f"KV cache {gib(self.kv_bytes)}, reserve {gib(self.reserve_bytes)}, "
            f"total {gib(self.total_bytes)} of {gib(self.capacity_bytes)} available"
        )

    def check(self) -> MemoryPlan:
        if not self.fits:
            raise DoesNotFitError(
                f"layout does not fit: {self.describe()}; split the weights over more "
                "devices (larger tensor=), shrink the KV cache, or use a device with more memory"
            )
        return self


def plan_memory(
    rules: ShardingRules,
    weights: Iterable[TensorSpec],
    kv_cache: Iterable[TensorSpec] = (),
    reserve_bytes: int = 0,
    capacity_bytes: int | None = None,
    layout: str = "",
) -> MemoryPlan:
    """Sum per-device bytes of weights and KV cache; capacity defaults to the device's."""
    if capacity_bytes is None:
        capacity_bytes = device_capacity_bytes(rules.mesh.devices.flat[0])
    return MemoryPlan(
        layout=layout or ",".join(f"{k}={v}" for k, v in rules.mesh.shape.items()),
        weights_bytes=sum(bytes_per_device(w, rules) for w in weights),
        kv_bytes=sum(bytes_per_device(k, rules) for k in kv_cache),
        reserve_bytes=reserve_bytes,
        capacity_bytes=capacity_bytes,
    )
