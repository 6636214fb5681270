"""Prefill on one engine, decode on another (engine/handoff.py): the same tokens as one
engine doing both, across different layouts, with every page freed on both sides."""

from __future__ import annotations

import dataclasses
import time

import jax
import pytest

from meshserve.engine.engine import Engine
from meshserve.engine.handoff import PREFILLED, HandoffError, KVHandoff, NotParkedError
from meshserve.engine.sampling_params import SamplingParams
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.loading import load_checkpoint
from meshserve.models.tokenizer import find_tokenizer
from tests.engine_fixtures import SMALL, assert_idle, tokens_of

PROMPTS = [[(5 * i + 7 * j) % 250 + 3 for j in range(n)]
           for i, n in enumerate((3, 17, 40, 9, 64, 1, 33, 20))]
PARAMS = [
    SamplingParams(max_tokens=12, ignore_eos=True),
    SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.9, seed=11),
    SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.7, top_k=20, seed=5),
    SamplingParams(max_tokens=10, ignore_eos=True, repetition_penalty=1.2,
                   presence_penalty=0.5, frequency_penalty=0.3),
]
# The tiny model loops: a prompt ending in its own greedy continuation would go on
# repeating prompt tokens, which a repetition penalty forbids — only if the decode side
# knows the prompt's tokens were seen.
LOOPING = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.5, seed=3,
                         repetition_penalty=2.0)


def engine_on(ckpt: str, layout: str, first_device: int, **config) -> Engine:
    mesh_layout = parse_layout(layout)
    devices = jax.devices()[first_device: first_device + mesh_layout.devices_per_slice]
    model = load_checkpoint(ckpt, make_mesh(mesh_layout, devices))
    return Engine(model, dataclasses.replace(SMALL, **config), find_tokenizer(ckpt, model.config))


def wait_free(engine: Engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats().parked or engine.stats().free_pages != engine.stats().total_pages:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)
    assert_idle(engine)


@pytest.fixture(scope="module")
def ckpt(checkpoint_dir) -> str:
    return checkpoint_dir("llama")


@pytest.fixture(scope="module")
def colocated(ckpt):
    """Every (prompt, params) pair run on one engine that prefills and decodes."""
    engine = engine_on(ckpt, "", 0)
    pairs = [(p, PARAMS[i % len(PARAMS)]) for i, p in enumerate(PROMPTS)]
    base = [7, 9] * 10
    loop = tokens_of(engine.generate([base], SamplingParams(max_tokens=12, ignore_eos=True))[0])
    pairs.append((base + loop, LOOPING))
    out = [tokens_of(c) for c in engine.generate([p for p, _ in pairs], [s for _, s in pairs])]
    assert_idle(engine)
    return pairs, out


def disaggregated(prefill: Engine, decode: Engine, prompt, params, rid: str):
    """Prefill-only on `prefill`, handoff, decode on `decode`: (prefill chunks, decode
    chunks)."""
    first = list(prefill.add_request(prompt, params, request_id=rid, prefill_only=True))
    assert first[-1].finish_reason == PREFILLED
    handoff = prefill.export_kv(rid)
    handle = decode.add_prefilled(handoff)
    assert prefill.release_parked(rid)
    return first, list(handle)


@pytest.mark.parametrize("layouts", [("tensor=2", "data=2"), ("data=2", "sequence=2")])
def test_prefill_here_decode_there_equals_colocated(ckpt, colocated, layouts):
    """Greedy, seeded sampling (with top-k) and penalties: the decode side goes on exactly
    where one engine would, whatever the two layouts; the first token is streamed once."""
    pairs, expected = colocated
    prefill = engine_on(ckpt, layouts[0], 0).start()
    decode = engine_on(ckpt, layouts[1], 2).start()
    try:
        for i, ((prompt, params), want) in enumerate(zip(pairs, expected, strict=True)):
            first, rest = disaggregated(prefill, decode, prompt, params, f"r{i}")
            assert tokens_of(first) == want[:1], i
            assert tokens_of(rest) == want[1:], i  # never the first token again
            final = rest[-1]
            assert final.finish_reason == "length"
            assert final.usage.completion_tokens == params.max_tokens
            assert final.usage.prompt_tokens == len(prompt)
        wait_free(prefill)
        wait_free(decode)
        assert decode.stats().prefix_cache_queries == 0  # imports look nothing up
        assert decode.stats().cached_pages > 0  # ... but their full pages join the cache
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_handoff_metadata_round_trip_expiry_and_refusals(ckpt, colocated):
    pairs, expected = colocated
    prefill = engine_on(ckpt, "", 4, park_timeout_s=3.0)
    decode = engine_on(ckpt, "", 5, num_pages=8)  # room for one request at a time
    prefill.warmup_handoff(export=True, imports=False)
    decode.warmup_handoff()
    programs = [e._handoff._scatter._cache_size() + e._handoff._gather._cache_size()
                for e in (prefill, decode)]
    prefill.start()
    decode.start()
    try:
        prompt, params = pairs[4]  # 64 tokens: 5 pages with the next token
        list(prefill.add_request(prompt, params, request_id="a", prefill_only=True))
        handoff = prefill.export_kv("a")
        desc = handoff.describe()
        assert desc["layout"]["pages"] == 4 and desc["layout"]["rows"] == 4
        assert handoff.layout.nbytes == handoff.kv.nbytes
        # What a transport would rebuild from a side channel and the array it pulled.
        rebuilt = KVHandoff.from_description(desc, handoff.kv)
        assert dataclasses.replace(rebuilt, kv=None) == dataclasses.replace(handoff, kv=None)
        with pytest.raises(HandoffError, match="page_size 8 != 16"):
            decode.add_prefilled(dataclasses.replace(
                handoff, layout=dataclasses.replace(handoff.layout, page_size=8)))
        with pytest.raises(HandoffError, match="KV array is"):
            KVHandoff.from_description(desc, handoff.kv[:, :2])
        with pytest.raises(HandoffError, match="malformed"):
            KVHandoff.from_description({**desc, "seed": "x"})
        # Two imports, pages for one: the second waits for the first to finish.
        h1 = decode.add_prefilled(handoff, request_id="a1")
        h2 = decode.add_prefilled(handoff, request_id="a2")
        assert tokens_of(h1) == tokens_of(h2) == expected[4][1:]
        # Released here, or freed already if the imports outlasted its park deadline (a
        # loaded machine): either way its pages come back and it is no longer parked.
        prefill.release_parked("a")
        wait_free(prefill, timeout=15.0)
        assert prefill.stats().parked == 0 and not prefill.release_parked("a")
        # Nobody exports or releases: the pages come back after park_timeout_s.
        list(prefill.add_request(prompt, params, request_id="b", prefill_only=True))
        assert prefill.stats().parked == 1
        wait_free(prefill, timeout=15.0)
        with pytest.raises(NotParkedError):
            prefill.export_kv("b")
        # A first token that ends the request: nothing parks.
        done = list(prefill.add_request(prompt, dataclasses.replace(params, max_tokens=1),
                                        prefill_only=True))
        assert done[-1].finish_reason == "length" and prefill.stats().parked == 0
        # abort() of a parked request frees it like release_parked.
        list(prefill.add_request(prompt, params, request_id="c", prefill_only=True))
        assert prefill.abort("c")
        wait_free(prefill)
        wait_free(decode)
        # The warm-up compiled every handoff program the traffic needed.
        assert programs == [e._handoff._scatter._cache_size() + e._handoff._gather._cache_size()
                            for e in (prefill, decode)]
    finally:
        prefill.shutdown()
        decode.shutdown()
