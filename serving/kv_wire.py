"""Protobuf encodings for cross-server prefill/decode (serving/proto/internal.proto):
array layouts, handoffs, the forwarded request, and the first chunk. Never pickle: every
field is typed, bounded and checked on the way in (malformed input raises WireError)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from meshserve.engine.kv_handoff import DESCRIPTION_VERSION, KVHandoff
from meshserve.engine.kv_transfer import ArrayLayout
from meshserve.engine.outputs import StreamChunk, TokenLogprob, Usage
from meshserve.engine.sampling_params import SamplingParams
from meshserve.serving.proto import internal_pb2 as ipb
from meshserve.serving.proto import meshserve_pb2 as pb

MAX_DIMS = 8
MAX_ARRAYS = 16
# KV dtypes a peer may offer; anything else is refused before np/jnp parse the name.
DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2", "int8")


class WireError(ValueError):
    """A peer sent a message this server cannot use; the message says why."""


def layout_to_pb(x: ArrayLayout) -> ipb.ArrayLayout:
    return ipb.ArrayLayout(
        shape=x.shape, dtype=x.dtype, mesh_axes=x.mesh_axes, mesh_shape=x.mesh_shape,
        spec=[ipb.PartitionDim(axes=e) for e in x.spec], shard_shape=x.shard_shape,
        num_shards=x.num_shards)


def layout_from_pb(m: ipb.ArrayLayout) -> ArrayLayout:
    if m.dtype not in DTYPES:
        raise WireError(f"offered dtype {m.dtype[:32]!r} is not a KV dtype ({DTYPES})")
    dims = (m.shape, m.shard_shape, m.spec)
    if not 0 < len(m.shape) <= MAX_DIMS or any(len(d) != len(m.shape) for d in dims):
        raise WireError("offered layout: shape, shard_shape and spec must have the same "
                        f"1..{MAX_DIMS} dimensions")
    if len(m.mesh_axes) != len(m.mesh_shape) or len(m.mesh_axes) > MAX_DIMS:
        raise WireError("offered layout: mesh_axes and mesh_shape differ in length")
    if any(d < 0 for d in (*m.shape, *m.shard_shape)) or any(n < 1 for n in m.mesh_shape):
        raise WireError("offered layout: negative sizes")
    return ArrayLayout(
        shape=tuple(m.shape), dtype=m.dtype, mesh_axes=tuple(m.mesh_axes),
        mesh_shape=tuple(m.mesh_shape), spec=tuple(tuple(d.axes) for d in m.spec),
        shard_shape=tuple(m.shard_shape), num_shards=m.num_shards)


def offer_layouts(offer: ipb.KVOffer) -> list[ArrayLayout]:
    if not 0 < len(offer.layouts) <= MAX_ARRAYS:
        raise WireError(f"an offer has 1..{MAX_ARRAYS} arrays, got {len(offer.layouts)}")
    return [layout_from_pb(m) for m in offer.layouts]


def handoff_to_pb(h: KVHandoff) -> ipb.Handoff:
    lay = h.layout
    m = ipb.Handoff(
        version=DESCRIPTION_VERSION, request_id=h.request_id, prompt_ids=h.prompt_ids,
        output_ids=h.output_ids, seed=h.seed, num_computed=h.num_computed,
        priority=h.priority, cache_root=h.cache_root, cached_tokens=h.cached_tokens,
        layout=ipb.KVLayout(num_layers=lay.num_layers, page_size=lay.page_size,
                            num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim,
                            dtype=lay.dtype, pages=lay.pages, rows=lay.rows))
    if h.queue_ms is not None:
        m.queue_ms = h.queue_ms
    if h.prefill_ms is not None:
        m.prefill_ms = h.prefill_ms
    return m


def handoff_from_pb(m: ipb.Handoff, params: SamplingParams, kv=None) -> KVHandoff:
    """The handoff (through engine/kv_handoff.py's own checks), with the decode server's
    sampling parameters."""
    lay = m.layout
    if lay.dtype not in DTYPES:
        raise WireError(f"handoff dtype {lay.dtype[:32]!r} is not a KV dtype")
    desc = {
        "version": m.version, "request_id": m.request_id, "prompt_ids": list(m.prompt_ids),
        "output_ids": list(m.output_ids),
        "params": {**dataclasses.asdict(params), "stop": list(params.stop),
                   "stop_token_ids": list(params.stop_token_ids)},
        "seed": m.seed, "num_computed": m.num_computed, "priority": m.priority,
        "cache_root": m.cache_root.hex(), "cached_tokens": m.cached_tokens,
        "layout": {"num_layers": lay.num_layers, "page_size": lay.page_size,
                   "num_kv_heads": lay.num_kv_heads, "head_dim": lay.head_dim,
                   "dtype": str(jnp.dtype(lay.dtype)), "pages": lay.pages, "rows": lay.rows},
        "queue_ms": m.queue_ms if m.HasField("queue_ms") else None,
        "prefill_ms": m.prefill_ms if m.HasField("prefill_ms") else None,
    }
    return KVHandoff.from_description(desc, kv)


def params_to_request(request_id: str, prompt_ids: list[int], params: SamplingParams,
                      priority: int, cache_salt: str) -> pb.GenerateRequest:
    """The request a prefill server gets: the validated prompt and every parameter
    explicit, so its own validation resolves them to the same values."""
    r = pb.GenerateRequest(
        request_id=request_id, token_ids=prompt_ids, max_tokens=params.max_tokens,
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        stop=params.stop, stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos,
        priority=priority, cache_salt=cache_salt, logprobs=params.logprobs)
    if params.seed is not None:
        r.seed = params.seed
    return r


def chunk_to_pb(chunk: StreamChunk) -> pb.GenerateResponse:
    """Every logprob alternative is kept (the decode server trims to what was asked)."""
    m = pb.GenerateResponse(request_id=chunk.request_id, text=chunk.text,
                            token_ids=chunk.token_ids)
    for lp in chunk.logprobs:
        m.logprobs.add(token_id=lp.token_id, logprob=lp.logprob,
                       top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
    if chunk.finish_reason is not None:
        m.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            m.usage.prompt_tokens = chunk.usage.prompt_tokens
            m.usage.completion_tokens = chunk.usage.completion_tokens
            m.usage.cached_tokens = chunk.usage.cached_tokens
        m.timings.queue_ms = chunk.queue_ms or 0.0
        m.timings.ttft_ms = chunk.ttft_ms or 0.0
    return m


def chunk_from_pb(m: pb.GenerateResponse, request_id: str, final: bool) -> StreamChunk:
    if m.request_id != request_id:
        raise WireError(f"the peer answered for request {m.request_id[:128]!r}, not "
                        f"{request_id!r}")
    logprobs = tuple(TokenLogprob(lp.token_id, lp.logprob,
                                  tuple((t.token_id, t.logprob) for t in lp.top))
                     for lp in m.logprobs)
    if not final:
        return StreamChunk(request_id, tuple(m.token_ids), m.text, logprobs)
    u = m.usage
    return StreamChunk(request_id, tuple(m.token_ids), m.text, logprobs,
                       finish_reason=m.finish_reason,
                       usage=Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens),
                       queue_ms=m.timings.queue_ms, ttft_ms=m.timings.ttft_ms)
