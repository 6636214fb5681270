"""Device layouts: parsing `data=2,tensor=4` strings and building meshes from them."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# Tensor is innermost so that its devices are neighbours (fastest links carry the
# per-layer all-reduces); data is outermost because replicas rarely talk.
MESH_AXES: tuple[str, ...] = ("data", "expert", "sequence", "tensor")
LAYOUT_KEYS: tuple[str, ...] = ("slices", "data", "tensor", "expert", "sequence")


class LayoutError(ValueError):
    """A layout string is malformed or does not fit the devices or the model."""


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """How many ways each mesh axis is split; `slices` counts independent replicas."""

    data: int = 1
    tensor: int = 1
    expert: int = 1
    sequence: int = 1
    slices: int = 1

    def __post_init__(self) -> None:
        for key in LAYOUT_KEYS:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"layout axis {key}={value!r} must be a positive integer")

    @property
    def devices_per_slice(self) -> int:
        return self.data * self.tensor * self.expert * self.sequence

    @property
    def num_devices(self) -> int:
        return self.slices * self.devices_per_slice

    def axis_sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}

    def to_string(self, with_slices: bool = False) -> str:
        keys = LAYOUT_KEYS if with_slices else LAYOUT_KEYS[1:]
        return ",".join(f"{k}={getattr(self, k)}" for k in keys)

    def __str__(self) -> str:
        return self.to_string(with_slices=self.slices > 1)


def parse_layout(text: str | None) -> MeshLayout:
    """Parse `data=2,tensor=4` (absent axes are 1; `slices=` is allowed too)."""
    if text is None or not text.strip():
        return MeshLayout()
    values: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in LAYOUT_KEYS:
            raise LayoutError(
                f"bad layout term {part!r} in {text!r}: expected AXIS=N with AXIS one of "
                f"{', '.join(LAYOUT_KEYS)}"
            )
        if key in values:
            raise LayoutError(f"layout axis {key!r} given twice in {text!r}")
        try:
            values[key] = int(raw)
        except ValueError:
            raise LayoutError(f"layout axis {key}={raw!r} is not an integer") from None
    return MeshLayout(**values)


def enumerate_layouts(num_devices: int, axes: Sequence[str] = LAYOUT_KEYS) -> list[MeshLayout]:
    """Every layout whose product over `axes` equals `num_devices` (other axes stay 1)."""
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    layouts = []
    for combo in itertools.product(divisors, repeat=len(axes)):
        if int(np.prod(combo)) == num_devices:
            layouts.append(MeshLayout(**dict(zip(axes, combo, strict=True))))
    return layouts


def make_mesh(layout: MeshLayout, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh for one slice of `layout` over `devices` (default: the first devices)."""
    if devices is None:
        available = jax.devices()
        if layout.devices_per_slice > len(available):
            raise LayoutError(
                f"layout {layout.to_string()} needs {layout.devices_per_slice} devices but only "
                f"{len(available)} exist; use --cpu-devices N to simulate more on CPU, or one of: "
                + ", ".join(
                    x.to_string() for x in enumerate_layouts(len(available), ("data", "tensor"))
                )
            )
        devices = available[: layout.devices_per_slice]
    if len(devices) != layout.devices_per_slice:
        raise LayoutError(
            f"layout {layout.to_string()} needs {layout.devices_per_slice} devices, "
            f"got {len(devices)}"
        )
    shape = tuple(layout.axis_sizes()[a] for a in MESH_AXES)
    grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def split_slices(layout: MeshLayout, devices: Sequence[jax.Device] | None = None) -> list[Mesh]:
    """One mesh per slice: `slices` equal, disjoint device groups."""
    devices = list(jax.devices() if devices is None else devices)
    if layout.num_devices > len(devices):
        raise LayoutError(
            f"layout {layout.to_string(with_slices=True)} needs {layout.num_devices} devices, "
            f"only {len(devices)} exist"
        )
    per = layout.devices_per_slice
    return [make_mesh(layout, devices[i * per : (i + 1) * per]) for i in range(layout.slices)]
