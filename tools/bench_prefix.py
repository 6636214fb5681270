"""Prefix caching and cache-aware routing, measured on real `meshserve serve` processes in
one run: the same shared-prefix workload (bench-serving's --prefix-len/--num-prefixes)
against the cache on and off on one slice, then cache-aware and load-only routing on two
(with the default KV pool, and with a pool that holds about half of the prefixes).

    python -m meshserve.tools.bench_prefix --out docs/bench/prefix_cpu.json   # 125M Llama
    python -m meshserve.tools.bench_prefix --quick                            # a smoke run

Every configuration gets the same prompts and arrival times (one seed). Reported per
configuration: TTFT and E2E percentiles, the share of prompt tokens served from the
prefix cache, how many requests each slice took, and the server's routing decisions and
stale hits (scraped from its /metrics); and the ratios the issue sets
targets for (TTFT p50 cache on / off <= 0.35; cache-aware / load-only routing: lower
TTFT p50 at a higher hit rate).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import socket
import tempfile
import urllib.request

from meshserve.tools.bench_engine import LLAMA_125M, TINY, save_random_llama
from meshserve.tools.reports import write_json

TWO = ("--slices", "2", "--cpu-devices", "2")
LOAD_ONLY = ("--no-cache-aware-routing",)
DEFAULT_CONFIGS = "off,on,load-only,cache-aware,load-only-small,cache-aware-small"


def configurations(small_pool_pages: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name: (what it is, extra `meshserve serve` flags). The small-pool pair gives each
    slice a KV pool that holds about half of the prefixes besides the running requests:
    where routing decides whether a slice's cache holds what its requests need."""
    small = ("--num-pages", str(small_pool_pages))
    return {
        "off": ("1 slice, prefix cache off", ("--no-prefix-cache",)),
        "on": ("1 slice, prefix cache on", ()),
        "load-only": ("2 slices, load-only routing", TWO + LOAD_ONLY),
        "cache-aware": ("2 slices, cache-aware routing", TWO),
        "load-only-small": (f"2 slices, load-only, {small_pool_pages} pages each",
                            TWO + LOAD_ONLY + small),
        "cache-aware-small": (f"2 slices, cache-aware, {small_pool_pages} pages each",
                              TWO + small),
    }
TARGET_TTFT_ON_OFF = 0.35


SCRAPED = ("meshserve_routing_decisions_total", "meshserve_routing_matched_tokens_total",
           "meshserve_routing_cached_tokens_total", "meshserve_routing_stale_hits_total",
           "meshserve_routing_stale_tokens_total", "meshserve_prefix_cache_queries_total",
           "meshserve_prefix_cache_hits_total", "meshserve_preemptions_total")


def scrape(port: int) -> dict[str, float]:
    """The server's routing and prefix-cache counters, by their labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {}
    for m in re.finditer(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", text, re.M):
        if m.group(1) in SCRAPED:
            found[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return found


def run_config(hf_dir: str, flags: tuple[str, ...], server_flags: list[str], a) -> dict:
    from meshserve.tools.bench_serving import run
    from meshserve.tools.server_process import ServeProcess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with ServeProcess("--hf", hf_dir, "--metrics-port", str(port), *server_flags, *flags,
                      timeout=a.timeout) as server:
        summary = asyncio.run(run(
            server.target, a.num_prompts, a.request_rate, 1.0, None, a.input_len,
            a.output_len, 0.0, {}, seed=a.seed, max_duration=a.max_duration,
            prefix_len=a.prefix_len, num_prefixes=a.num_prefixes))
        summary["server_metrics"] = scrape(port)
    if summary["failed"]:
        raise RuntimeError(f"requests failed: {summary['errors']}")
    return summary


def main() -> None:
    from meshserve.models.config import load_hf_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", default=None, help="model directory (default: a random 125M Llama)")
    p.add_argument("--quick", action="store_true", help="tiny random model, few requests")
    p.add_argument("--num-prompts", type=int, default=60)
    p.add_argument("--request-rate", type=float, default=1.0)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=460, help="90%% of 512")
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--small-pool-pages", type=int, default=96,
                   help="KV pages per slice of the *-small configurations")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated subset of {DEFAULT_CONFIGS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-duration", type=float, default=900.0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for ready")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    configs = configurations(a.small_pool_pages)
    server_flags = ["--max-model-len", str(a.input_len + a.output_len)]
    if a.quick:
        a.num_prompts, a.request_rate = min(a.num_prompts, 12), max(a.request_rate, 4.0)
        server_flags.append("--warmup=false")  # a smoke run: compile what is used
    names = [n.strip() for n in a.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {list(configs)}")
    results = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-prefix-") as work:
        hf_dir = a.hf or save_random_llama(TINY if a.quick else LLAMA_125M, f"{work}/hf")
        cfg = load_hf_config(hf_dir)
        for name in names:
            results[name] = run_config(hf_dir, configs[name][1], server_flags, a)
            s = results[name]
            print(json.dumps({"config": name, "ttft_p50_ms": s["ttft_ms"]["p50"],
                              "request_throughput": s["request_throughput"],
                              "cache_hit_rate": s["cache_hit_rate"],
                              "requests_per_slice": s["requests_per_slice"],
                              **s["server_metrics"]}), flush=True)
    load_after = os.getloadavg()
    print("| configuration | TTFT p50 ms | TTFT p90 ms | E2E p50 ms | req/s | prompt tokens "
          "cached | requests per slice | routed by cache / load | stale hits |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name, s in results.items():
        m = s["server_metrics"]

        def total(prefix: str, m=m) -> int:
            return int(sum(v for k, v in m.items() if k.startswith(prefix)))

        by_cache = total('meshserve_routing_decisions_total{reason="cache"')
        by_load = total('meshserve_routing_decisions_total{reason="load"')
        print(f"| {configs[name][0]} | {s['ttft_ms']['p50']:.1f} | {s['ttft_ms']['p90']:.1f} | "
              f"{s['e2e_ms']['p50']:.1f} | {s['request_throughput']:.2f} | "
              f"{s['cache_hit_rate']:.1%} | "
              f"{' / '.join(str(v) for v in s['requests_per_slice'].values())} | "
              f"{by_cache} / {by_load} | {total('meshserve_routing_stale_hits_total')} |")
    ratios = {}

    def ratio(key: str, num: str, den: str) -> None:
        if num in results and den in results:
            ratios[key] = results[num]["ttft_ms"]["p50"] / results[den]["ttft_ms"]["p50"]

    ratio("ttft_p50_cache_on_over_off", "on", "off")
    ratio("ttft_p50_cache_aware_over_load_only", "cache-aware", "load-only")
    ratio("ttft_p50_cache_aware_over_load_only_small_pool", "cache-aware-small",
          "load-only-small")
    for key, value in ratios.items():
        target = f" (target <= {TARGET_TTFT_ON_OFF})" if "on_over_off" in key else ""
        print(f"{key}: {value:.3f}{target}")
    if a.out:
        model = a.hf or ("random tiny Llama" if a.quick else "random 125M Llama")
        write_json(a.out, {
            "machine": f"{os.cpu_count()} CPU cores (shared)", "model": model,
            "model_config": dataclasses.asdict(cfg), "load_average_before": load_before,
            "load_average_after": load_after, "server_flags": server_flags,
            "workload": {k: getattr(a, k) for k in ("num_prompts", "request_rate", "input_len",
                                                    "output_len", "prefix_len",
                                                    "num_prefixes", "seed")},
            "small_pool_pages": a.small_pool_pages,
            "configs": {n: {"description": configs[n][0], "flags": list(configs[n][1])}
                        for n in names}, "results": results,
            "ratios": ratios, "target_ttft_on_over_off": TARGET_TTFT_ON_OFF})


if __name__ == "__main__":
    main()
