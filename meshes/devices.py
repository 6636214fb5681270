"""Simulated CPU devices: must be configured before JAX initialises its backends."""

from __future__ import annotations

import jax


def set_cpu_device_count(count: int | None) -> None:
    """Make the CPU backend expose `count` devices (no-op for None).

    Raises RuntimeError when JAX's backends are already initialised with another count,
    because the setting would be silently ignored.
    """
    if count is None:
        return
    if count < 1:
        raise ValueError(f"--cpu-devices must be >= 1, got {count}")
    jax.config.update("jax_num_cpu_devices", count)
    try:  # this process's devices (jax.devices() spans every process of a group)
        actual = len(jax.local_devices(backend="cpu"))
    except RuntimeError:  # CPU backend unavailable: nothing to simulate
        return
    if actual != count:
        raise RuntimeError(
            f"asked for {count} CPU devices but JAX already runs with {actual}; "
            "set --cpu-devices before anything touches JAX"
        )


def default_compute_dtype() -> str:
    """f32 on CPU (bf16 matmuls are ~50x slower on XLA:CPU), bf16 on accelerators."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
