"""Start-up time of `meshserve serve`: process start to ready, cold and warm cache.

    python -m meshserve.tools.bench_startup --out docs/bench/startup_cpu.json
    python -m meshserve.tools.bench_startup --cases demo --starts 1     # a smoke run

Each case starts the server `--starts` times with an empty compilation cache (cold)
and `--starts` times with the cache the cold starts filled (warm), waits for readiness,
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
import subprocess
import sys
import tempfile
import time

import grpc

from meshserve.serving.proto import meshserve_pb2 as pb
from meshserve.serving.proto import meshserve_pb2_grpc as pb_grpc
from meshserve.tools.bench_engine import LLAMA_125M
from meshserve.tools.reports import write_json

TINY_2_LAYERS = dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=2048)


def _save_hf(spec: dict, out: str) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec)).save_pretrained(out)
    return out


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def start_once(args: list[str], cache: str, timeout: float) -> dict:
    """One `meshserve serve` start: wall time to readiness, its own split, its RSS."""
    env = {**os.environ, "MESHSERVE_COMPILATION_CACHE": cache}
    begun = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "meshserve.tools.cli", "serve", "--port",
                             "0", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    port, ready_at = None, None
    try:
        for line in proc.stderr:
            if '"event": "server_started"' in line:
                port = int(line.split('"port": ')[1].split(",")[0].split("}")[0])
            if '"event": "ready"' in line:
                ready_at = time.monotonic()
                break
            if time.monotonic() - begun > timeout:
                break
        if port is None or ready_at is None:
            raise RuntimeError(f"server not ready within {timeout} s (exit {proc.poll()})")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = pb_grpc.MeshServeStub(channel).GetServerInfo(pb.GetServerInfoRequest())
        st = info.startup
        return {"wall_ready_s": ready_at - begun, "ready_s": st.ready_seconds,
                "load_s": st.load_seconds, "warmup_s": st.warmup_seconds,
                "other_s": st.other_seconds, "programs": st.programs,
                "from_cache": st.programs_from_cache, "rss_bytes": _rss_bytes(proc.pid),
                "kv_pages": info.slices[0].total_pages}
    finally:
        proc.kill()
        proc.wait(30)


def run_case(name: str, args: list[str], starts: int, timeout: float) -> dict:
    cache = tempfile.mkdtemp(prefix="meshserve-bench-xla-")
    try:
        cold = []
        for _ in range(starts):
            shutil.rmtree(cache)
            os.makedirs(cache, mode=0o700)
            cold.append(start_once(args, cache, timeout))
        warm = [start_once(args, cache, timeout) for _ in range(starts)]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
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
        "demo": lambda: [],
        "llama125m": lambda: ["--hf", _save_hf(LLAMA_125M, os.path.join(work, "125m"))],
        "tiny-2-slices": lambda: ["--hf", _save_hf(TINY_2_LAYERS, os.path.join(work, "tiny")),
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
