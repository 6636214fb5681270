"""This machine's roofline, measured in the same run as the numbers it judges.

The machines are shared and noisy (bandwidth and matmul rate move by 2x over a day), so
a fraction of roofline is only meaningful when both are taken together.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Roofline:
    bandwidth: float  # bytes/s, best multi-threaded streaming read (a large GEMV)
    flops: float  # FLOP/s, best large square matmul

    def step_time(self, bytes_moved: float, flops: float) -> float:
        return max(bytes_moved / self.bandwidth, flops / self.flops)


def best_time(fn, *args, repeats: int) -> float:
    """Fastest of `repeats` timed calls (after one untimed call that compiles)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def measure(gemv_bytes: int = 512 << 20, matmul_n: int = 3072, repeats: int = 5) -> Roofline:
    cols = 8192
    rows = gemv_bytes // (4 * cols)
    w = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
    x = jnp.ones((cols,), jnp.float32)
    gemv = jax.jit(lambda w, x: w @ x)
    bandwidth = rows * cols * 4 / best_time(gemv, w, x, repeats=repeats)
    del w
    a = jax.random.normal(jax.random.key(1), (matmul_n, matmul_n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    flops = 2 * matmul_n**3 / best_time(matmul, a, repeats=max(2, repeats // 2))
    return Roofline(bandwidth=bandwidth, flops=flops)


def best(measured: list[Roofline]) -> Roofline:
    """The best bandwidth and the best matmul rate of several measurements."""
    return Roofline(bandwidth=max(r.bandwidth for r in measured),
                    flops=max(r.flops for r in measured))
