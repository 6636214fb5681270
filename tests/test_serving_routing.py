"""Cache-aware routing between two slices: requests go to the slice holding their prefix
while loads are balanced, spill once the skew thresholds are crossed, estimates go stale
when pages are evicted, and a slice out of rotation loses its index. The first tests
drive the real router and engines step by step (deterministic); the last goes through
gRPC with the engines running."""

from __future__ import annotations

import re
import urllib.request

import pytest

from meshserve.engine.sampling_params import SamplingParams
from meshserve.serving.routing import CACHE, LOAD, ONLY_HEALTHY, RoutingConfig
from meshserve.serving.slices import Router
from tests.serving_fixtures import (  # noqa: F401
    SERVING_CONFIG,
    demo_ckpt,
    free_port,
    request,
    running_server,
    stub_for,
    tokens_of,
)

PREFIX = [1] + [(29 * j) % 400 + 20 for j in range(159)]  # 10 full pages


def prompt(i: int) -> list[int]:
    """200 tokens: the shared prefix, then 40 of this request's own."""
    return PREFIX + [(7 * i + 3 * j) % 400 + 20 for j in range(40)]


PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
COST = 200 + 8  # what the service charges a request: prompt + max_tokens


@pytest.fixture(scope="module")
def slices(demo_ckpt):  # noqa: F811
    """Two slices whose engines are stepped by the tests (no engine threads)."""
    from meshserve.serving import launch

    model = launch.load(demo_ckpt, "", 2, "float32", SERVING_CONFIG)
    yield model.slices
    for s in model.slices:
        s.engine.shutdown(timeout=10.0)


def _drain(router: Router, routed: list) -> list[list]:
    """Step both engines until idle; release what was routed; each request's chunks."""
    busy = True
    while busy:
        busy = False
        for s in router.slices:
            busy |= s.engine.step()
    for r in routed:
        router.release(r.slice, COST)
    return [list(r.handle) for r in routed]


def test_prefix_holder_wins_while_balanced_and_a_flood_spills(slices):
    s0, s1 = slices
    router = Router(slices, RoutingConfig(balance_abs_tokens=600, balance_rel=1.5,
                                          load_weight=0.0))
    first = router.submit(prompt(0), PARAMS, "first", COST)
    assert (first.slice, first.reason, first.matched_tokens) == (s0, LOAD, 0)  # nothing cached
    _drain(router, [first])
    # Sent at once (nothing runs in between): each adds 200 queued + 208 routed tokens.
    flood = [router.submit(prompt(i), PARAMS, f"flood-{i}", COST) for i in range(1, 7)]
    # s0 holds the prefix: it wins until it carries 600+ tokens (and 1.5x) more than s1,
    # then load wins (s1 has nothing cached), then the cache again once balanced.
    assert [r.slice.index for r in flood] == [0, 0, 1, 0, 1, 0]
    assert [r.reason for r in flood] == [CACHE, CACHE, LOAD, CACHE, LOAD, CACHE]
    assert [r.matched_tokens for r in flood] == [160, 160, 0, 160, 0, 160]
    results = _drain(router, flood)
    for r, chunks in zip(flood, results, strict=True):
        assert len(tokens_of(chunks)) == 8
        # The estimates held; s1's second request may find what its first just stored.
        assert chunks[-1].usage.cached_tokens >= r.matched_tokens
    # Both slices hold the prefix now; s1 was sent fewer requests and wins the tie.
    probe = router.submit(prompt(7), PARAMS, "probe", COST)
    assert (probe.slice, probe.reason, probe.matched_tokens) == (s1, CACHE, 160)
    # Other tenants' prompts evict the prefix from s1 before the probe runs: the
    # router's estimate was stale, and it learns of the eviction from s1's events.
    evictors = [s1.engine.add_request([1] + [(11 * i + j) % 400 + 20 for j in range(249)],
                                      SamplingParams(max_tokens=1), priority=-1,
                                      cache_salt="other")
                for i in range(6)]
    [probe_chunks] = _drain(router, [probe])
    for h in evictors:
        list(h)
    assert probe_chunks[-1].usage.cached_tokens == 0
    assert s1.engine.stats().cached_pages > 32  # the pool turned over: evictions happened
    for s in slices:  # one data shard: one index entry per cached page
        assert router.index_size(s) == s.engine.stats().cached_pages


def test_load_only_routing_ignores_the_cache(slices):
    s0, s1 = slices
    router = Router(slices, RoutingConfig(cache_aware=False))
    routed = [router.submit(prompt(20 + i), PARAMS, f"load-{i}", COST) for i in range(4)]
    assert [r.reason for r in routed] == [LOAD] * 4
    assert all(r.matched_tokens == 0 for r in routed)
    assert [r.slice for r in routed].count(s0) == 2  # alternates as the load grows
    results = _drain(router, routed)
    # The engines still reuse what they hold; the router just does not look.
    assert sum(c[-1].usage.cached_tokens for c in results) > 0


def test_a_slice_out_of_rotation_loses_its_index(slices):
    s0, s1 = slices
    router = Router(slices)
    warm = router.submit(prompt(30), PARAMS, "warm", COST)
    _drain(router, [warm])
    # A new router reads each engine's events from its first page on.
    assert router.index_size(warm.slice) > 0
    for s in slices:
        assert router.index_size(s) == s.engine.stats().cached_pages
    s0.engine.shutdown(timeout=10.0)
    routed = router.submit(prompt(31), PARAMS, "lone", COST)
    assert (routed.slice, routed.reason) == (s1, ONLY_HEALTHY)
    assert router.index_size(s0) == 0  # dropped, though the engine still holds its pages
    assert s0.engine.stats().cached_pages > 0
    _drain(router, [routed])
    assert router.index_size(s1) == s1.engine.stats().cached_pages > 0


@pytest.fixture(scope="module")
def running_slices(demo_ckpt):  # noqa: F811
    from meshserve.serving import launch

    model = launch.load(demo_ckpt, "", 2, "float32", SERVING_CONFIG)
    launch.warm_up(model)  # starts the engines (no warm-up compiles: model.warmup False)
    yield model
    for s in model.slices:
        s.engine.shutdown(timeout=10.0)


def _samples(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", text, re.M)}


def test_routing_through_grpc_follows_the_prefix_and_is_measured(running_slices):
    port = free_port()
    with running_server(running_slices, metrics_port=port) as server:
        channel, stub = stub_for(server.target)
        with channel:
            def run(i: int):
                rs = list(stub.Generate(request(token_ids=prompt(i), max_tokens=8,
                                                ignore_eos=True), timeout=120))
                return rs[-1]

            holder = run(40).slice
            later = [run(41 + i) for i in range(3)]  # one at a time: loads stay balanced
        assert [r.slice for r in later] == [holder] * 3
        assert all(r.usage.cached_tokens == 160 for r in later)
        m = _samples(port)
    label = f'{{slice="{holder}"}}'
    assert m['meshserve_routing_decisions_total{reason="cache"}'] == 3
    assert m['meshserve_routing_decisions_total{reason="load"}'] == 1
    assert m[f"meshserve_routing_matched_tokens_total{label}"] == 3 * 160
    assert m[f"meshserve_routing_cached_tokens_total{label}"] == 3 * 160
    assert m[f"meshserve_routing_stale_hits_total{label}"] == 0
    assert m[f"meshserve_prefix_cache_hits_total{label}"] == 3 * 160
