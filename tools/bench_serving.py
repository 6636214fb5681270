"""`meshserve bench-serving`: a load generator for a running `meshserve serve`.

Follows vLLM's `bench serve` conventions: synthetic random-token prompts whose lengths
are drawn uniformly from [len * (1 - range_ratio), len * (1 + range_ratio)], arrivals
from a Poisson process at --request-rate (gamma with --burstiness != 1; inf = all at
once), optionally capped at --max-concurrency in flight; reports TTFT, TPOT (time per
output token after the first), ITL (inter-token latency) and E2E latency (mean, p50,
p90, p99, in ms), request and token throughput, and goodput: requests per second that
met every --slo target. Outputs are forced to their exact length with ignore_eos.

Shared-prefix workload (--prefix-len N --num-prefixes K): the first N tokens of every
prompt are one of K random prefixes (picked uniformly per request), the rest random, as
multi-turn chat and shared system prompts look to a prefix cache; the summary adds the
prompt tokens served from the cache (Usage.cached_tokens) and how many requests each
slice took.

`--backend openai --base-url URL` sends the same workload to an OpenAI-compatible HTTP
server (meshserve's `--http-port`, vLLM, sglang, ...) as streamed `/v1/completions` with
token-id prompts, and measures it the same way: tokens per chunk from vLLM's
`return_token_ids` when the server sends them (one per chunk otherwise), the output
length from the final usage chunk (`stream_options.include_usage`).

Loopback targets only, a bounded number of requests and a bounded duration: it is a
benchmark, not a load-testing tool for other people's servers.

    meshserve bench-serving --target 127.0.0.1:50051 --num-prompts 200 \
        --request-rate 8 --input-len 256 --output-len 64 --slo ttft_ms=500,tpot_ms=50 \
        --out bench.json
    meshserve bench-serving --input-len 512 --prefix-len 460 --num-prefixes 4 ...
    meshserve bench-serving --backend openai --base-url http://127.0.0.1:8000 \
        --vocab-size 49152 --num-prompts 200 --request-rate 8
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
import time
import urllib.parse

import numpy as np
from absl import flags

MAX_PROMPTS = 100_000
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


def define_flags() -> None:
    d = flags
    d.DEFINE_string("target", "127.0.0.1:50051", "HOST:PORT of the server (loopback only).")
    d.DEFINE_integer("num_prompts", 100, "Requests to send.", lower_bound=1,
                     upper_bound=MAX_PROMPTS)
    d.DEFINE_float("request_rate", math.inf, "Mean arrivals per second (inf: all at once).")
    d.DEFINE_float("burstiness", 1.0, "Gamma shape of inter-arrival times (1 = Poisson).")
    d.DEFINE_integer("max_concurrency", None, "Most requests in flight at once.")
    d.DEFINE_integer("input_len", 128, "Mean prompt length in tokens.", lower_bound=1)
    d.DEFINE_integer("output_len", 64, "Mean output length in tokens.", lower_bound=1)
    d.DEFINE_float("range_ratio", 0.0, "Lengths vary uniformly by this fraction.",
                   lower_bound=0.0, upper_bound=1.0)
    d.DEFINE_integer("prefix_len", 0, "Shared-prefix workload: tokens of each prompt taken "
                     "from one of --num-prefixes prefixes (0: fully random prompts).",
                     lower_bound=0)
    d.DEFINE_integer("num_prefixes", 1, "How many distinct shared prefixes.", lower_bound=1)
    d.DEFINE_string("slo", None, "Goodput targets, e.g. ttft_ms=500,tpot_ms=50 (also e2e_ms).")
    d.DEFINE_integer("seed", 0, "Seed for prompts and arrivals.")
    d.DEFINE_float("max_duration", 600.0, "Stop sending and cancel what runs after this many "
                   "seconds.", lower_bound=1.0, upper_bound=86400.0)
    d.DEFINE_float("request_timeout", 300.0, "Deadline of each request in seconds.")
    d.DEFINE_string("out", None, "Write the results as JSON here.")
    d.DEFINE_string("auth_token_file", None, "Bearer token file.")
    d.DEFINE_string("tls_ca", None, "Use TLS, trusting this CA (PEM).")
    d.DEFINE_enum("backend", "grpc", ["grpc", "openai"], "grpc: meshserve's Generate at "
                  "--target; openai: streamed /v1/completions at --base-url.")
    d.DEFINE_string("base_url", None, "With --backend openai: the server's URL, e.g. "
                    "http://127.0.0.1:8000 (loopback only; a trailing /v1 is fine).")
    d.DEFINE_string("model", None, "With --backend openai: the model id (default: the first "
                    "of /v1/models).")
    d.DEFINE_integer("vocab_size", None, "With --backend openai: random prompt ids are drawn "
                     "below this (the HTTP API does not say it).", lower_bound=4)


def parse_slo(text: str | None) -> dict[str, float]:
    slo: dict[str, float] = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in SLO_KEYS:
            raise ValueError(f"--slo terms are KEY=MS with KEY one of {SLO_KEYS}, got {part!r}")
        slo[key.strip()] = float(value)
    return slo


def check_loopback(target: str, flag: str = "--target") -> None:
    host = target.rsplit(":", 1)[0]
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"{flag} must be a loopback address ({', '.join(LOOPBACK_HOSTS)}), "
                         f"got {host!r}")


def api_base(base_url: str) -> str:
    """The server's root URL (without /v1), checked to be http(s) on loopback."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--base-url must be http://HOST:PORT or https://..., got {base_url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    check_loopback(f"{host}:{parts.port or 0}", "--base-url")
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def lengths(rng: np.random.Generator, mean: int, ratio: float, n: int) -> np.ndarray:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.integers(lo, hi + 1, size=n)


def arrival_times(rng: np.random.Generator, n: int, rate: float, burstiness: float) -> np.ndarray:
    if math.isinf(rate):
        return np.zeros(n)
    # Gamma(shape=k, scale=1/(k*rate)) has mean 1/rate; k=1 is exponential (Poisson).
    gaps = rng.gamma(burstiness, 1.0 / (burstiness * rate), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


@dataclasses.dataclass
class Result:
    input_len: int
    output_len: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None
    cached_tokens: int = 0
    slice: int | None = None
    start: float = dataclasses.field(default_factory=time.perf_counter, repr=False)
    last: float | None = dataclasses.field(default=None, repr=False)

    def arrived(self, n: int) -> None:
        """`n` output tokens came in one message: the first sets TTFT, later ones add
        their share of the gap since the previous message to the inter-token latencies."""
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itl.extend([(now - self.last) / n] * n)
        self.last = now
        self.output_len += n


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    a = np.asarray(values) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def summarize(results: list[Result], duration: float, slo: dict[str, float]) -> dict:
    ok = [r for r in results if r.error is None]
    tpots = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    good = 0
    for r in ok:
        measured = {"ttft_ms": r.ttft * 1e3, "e2e_ms": r.e2e * 1e3,
                    "tpot_ms": (r.e2e - r.ttft) / max(r.output_len - 1, 1) * 1e3}
        good += all(measured[k] <= v for k, v in slo.items())
    inputs, outputs = sum(r.input_len for r in ok), sum(r.output_len for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    per_slice: dict[str, int] = {}
    for r in ok:
        if r.slice is not None:
            per_slice[str(r.slice)] = per_slice.get(str(r.slice), 0) + 1
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "errors": errors,
        "duration_s": duration, "total_input_tokens": inputs, "total_output_tokens": outputs,
        "request_throughput": len(ok) / duration,
        "output_throughput": outputs / duration,
        "total_token_throughput": (inputs + outputs) / duration,
        "cached_tokens": cached, "cache_hit_rate": cached / inputs if inputs else math.nan,
        "requests_per_slice": dict(sorted(per_slice.items())),
        "goodput": good / duration if slo else None, "slo": slo,
        "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpots),
        "itl_ms": _stats([x for r in ok for x in r.itl]), "e2e_ms": _stats([r.e2e for r in ok]),
    }


def make_prompts(rng: np.random.Generator, lens: np.ndarray, vocab_size: int, prefix_len: int,
                 num_prefixes: int) -> list[list[int]]:
    """Random prompts of `lens` tokens; with prefix_len, each starts with one of
    num_prefixes shared random prefixes of that length."""
    # Ids 3.. skip the usual unk/bos/eos; random tokens defeat prefix caching.
    low = min(3, vocab_size - 1)
    if prefix_len and prefix_len >= int(lens.min()):
        raise ValueError(f"--prefix-len {prefix_len} must be shorter than every prompt "
                         f"(the shortest has {int(lens.min())} tokens)")
    prefixes = [rng.integers(low, vocab_size, size=prefix_len).tolist()
                for _ in range(num_prefixes if prefix_len else 0)]
    prompts = []
    for n in lens:
        head = prefixes[int(rng.integers(num_prefixes))] if prefixes else []
        prompts.append(head + rng.integers(low, vocab_size, size=int(n) - len(head)).tolist())
    return prompts


async def _one(stub, pb, prompt: list[int], out_len: int, metadata, timeout: float) -> Result:
    import grpc

    result = Result(input_len=len(prompt))
    request = pb.GenerateRequest(token_ids=prompt, max_tokens=out_len, ignore_eos=True)
    try:
        async for response in stub.Generate(request, metadata=metadata, timeout=timeout):
            n = len(response.token_ids)
            if not n:
                continue
            result.arrived(n)
            if response.finish_reason:
                result.cached_tokens = response.usage.cached_tokens
                result.slice = response.slice
        result.e2e = time.perf_counter() - result.start
        if result.ttft is None:
            result.error = "no tokens"
    except grpc.aio.AioRpcError as e:
        result.error = e.code().name
    return result


async def _one_openai(session, url: str, model: str, prompt: list[int], out_len: int,
                      headers: dict[str, str], timeout: float) -> Result:
    """One streamed /v1/completions request, timed as `_one` times a Generate call."""
    import aiohttp

    result = Result(input_len=len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    reported = None
    try:
        async with session.post(url, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}"
                return result
            async for raw in response.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    result.error = str(obj["error"].get("code") or "stream error")
                    return result
                if obj.get("usage"):
                    reported = obj["usage"].get("completion_tokens")
                for choice in obj.get("choices") or ():
                    ids = choice.get("token_ids")
                    n = len(ids) if ids is not None else (1 if choice.get("text") else 0)
                    if n:
                        result.arrived(n)
        result.e2e = time.perf_counter() - result.start
        if reported is not None:
            result.output_len = int(reported)
        if result.ttft is None:
            result.error = "no tokens"
    except (TimeoutError, aiohttp.ClientError) as e:
        result.error = type(e).__name__
    return result


async def _openai_info(session, base: str, headers: dict[str, str],
                       model: str | None) -> tuple[str, int | None]:
    """(model id, max_model_len if the server says it) from /v1/models."""
    async with session.get(base + "/v1/models", headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"GET {base}/v1/models answered HTTP {response.status}")
        cards = (await response.json()).get("data") or []
    if not cards:
        raise RuntimeError(f"{base}/v1/models lists no model")
    card = next((c for c in cards if c.get("id") == model), None) if model else cards[0]
    if card is None:
        raise ValueError(f"--model {model!r} is not among {[c.get('id') for c in cards]}")
    return card["id"], card.get("max_model_len")


def _workload(seed: int, num_prompts: int, input_len: int, output_len: int, range_ratio: float,
              request_rate: float, burstiness: float, vocab_size: int,
              max_model_len: int | None, prefix_len: int = 0, num_prefixes: int = 1):
    rng = np.random.default_rng(seed)
    ins = lengths(rng, input_len, range_ratio, num_prompts)
    outs = lengths(rng, output_len, range_ratio, num_prompts)
    if max_model_len is not None:
        over = int((ins + outs).max()) - max_model_len
        if over > 0:
            raise ValueError(f"input + output lengths reach {max_model_len + over} tokens; "
                             f"the server's max_model_len is {max_model_len}")
    prompts = make_prompts(rng, ins, vocab_size, prefix_len, num_prefixes)
    return prompts, outs, arrival_times(rng, num_prompts, request_rate, burstiness)


async def _drive(one, prompts, outs, starts, max_concurrency: int | None,
                 max_duration: float) -> tuple[list[Result], float]:
    """Send every request at its arrival time (at most max_concurrency in flight)."""
    limit = asyncio.Semaphore(max_concurrency or len(prompts))
    t0 = time.perf_counter()

    async def scheduled(i: int) -> Result:
        await asyncio.sleep(max(0.0, starts[i] - (time.perf_counter() - t0)))
        async with limit:
            return await one(prompts[i], int(outs[i]))

    tasks = [asyncio.create_task(scheduled(i)) for i in range(len(prompts))]
    done, pending = await asyncio.wait(tasks, timeout=max_duration)
    for t in pending:
        t.cancel()
    results = [t.result() if t in done else Result(len(prompts[i]), error="max_duration")
               for i, t in enumerate(tasks)]
    return results, time.perf_counter() - t0


async def _run_openai(base_url: str, model: str | None, vocab_size: int | None, workload,
                      max_concurrency, max_duration, request_timeout, token, tls_ca):
    import ssl

    import aiohttp

    if vocab_size is None:
        raise ValueError("--backend openai needs --vocab-size (random prompt ids are drawn "
                         "below it)")
    base = api_base(base_url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    context = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
    connector = aiohttp.TCPConnector(limit=0, ssl=context if context else True)
    async with aiohttp.ClientSession(connector=connector) as session:
        model, max_len = await _openai_info(session, base, headers, model)
        prompts, outs, starts = workload(vocab_size, max_len)

        async def one(prompt: list[int], out_len: int) -> Result:
            return await _one_openai(session, base + "/v1/completions", model, prompt, out_len,
                                     headers, request_timeout)

        results, duration = await _drive(one, prompts, outs, starts, max_concurrency,
                                         max_duration)
    return results, duration, model, prompts


async def run(target: str, num_prompts: int, request_rate: float, burstiness: float,
              max_concurrency: int | None, input_len: int, output_len: int, range_ratio: float,
              slo: dict[str, float], seed: int = 0, max_duration: float = 600.0,
              request_timeout: float = 300.0, token: str | None = None,
              tls_ca: str | None = None, backend: str = "grpc", base_url: str | None = None,
              model: str | None = None, vocab_size: int | None = None, prefix_len: int = 0,
              num_prefixes: int = 1) -> dict:
    def workload(vocab: int, max_model_len: int | None):
        return _workload(seed, num_prompts, input_len, output_len, range_ratio, request_rate,
                         burstiness, vocab, max_model_len, prefix_len, num_prefixes)

    if backend == "openai":
        if not base_url:
            raise ValueError("--backend openai needs --base-url")
        results, duration, model_name, prompts = await _run_openai(
            base_url, model, vocab_size, workload, max_concurrency, max_duration,
            request_timeout, token, tls_ca)
        summary = summarize(results, duration, slo)
        summary.update(backend=backend, base_url=base_url, target=None, model=model_name)
    elif backend == "grpc":
        results, duration, info = await _run_grpc(target, workload, max_concurrency,
                                                  max_duration, request_timeout, token, tls_ca)
        summary = summarize(results, duration, slo)
        summary.update(backend=backend, target=target, model=info.model_name)
    else:
        raise ValueError(f"--backend must be grpc or openai, got {backend!r}")
    summary.update(num_prompts=num_prompts, request_rate=request_rate, burstiness=burstiness,
                   max_concurrency=max_concurrency, input_len=input_len,
                   output_len=output_len, range_ratio=range_ratio, seed=seed,
                   prefix_len=prefix_len, num_prefixes=num_prefixes)
    return summary


async def _run_grpc(target: str, workload, max_concurrency, max_duration, request_timeout,
                    token, tls_ca):
    import grpc

    from meshserve.serving.client import auth_metadata, channel_credentials, channel_options
    from meshserve.serving.proto import meshserve_pb2 as pb
    from meshserve.serving.proto import meshserve_pb2_grpc as pb_grpc

    check_loopback(target)
    metadata = auth_metadata(token)
    if tls_ca:
        channel = grpc.aio.secure_channel(target, channel_credentials(tls_ca), channel_options())
    else:
        channel = grpc.aio.insecure_channel(target, options=channel_options())
    async with channel:
        stub = pb_grpc.MeshServeStub(channel)
        info = await stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata, timeout=30)
        prompts, outs, starts = workload(info.vocab_size, info.max_model_len)

        async def one(prompt: list[int], out_len: int) -> Result:
            return await _one(stub, pb, prompt, out_len, metadata, request_timeout)

        results, duration = await _drive(one, prompts, outs, starts, max_concurrency,
                                         max_duration)
    return results, duration, info



def describe(s: dict) -> str:
    lines = [f"{'completed / failed':<28}{s['completed']} / {s['failed']} {s['errors'] or ''}",
             f"{'duration (s)':<28}{s['duration_s']:.2f}",
             f"{'request throughput (req/s)':<28}{s['request_throughput']:.2f}",
             f"{'output throughput (tok/s)':<28}{s['output_throughput']:.1f}",
             f"{'total throughput (tok/s)':<28}{s['total_token_throughput']:.1f}",
             f"{'prompt tokens cached':<28}{s['cached_tokens']} "
             f"({s['cache_hit_rate']:.1%})  per slice: {s['requests_per_slice']}"]
    if s["goodput"] is not None:
        lines.append(f"{'goodput (req/s)':<28}{s['goodput']:.2f}  slo={s['slo']}")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        v = s[key]
        lines.append(f"{key:<28}mean {v['mean']:.2f}  p50 {v['p50']:.2f}  "
                     f"p90 {v['p90']:.2f}  p99 {v['p99']:.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    del argv
    from meshserve.serving.client import read_token

    f = flags.FLAGS
    if f.request_rate <= 0 or f.burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    if f.max_concurrency is not None and f.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    summary = asyncio.run(run(
        f.target, f.num_prompts, f.request_rate, f.burstiness, f.max_concurrency, f.input_len,
        f.output_len, f.range_ratio, parse_slo(f.slo), f.seed, f.max_duration,
        f.request_timeout, read_token(f.auth_token_file), f.tls_ca, backend=f.backend,
        base_url=f.base_url, model=f.model, vocab_size=f.vocab_size,
        prefix_len=f.prefix_len, num_prefixes=f.num_prefixes))
    print(describe(summary))
    if f.out:
        with open(f.out, "w") as out:
            json.dump(summary, out, indent=1)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    from meshserve.tools.cli import main as cli_main

    cli_main([sys.argv[0], "bench-serving", *sys.argv[1:]])
