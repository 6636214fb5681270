"""A soak run: many mixed requests against a real `meshserve serve`, then invariants.

    python -m meshserve.tools.soak --requests 10000 --out soak.json      # starts a server
    python -m meshserve.tools.soak --target 127.0.0.1:50051 --http-url http://127.0.0.1:8000 \
        --server-pid 1234 --requests 10000                                # an existing one

Without --target it starts `meshserve serve` on a tiny model (the demo checkpoint unless
--checkpoint) with the gRPC and the OpenAI HTTP API, then sends --requests requests with
at most --concurrency in flight, each over gRPC or HTTP (--http-fraction), with mixed
prompt and output lengths and sampling parameters (temperature, top-p, top-k, seed,
penalties, logprobs, stop ids). About --cancel-fraction of them are cancelled by the
client after their first streamed tokens, --deadline-fraction carry a deadline shorter
than their generation (gRPC deadline; on HTTP the client's timeout closes the stream).

Checked at the end (exit status 1 when one fails):
- every outcome is expected: a plain request completes with the right number of tokens,
  a cancelled one completes or is CANCELLED, one with a deadline completes or ends
  DEADLINE_EXCEEDED (HTTP: the client's timeout) - nothing else (no RESOURCE_EXHAUSTED,
  UNAVAILABLE, INTERNAL, HTTP 5xx...);
- every KV page is free and nothing runs or waits (GetServerInfo, polled for a while:
  aborted requests free their pages on the engine's next step; and the HTTP /metrics
  gauge meshserve_kv_free_pages agrees);
- the server's resident memory (VmRSS) grew less than --max-rss-growth between the
  --rss-baseline-at-th finished request and the last; the server is still alive.
Prints a table, then the results as one JSON line (also written to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import random
import sys
import time

# The engine of the serving tests (tests/serving_fixtures.py): small, few programs.
SERVE_FLAGS = (
    "--cpu-devices", "8", "--page-size", "16", "--num-pages", "64", "--max-seqs", "8",
    "--max-step-tokens", "64",
    "--min-token-bucket", "64", "--max-model-len", "256", "--decode-steps", "4",
    "--max-logprobs", "4", "--max-waiting-requests", "64", "--max-waiting-tokens", "2048",
)
EXPECTED = {"plain": {"OK"}, "cancel": {"OK", "CANCELLED"},
            "deadline": {"OK", "DEADLINE_EXCEEDED"}}
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One request of the workload, drawn from the run's seed and its index."""
    index: int
    transport: str  # grpc | http
    kind: str  # plain | cancel | deadline
    prompt: list[int]
    max_tokens: int
    sampling: dict
    ignore_eos: bool
    stop_token_ids: list[int]
    cancel_after: int = 0  # messages with tokens before the client cancels
    deadline: float | None = None  # seconds


def make_spec(seed: int, index: int, vocab: int, max_len: int, max_logprobs: int,
              http: bool, a) -> Spec:
    rng = random.Random(seed * 1_000_003 + index)
    r = rng.random()
    kind = ("cancel" if r < a.cancel_fraction else
            "deadline" if r < a.cancel_fraction + a.deadline_fraction else "plain")
    transport = "http" if http and rng.random() < a.http_fraction else "grpc"
    lo, hi = rng.choice(((1, 8), (9, 48), (49, 160)))
    n = min(rng.randint(lo, hi), max_len - 2)
    prompt = [rng.randrange(3, vocab) for _ in range(n)]
    room = max_len - n
    max_tokens = min(room, rng.randint(1, 40) if kind == "plain" else rng.randint(24, 120))
    sampling: dict = {"temperature": rng.choice((0.0, 0.0, 0.7, 1.0))}
    if sampling["temperature"]:
        sampling.update(top_p=rng.choice((1.0, 0.9)), top_k=rng.choice((0, 0, 20)))
        if rng.random() < 0.5:
            sampling["seed"] = rng.randrange(1 << 32)
    if rng.random() < 0.2:
        sampling["repetition_penalty"] = 1.1
    if rng.random() < 0.2:
        sampling["presence_penalty"] = 0.5
    if rng.random() < 0.2 and max_logprobs:
        sampling["logprobs"] = rng.randint(0, max_logprobs)
    ignore_eos = rng.random() < 0.7
    stop = [rng.randrange(3, vocab)] if rng.random() < 0.1 else []
    return Spec(index, transport, kind, prompt, max_tokens, sampling, ignore_eos, stop,
                cancel_after=rng.randint(1, 3) if kind == "cancel" else 0,
                deadline=rng.uniform(0.02, 0.2) if kind == "deadline" else None)


@dataclasses.dataclass
class Outcome:
    code: str  # OK, CANCELLED, DEADLINE_EXCEEDED, or what went wrong
    tokens: int = 0
    finish: str | None = None


def _check_tokens(spec: Spec, tokens: int, finish: str | None) -> Outcome:
    """A completed stream: its length fits what was asked."""
    if finish not in ("length", "stop"):
        return Outcome(f"bad finish_reason {finish!r}", tokens, finish)
    exact = spec.ignore_eos and not spec.stop_token_ids
    if tokens > spec.max_tokens or (exact and (tokens != spec.max_tokens or finish != "length")):
        return Outcome(f"wrong length ({tokens} of {spec.max_tokens}, {finish})", tokens, finish)
    return Outcome("OK", tokens, finish)


async def run_grpc(stub, pb, spec: Spec, timeout: float) -> Outcome:
    import grpc

    s = spec.sampling
    request = pb.GenerateRequest(
        request_id=f"soak-{spec.index}", token_ids=spec.prompt, max_tokens=spec.max_tokens,
        ignore_eos=spec.ignore_eos, stop_token_ids=spec.stop_token_ids,
        **{k: v for k, v in s.items()})
    call = stub.Generate(request, timeout=spec.deadline or timeout)
    tokens = messages = 0
    finish = None
    try:
        async for response in call:
            tokens += len(response.token_ids)
            messages += bool(response.token_ids)
            if response.finish_reason:
                finish = response.finish_reason
            elif spec.cancel_after and messages >= spec.cancel_after:
                call.cancel()
                return Outcome("CANCELLED", tokens)
    except grpc.aio.AioRpcError as e:
        return Outcome(e.code().name, tokens)
    return _check_tokens(spec, tokens, finish)


async def run_http(session, url: str, model: str, spec: Spec, timeout: float) -> Outcome:
    import aiohttp

    body = {"model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens,
            "ignore_eos": spec.ignore_eos, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}, "user": f"soak-{spec.index}",
            **spec.sampling}
    if spec.stop_token_ids:
        body["stop_token_ids"] = spec.stop_token_ids
    tokens = messages = 0
    finish = None
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(
                total=spec.deadline or timeout)) as response:
            if response.status != 200:
                return Outcome(f"HTTP {response.status}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                obj = json.loads(line[5:])
                if "error" in obj:
                    return Outcome(f"stream error {obj['error'].get('code')}", tokens)
                for choice in obj.get("choices") or ():
                    ids = choice.get("token_ids") or ()
                    tokens += len(ids)
                    messages += bool(ids)
                    finish = choice.get("finish_reason") or finish
                if spec.cancel_after and messages >= spec.cancel_after and finish is None:
                    response.close()  # the server sees the connection go: it aborts
                    return Outcome("CANCELLED", tokens)
    except TimeoutError:
        return Outcome("DEADLINE_EXCEEDED", tokens)
    except aiohttp.ClientError as e:
        return Outcome(type(e).__name__, tokens)
    return _check_tokens(spec, tokens, finish)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def idle_pages(stub, pb, wait: float) -> dict:
    """Poll GetServerInfo until nothing runs or waits and every page is free (or `wait`
    seconds pass); the last reading per slice."""
    deadline = time.monotonic() + wait
    while True:
        info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        slices = [{"index": s.index, "running": s.running, "waiting": s.waiting,
                   "free_pages": s.free_pages, "total_pages": s.total_pages,
                   "healthy": s.healthy} for s in info.slices]
        idle = all(s["running"] == 0 and s["waiting"] == 0 and
                   s["free_pages"] == s["total_pages"] for s in slices)
        if idle or time.monotonic() > deadline:
            return {"idle": idle, "slices": slices}
        await asyncio.sleep(0.2)


async def soak(a, target: str, http_url: str | None, pid: int | None) -> dict:
    import aiohttp
    import grpc

    from meshserve.serving.client import channel_options
    from meshserve.serving.proto import meshserve_pb2 as pb
    from meshserve.serving.proto import meshserve_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target, options=channel_options()) as channel, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        stub = pb_grpc.MeshServeStub(channel)
        info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
        model = None
        if http_url:
            async with session.get(http_url + "/v1/models") as r:
                model = (await r.json())["data"][0]["id"]
        specs = [make_spec(a.seed, i, info.vocab_size, info.max_model_len, info.max_logprobs,
                           http_url is not None, a) for i in range(a.requests)]
        tally: collections.Counter[tuple[str, str, str]] = collections.Counter()
        unexpected: list[dict] = []
        rss: dict[str, int] = {}
        series: list[tuple[int, int]] = []
        done = 0
        limit = asyncio.Semaphore(a.concurrency)
        t0 = time.perf_counter()

        async def one(spec: Spec) -> None:
            nonlocal done
            async with limit:
                if spec.transport == "grpc":
                    out = await run_grpc(stub, pb, spec, a.request_timeout)
                else:
                    out = await run_http(session, http_url + "/v1/completions", model, spec,
                                         a.request_timeout)
            tally[spec.transport, spec.kind, out.code] += 1
            if out.code not in EXPECTED[spec.kind] and len(unexpected) < 50:
                unexpected.append({"index": spec.index, "transport": spec.transport,
                                   "kind": spec.kind, "code": out.code})
            done += 1
            if pid is not None and (done == a.rss_baseline_at or done % a.progress == 0):
                series.append((done, rss_bytes(pid)))
                if done == a.rss_baseline_at:
                    rss["baseline"] = series[-1][1]
            if done % a.progress == 0:
                print(f"[soak] {done}/{a.requests} in {time.perf_counter() - t0:.0f} s"
                      + (f", server RSS {series[-1][1] / 2**20:.1f} MiB" if pid else ""),
                      file=sys.stderr, flush=True)

        await asyncio.gather(*(one(s) for s in specs))
        wall = time.perf_counter() - t0
        pages = await idle_pages(stub, pb, a.idle_wait)
        if http_url:  # the same figure as Prometheus scrapes it
            async with session.get(http_url + "/metrics") as r:
                text = await r.text()
            pages["metrics_free_pages"] = sum(
                float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("meshserve_kv_free_pages{"))
        if pid is not None:
            rss["last"] = rss_bytes(pid)
            series.append((done, rss["last"]))
    bad = sum(n for (_, kind, code), n in tally.items() if code not in EXPECTED[kind])
    total = sum(s["total_pages"] for s in pages["slices"])
    growth = (rss["last"] - rss["baseline"]) / rss["baseline"] if "baseline" in rss else None
    checks = {
        "only_expected_outcomes": bad == 0,
        "all_pages_free": pages["idle"] and pages.get("metrics_free_pages", total) == total,
        "rss_growth_below_limit": growth is not None and growth < a.max_rss_growth,
    }
    return {
        "requests": a.requests, "finished": done, "concurrency": a.concurrency,
        "wall_s": wall, "requests_per_s": done / wall, "seed": a.seed,
        "outcomes": {f"{t}/{k}/{c}": n for (t, k, c), n in sorted(tally.items())},
        "unexpected": bad, "unexpected_examples": unexpected, "pages": pages,
        "rss_baseline_at": a.rss_baseline_at, "rss_baseline_bytes": rss.get("baseline"),
        "rss_last_bytes": rss.get("last"), "rss_growth": growth,
        "max_rss_growth": a.max_rss_growth, "rss_series": series, "checks": checks,
        "passed": all(checks.values()),
    }


def describe(r: dict) -> str:
    lines = [f"{'transport/kind/outcome':<40}{'requests':>10}"]
    lines += [f"{key:<40}{n:>10}" for key, n in r["outcomes"].items()]
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f} MiB"  # noqa: E731
    growth = "-" if r["rss_growth"] is None else f"{r['rss_growth']:+.2%}"
    lines += [
        f"{'finished / requested':<40}{r['finished']} / {r['requests']}",
        f"{'wall time':<40}{r['wall_s']:.1f} s ({r['requests_per_s']:.1f} req/s, "
        f"concurrency {r['concurrency']})",
        f"{'server RSS at request ' + str(r['rss_baseline_at']):<40}"
        f"{mib(r['rss_baseline_bytes'])}",
        f"{'server RSS at the end':<40}{mib(r['rss_last_bytes'])} ({growth}, limit "
        f"{r['max_rss_growth']:.0%})",
        f"{'pages at the end':<40}" + ", ".join(
            f"slice {s['index']}: {s['free_pages']}/{s['total_pages']} free, {s['running']} "
            f"running, {s['waiting']} waiting" for s in r["pages"]["slices"]),
    ]
    lines += [f"{'check ' + k:<40}{'pass' if v else 'FAIL'}" for k, v in r["checks"].items()]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--http-fraction", type=float, default=0.5)
    p.add_argument("--cancel-fraction", type=float, default=0.10)
    p.add_argument("--deadline-fraction", type=float, default=0.05)
    p.add_argument("--rss-baseline-at", type=int, default=2000,
                   help="the finished request whose RSS growth is measured from")
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--idle-wait", type=float, default=30.0,
                   help="seconds the server may take to free every page at the end")
    p.add_argument("--progress", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="model to start the server on (default: demo)")
    p.add_argument("--serve-args", default=" ".join(SERVE_FLAGS),
                   help="flags for the started `meshserve serve`")
    p.add_argument("--target", help="HOST:PORT of a running server's gRPC (loopback)")
    p.add_argument("--http-url", help="with --target: its OpenAI API, http://HOST:PORT")
    p.add_argument("--server-pid", type=int, help="with --target: its process, for RSS")
    p.add_argument("--out", help="write the JSON results here")
    a = p.parse_args(argv)
    if a.requests < 1 or a.concurrency < 1 or not 0 <= a.http_fraction <= 1 or not (
            0 <= a.cancel_fraction and 0 <= a.deadline_fraction
            and a.cancel_fraction + a.deadline_fraction <= 1):
        p.error("--requests/--concurrency must be >= 1 and the fractions in [0, 1]")
    if not 1 <= a.rss_baseline_at < a.requests:
        p.error("--rss-baseline-at must be in [1, --requests)")
    if a.target and a.target.rsplit(":", 1)[0] not in LOOPBACK:
        p.error("--target must be on loopback")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    server = None
    if a.target:
        target, http_url, pid = a.target, a.http_url, a.server_pid
    else:
        from meshserve.tools.server_process import ServeProcess

        if a.checkpoint is None:
            from meshserve.models.demo import ensure_demo_checkpoint

            a.checkpoint = ensure_demo_checkpoint()
        server = ServeProcess("--checkpoint", a.checkpoint, "--http-port", "0",
                              *a.serve_args.split(), timeout=600)
        target, pid = server.target, server.proc.pid
        http_url = f"http://127.0.0.1:{server.http_port}"
    try:
        result = asyncio.run(soak(a, target, http_url.rstrip("/") if http_url else None, pid))
        if server is not None:
            alive = server.proc.poll() is None
            result["checks"]["server_alive"] = alive
            result["passed"] = result["passed"] and alive
        result["command"] = "python -m meshserve.tools.soak " + " ".join(
            sys.argv[1:] if argv is None else argv)
    finally:
        if server is not None:
            server.kill()
    print(describe(result))
    print(json.dumps(result))
    if a.out:
        from meshserve.tools.reports import write_json

        write_json(a.out, result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
