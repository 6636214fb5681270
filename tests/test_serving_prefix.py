"""The prefix cache through gRPC: cached_tokens in Usage, cache_salt isolating tenants,
and the per-slice Prometheus counters."""

from __future__ import annotations

import re
import urllib.request

from tests.serving_fixtures import (  # noqa: F401
    demo_ckpt,
    demo_model,
    free_port,
    request,
    running_server,
    stub_for,
    tokens_of,
    wait_idle,
)

PROMPT = [1] + [(17 * j) % 200 + 20 for j in range(199)]  # 12 full pages and 8 tokens


def _counter(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(rf'^{name}{{slice="0"}} ([0-9.e+]+)$', text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


def test_cached_tokens_and_salts_through_grpc(demo_model):  # noqa: F811
    port = free_port()
    with running_server(demo_model, metrics_port=port) as server:
        channel, stub = stub_for(server.target)
        queries = _counter(port, "meshserve_prefix_cache_queries_total")
        hits = _counter(port, "meshserve_prefix_cache_hits_total")

        def run(salt: str):
            rs = list(stub.Generate(request(token_ids=PROMPT, max_tokens=8, ignore_eos=True,
                                            cache_salt=salt), timeout=120))
            return tokens_of(rs), rs[-1].usage

        with channel:
            first, usage = run("grpc-a")
            assert usage.cached_tokens == 0 and usage.prompt_tokens == 200
            again, usage = run("grpc-a")
            assert usage.cached_tokens == 192 and again == first
            other, usage = run("grpc-b")  # another tenant: nothing shared
            assert usage.cached_tokens == 0 and other == first
            unsalted, usage = run("")
            assert usage.cached_tokens == 0 and unsalted == first
        assert _counter(port, "meshserve_prefix_cache_queries_total") - queries == 4 * 200
        assert _counter(port, "meshserve_prefix_cache_hits_total") - hits == 192
        assert _counter(port, "meshserve_prefix_cache_pages") >= 3 * 12
        # Cached pages nobody holds count as free: the engine is idle again.
        wait_idle(demo_model.slices[0].engine)
