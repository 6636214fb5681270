"""Start-up time of `meshserve serve`: process start to ready, cold and warm cache.

    python -m meshserve.tools.bench_startup --out docs/bench/startup_cpu.json
    python -m meshserve.tools.bench_startup --cases demo --starts 1     # a smoke run

Each case starts the server `--starts` times with empty compilation and converted-
checkpoint caches (cold) and `--starts` times with the caches the cold starts filled
(warm), waits for readiness,
and reads the start-up split from GetServerInfo (load, warm-up, other; programs built
and how many came from the cache) and the resident memory (VmRSS) once ready. Reported:
medians, plus every start in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile

import grpc

from meshserve.models.demo import ensure_demo_checkpoint
from meshserve.serving.proto import meshserve_pb2 as pb
from meshserve.serving.proto import meshserve_pb2_grpc as pb_grpc
from meshserve.tools.bench_engine import LLAMA_125M, save_random_llama
from meshserve.tools.reports import write_json
from meshserve.tools.server_process import ServeProcess

TINY_2_LAYERS = dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=2048)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def start_once(args: list[str], cache: str, timeout: float) -> dict:
    """One `meshserve serve` start: wall time to readiness, its own split, its RSS."""
    # Converted checkpoints (--hf, --gguf, the default model) are cached beside the
    # programs, so a cold start converts and a warm one loads the conversion.
    env = {"MESHSERVE_COMPILATION_CACHE": cache, "MESHSERVE_CACHE": f"{cache}.home"}
    with ServeProcess(*args, env=env, timeout=timeout) as server:
        with grpc.insecure_channel(server.target) as channel:
            info = pb_grpc.MeshServeStub(channel).GetServerInfo(pb.GetServerInfoRequest())
        st = info.startup
        return {"wall_ready_s": server.ready_after, "ready_s": st.ready_seconds,
                "load_s": st.load_seconds, "warmup_s": st.warmup_seconds,
                "other_s": st.other_seconds, "programs": st.programs,
                "from_cache": st.programs_from_cache, "rss_bytes": _rss_bytes(server.proc.pid),
                "kv_pages": info.slices[0].total_pages}


def run_case(name: str, args: list[str], starts: int, timeout: float) -> dict:
    cache = tempfile.mkdtemp(prefix="meshserve-bench-xla-")
    try:
        cold = []
        for _ in range(starts):
            shutil.rmtree(cache)
            shutil.rmtree(f"{cache}.home", ignore_errors=True)
            os.makedirs(cache, mode=0o700)
            cold.append(start_once(args, cache, timeout))
        warm = [start_once(args, cache, timeout) for _ in range(starts)]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(f"{cache}.home", ignore_errors=True)
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    row = {"case": name, "args": args}
    for label, rows in (("cold", cold), ("warm", warm)):
        row[label] = {k: med(rows, k) for k in rows[0]} | {"starts": rows}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="demo,llama125m,tiny-2-slices")
    p.add_argument("--starts", type=int, default=3, help="starts per case and cache state")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="meshserve-bench-startup-")
    cases = {
        "demo": lambda: ["--checkpoint", ensure_demo_checkpoint()],
        "smollm2": lambda: [],  # the default model (needs meshserve[demo])
        "llama125m": lambda: ["--hf", save_random_llama(LLAMA_125M, f"{work}/125m")],
        "tiny-2-slices": lambda: ["--hf", save_random_llama(TINY_2_LAYERS, f"{work}/tiny"),
                                  "--cpu-devices", "4", "--slices", "2", "--mesh", "tensor=2"],
    }
    rows = []
    try:
        for name in a.cases.split(","):
            row = run_case(name, cases[name](), a.starts, a.timeout)
            rows.append(row)
            medians = {label: {k: v for k, v in row[label].items() if k != "starts"}
                       for label in ("cold", "warm")}
            print(json.dumps({"case": name, **medians}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| case | cache | ready s | load s | warm-up s | other s | programs | from cache "
          "| RSS MiB | KV pages |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for label in ("cold", "warm"):
            m = r[label]
            print(f"| {r['case']} | {label} | {m['wall_ready_s']:.1f} | {m['load_s']:.1f} | "
                  f"{m['warmup_s']:.1f} | {m['other_s']:.1f} | {m['programs']:.0f} | "
                  f"{m['from_cache']:.0f} | {m['rss_bytes'] / 2**20:.0f} | "
                  f"{m['kv_pages']:.0f} |")
    if a.out:
        write_json(a.out, {"machine": f"{os.cpu_count()} CPU cores", "rows": rows})


if __name__ == "__main__":
    main()
