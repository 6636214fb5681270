"""The engine's prefix cache: reused pages change no output (against the cache off and
transformers), salts isolate tenants, and eviction, preemption, aborts and chunked
prefill keep working with shared pages."""

from __future__ import annotations

import dataclasses
import random

import pytest

from meshserve.engine.prefix_cache import EVICTED
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.sequence import Status
from tests import hf_models
from tests.engine_fixtures import SMALL, assert_idle, make_engine, tokens_of

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PREFIX = [(11 * j) % 250 + 3 for j in range(200)]  # 12 full pages and 8 tokens


@pytest.fixture(scope="module", params=["", "data=2,tensor=2"])
def engines(request, checkpoint_dir):
    """(cache on, cache off) on the same layout; SMALL's 64-token steps chunk the
    200-token prompts into four prefill steps."""
    ckpt = checkpoint_dir("llama")
    on = make_engine(ckpt, request.param)
    off = make_engine(ckpt, request.param, dataclasses.replace(SMALL, prefix_caching=False))
    yield on, off
    for e in (on, off):
        assert_idle(e)


def _run(engine, prompt, params=GREEDY, **kwargs):
    handle = engine.add_request(prompt, params, **kwargs)
    while engine.step():
        pass
    chunks = list(handle)
    return tokens_of(chunks), chunks[-1].usage


def test_a_prefix_sent_twice_is_reused_and_changes_no_output(engines):
    on, off = engines
    before = on.stats()
    want, usage = _run(off, PREFIX)
    assert usage.cached_tokens == 0
    first, usage = _run(on, PREFIX, cache_salt="t1")
    assert first == want and usage.cached_tokens == 0
    second, usage = _run(on, PREFIX, cache_salt="t1")
    assert usage.cached_tokens == 192  # 12 full pages; the rest (and the last token) computed
    assert second == want == hf_models.hf_greedy("llama", PREFIX, GREEDY.max_tokens)
    stats = on.stats()
    assert stats.prefix_cache_queries - before.prefix_cache_queries == 2 * len(PREFIX)
    assert stats.prefix_cache_hits - before.prefix_cache_hits == 192
    assert off.stats().prefix_cache_queries == 0 and off.stats().cached_pages == 0
    # The same prefix with another ending shares the 12 pages too.
    longer = PREFIX + [5, 6, 7]
    want, _ = _run(off, longer)
    got, usage = _run(on, longer, cache_salt="t1")
    assert got == want and usage.cached_tokens == 192


def test_a_prompt_of_whole_pages_recomputes_its_last_page(engines):
    on, off = engines
    prompt = PREFIX[:13 * 16]  # ends exactly on a page boundary
    want, _ = _run(off, prompt)
    assert _run(on, prompt, cache_salt="whole")[0] == want
    got, usage = _run(on, prompt, cache_salt="whole")
    # A hit on all 13 pages would leave no token to compute: the 13th is recomputed
    # into a page of its own.
    assert usage.cached_tokens == 12 * 16 and got == want


def test_a_second_turn_reuses_the_first_turns_output(engines):
    on, off = engines
    out, _ = _run(on, PREFIX, cache_salt="chat")
    turn2 = PREFIX + out + [9, 8, 7, 6, 5, 4, 3, 2]
    want, _ = _run(off, turn2)
    got, usage = _run(on, turn2, cache_salt="chat")
    # Turn one fed 211 tokens (its last output never); a sequence that ends commits one
    # token less (its last fed position may have been rewritten in the decode loop):
    # 210 valid tokens, 13 full pages.
    assert usage.cached_tokens == 13 * 16 and got == want


def test_salts_isolate_tenants(engines):
    on, _ = engines
    prompt = [(7 * j) % 250 + 3 for j in range(100)]
    salts = ["", "alice", "bob", "", "alice", "bob"]
    cached = [_run(on, prompt, cache_salt=s)[1].cached_tokens for s in salts]
    # Each salt misses the first time, even though the same tokens are cached under
    # another salt (or none), and hits after.
    assert cached == [0, 0, 0, 96, 96, 96]
    assert _run(on, prompt, cache_salt=b"alice")[1].cached_tokens == 96  # bytes or str


def test_penalties_reuse_only_what_leaves_their_statistics_intact(engines):
    on, off = engines
    prompt = [(5 * j) % 250 + 3 for j in range(70)]
    for params, cached in ((SamplingParams(max_tokens=12, repetition_penalty=1.3), 0),
                           (SamplingParams(max_tokens=12, presence_penalty=0.7,
                                           frequency_penalty=0.3), 64)):
        want, _ = _run(off, prompt, params)
        _run(on, prompt, GREEDY, cache_salt="pen")
        got, usage = _run(on, prompt, params, cache_salt="pen")
        assert usage.cached_tokens == cached and got == want


def _assert_shared_pages_have_equal_prefixes(engine) -> int:
    """No page is held by two live sequences unless their tokens up to and including it
    (and their salts) are equal; returns how many pages are shared."""
    shared = 0
    for running in engine.scheduler.running:
        owners: dict[int, list] = {}
        for seq in running:
            for i, page in enumerate(seq.pages):
                owners.setdefault(page, []).append((seq, i))
        for page, holders in owners.items():
            if len(holders) < 2:
                continue
            shared += 1
            (a, i), *rest = holders
            for b, j in rest:
                assert i == j and a.cache_root == b.cache_root, page
                end = (i + 1) * engine.config.page_size
                assert a.all_tokens[:end] == b.all_tokens[:end], page
                assert min(a.num_computed, b.num_computed) >= end
    return shared


@pytest.mark.parametrize("layout", ["", "data=2,tensor=2"])
def test_eviction_and_preemption_in_a_tiny_pool_change_no_output(checkpoint_dir, layout):
    cfg = dataclasses.replace(SMALL, num_pages=14, max_seqs=8, min_seq_bucket=8)
    ckpt = checkpoint_dir("llama")
    on = make_engine(ckpt, layout, cfg)
    off = make_engine(ckpt, layout, dataclasses.replace(cfg, prefix_caching=False))
    events = on.cache_events()
    rng = random.Random(1)
    heads = [[rng.randint(3, 250) for _ in range(rng.choice((40, 64, 90)))] for _ in range(6)]
    requests = [heads[rng.randrange(6)] + [rng.randint(3, 250) for _ in range(rng.randint(1, 20))]
                for _ in range(24)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    want = [tokens_of(c) for c in off.generate(requests, params)]
    handles, shared, pending = [], 0, list(requests)
    while pending or on.step():
        for _ in range(3):  # arrivals join running batches
            if pending:
                handles.append(on.add_request(pending.pop(0), params))
        shared += _assert_shared_pages_have_equal_prefixes(on)
    stats = on.stats()
    assert [tokens_of(h) for h in handles] == want
    assert stats.preemptions > 0 and shared > 0 and stats.prefix_cache_hits > 0
    kinds = [k for k, _ in events.read().events]
    assert EVICTED in kinds  # the pool is far too small to keep every prefix
    assert stats.cached_pages == sum(a.cached for a in on.scheduler.allocators) > 0
    for e in (on, off):
        assert_idle(e)


def test_abort_of_one_sharer_leaves_the_other_intact(engines):
    on, off = engines
    prompt = PREFIX[:120]
    want, _ = _run(off, prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    _run(on, prompt, GREEDY, cache_salt="abort")
    long = SamplingParams(max_tokens=30, ignore_eos=True)
    keep = on.add_request(prompt, long, cache_salt="abort")
    drop = on.add_request(prompt, long, cache_salt="abort")
    for _ in range(3):
        on.step()
    seqs = {s.request_id: s for r in on.scheduler.running for s in r}
    keep_seq, drop_seq = seqs[keep.request_id], seqs[drop.request_id]
    if keep_seq.shard == drop_seq.shard:  # one data shard: they share the cached pages
        common = set(keep_seq.pages) & set(drop_seq.pages)
        assert len(common) == 7
        alloc = on.scheduler.allocators[keep_seq.shard]
        assert all(alloc.refs(p) == 2 for p in common)
    assert on.abort(drop.request_id)
    on.step()
    assert drop_seq.status is Status.FINISHED
    if keep_seq.shard == drop_seq.shard:
        assert all(alloc.refs(p) == 1 for p in common)
    while on.step():
        pass
    assert tokens_of(list(keep)) == want
    assert list(drop)[-1].finish_reason == "abort"


def test_a_sequence_ending_inside_a_decode_loop_does_not_cache_its_last_position(engines):
    """A row done in a decode loop rewrites its last fed position while the loop runs on
    for other rows (engine/step.py): that position must not reach the cache."""
    on, off = engines
    prompt = [(13 * j) % 250 + 3 for j in range(41)]
    # 41 + 7 fed tokens: the last fed position (47) ends page 2; the row is done after 3
    # of a call's 4 iterations while the other row goes on.
    a = on.add_request(prompt, SamplingParams(max_tokens=8, ignore_eos=True), cache_salt="end")
    b = on.add_request([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True))
    while on.step():
        pass
    out = tokens_of(list(a))
    list(b)
    turn2 = prompt + out + [9, 9, 9]
    want, _ = _run(off, turn2)
    got, usage = _run(on, turn2, cache_salt="end")
    assert usage.cached_tokens == 32 and got == want
