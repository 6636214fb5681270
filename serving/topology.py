"""What GetServerInfo says about the runtime: platform, versions, the devices of each
slice (kind, host, physical coordinates) and what carries the collectives."""

from __future__ import annotations

from meshserve.serving.proto import meshserve_pb2 as pb


def collective_implementation(platform: str, process_count: int) -> str:
    """What moves a step's all-reduces and all-gathers between its devices."""
    import jax

    if platform == "tpu":
        return "ICI within a slice, DCN between hosts' slices (XLA:TPU)"
    if platform in ("gpu", "cuda", "rocm"):
        return "NCCL (XLA:GPU)" if platform != "rocm" else "RCCL (XLA:GPU)"
    if process_count > 1:
        return f"{jax.config.jax_cpu_collectives_implementation} across processes (XLA:CPU)"
    return "in-process memory copies (XLA:CPU)"


def device_info(device) -> pb.DeviceInfo:
    info = pb.DeviceInfo(id=device.id, platform=device.platform, kind=device.device_kind,
                         process_index=device.process_index,
                         coords=list(getattr(device, "coords", None) or ()))
    core = getattr(device, "core_on_chip", None)
    if core is not None:
        info.core_on_chip = core
    return info


def fill_runtime(info: pb.ServerInfo, devices_per_slice) -> None:
    """Set the runtime fields of `info` and each slice's device_info (in slice order)."""
    import jax
    import jaxlib

    first = devices_per_slice[0][0]
    info.platform = first.platform
    info.jax_version = jax.__version__
    info.jaxlib_version = jaxlib.__version__
    info.process_count = jax.process_count()
    info.collective_implementation = collective_implementation(first.platform,
                                                               jax.process_count())
    for slice_info, devices in zip(info.slices, devices_per_slice, strict=True):
        slice_info.device_info.extend(device_info(d) for d in devices)
