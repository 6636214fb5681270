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


def best_time(fn, *args, repeats: int, warm_up: bool = True) -> float:
    """Fastest of `repeats` timed calls (after one untimed call that compiles, unless
    `fn` already ran)."""
    if warm_up:
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


class Probe:
    """Holds the roofline's operands and compiled programs, to measure it again and again
    (between the timed steps of a benchmark) without reallocating 512 MB each time."""

    def __init__(self, gemv_bytes: int = 512 << 20, matmul_n: int = 3072, repeats: int = 3):
        cols = 8192
        rows = gemv_bytes // (4 * cols)
        self._w = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
        self._x = jnp.ones((cols,), jnp.float32)
        self._a = jax.random.normal(jax.random.key(1), (matmul_n, matmul_n), jnp.float32)
        self._gemv = jax.jit(lambda w, x: w @ x)
        self._matmul = jax.jit(lambda a: a @ a)
        self._gemv_bytes, self._matmul_flops = rows * cols * 4, 2 * matmul_n**3
        self.repeats = repeats
        jax.block_until_ready((self._gemv(self._w, self._x), self._matmul(self._a)))  # compile

    def measure(self) -> Roofline:
        """Best of `repeats` multi-threaded GEMVs (bandwidth) and large matmuls (FLOP/s)."""
        gemv = best_time(self._gemv, self._w, self._x, repeats=self.repeats, warm_up=False)
        matmul = best_time(self._matmul, self._a, repeats=max(2, self.repeats // 2),
                           warm_up=False)
        return Roofline(bandwidth=self._gemv_bytes / gemv, flops=self._matmul_flops / matmul)

