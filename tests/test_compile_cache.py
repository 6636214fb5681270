"""The persistent cache serves a CPU program built for one device group to another."""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshserve.meshes import share_programs_across_device_groups
from meshserve.meshes.compile_cache import CompileCounter


def _inputs(mesh: Mesh, seed: int):
    rng = np.random.default_rng(seed)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))  # noqa: E731
    return (put(rng.standard_normal((64, 32), np.float32), "g", None),
            put(rng.standard_normal((8, 64), np.float32), None, "g"),
            put(np.zeros((4, 4), np.float32), "g", None))


def _run_on(program, step, group, seed: int) -> tuple[int, int]:
    """Run `program` on a mesh of `group`, check it against numpy; (built, from cache)."""
    args = _inputs(Mesh(np.array(group), ("g",)), seed)
    want = step(*[np.asarray(a) for a in args])
    counter = CompileCounter()
    got = program(*args)
    counts = counter.counts()
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-4)
        assert g.sharding.device_set == set(group)
    return counts


def test_a_program_built_for_devices_0_1_runs_on_devices_2_3_from_the_cache():
    assert share_programs_across_device_groups()
    salt = random.random()  # a program no earlier run can have cached

    def step(w, x, kv):  # a contraction split over the group: an all-reduce inside
        y = x @ w + salt
        return jnp.tanh(y), kv + y.sum()

    program = jax.jit(step, donate_argnums=(2,))
    devices = jax.devices()
    keep = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # keep a small one
    try:
        results = [_run_on(program, step, group, seed)
                   for group, seed in ((devices[0:2], 0), (devices[2:4], 1))]
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", keep)
    assert results == [(1, 0), (1, 1)]  # built once, then loaded for the other group
