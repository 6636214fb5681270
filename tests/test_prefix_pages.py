"""The prefix cache's bookkeeping: page hash chains, shared reference-counted pages, the
LRU of freed cached pages, and the bounded event log routers read."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshserve.engine.pages import OutOfPagesError, PageAllocator
from meshserve.engine.prefix_cache import (
    EVICTED,
    STORED,
    CacheEventLog,
    page_digests,
    reusable_tokens,
    root_digest,
)
from meshserve.engine.sampling_params import SamplingParams

TOKENS = list(range(3, 3 + 64))


def test_chain_names_a_page_by_everything_before_it_and_the_salt():
    a = page_digests(TOKENS, 16)
    assert len(a) == 4 and len(set(a)) == 4
    # Page 2 of a prompt that differs only in page 0 is another page.
    other = page_digests([99] + TOKENS[1:], 16)
    assert other[0] != a[0] and other[2] != a[2] and other[3] != a[3]
    # A shared head gives shared digests up to where the tokens part.
    fork = page_digests(TOKENS[:40] + [7] * 24, 16)
    assert fork[:2] == a[:2] and fork[2:] != a[2:]
    # The salt enters the first page, so every page after it differs too.
    salted = page_digests(TOKENS, 16, b"tenant-a")
    assert all(x != y for x, y in zip(salted, a, strict=True))
    assert page_digests(TOKENS, 16, b"tenant-a") == salted
    assert page_digests(TOKENS, 16, b"tenant-b") != salted
    # Lengths are encoded: no ambiguity between salt and extra keys.
    assert root_digest(b"ab", b"") != root_digest(b"a", b"b")
    # Only full pages are named.
    assert len(page_digests(TOKENS[:47], 16)) == 2


def test_digests_agree_across_processes():
    """Slices and hosts must agree on names: no per-process hash randomisation."""
    code = ("from meshserve.engine.prefix_cache import page_digests;"
            f"print(page_digests({TOKENS!r}, 16, b's')[-1].hex())")
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={"PYTHONHASHSEED": seed, "PATH": "",
                                           "PYTHONPATH": ":".join(sys.path)}).stdout.strip()
           for seed in ("1", "2")]
    assert out[0] == out[1] == page_digests(TOKENS, 16, b"s")[-1].hex()


def test_reusable_tokens_keeps_the_last_token_and_penalty_statistics():
    plain = SamplingParams()
    assert reusable_tokens(200, 200, plain) == 199
    assert reusable_tokens(200, 230, plain) == 229  # recomputing prompt + output
    assert reusable_tokens(200, 230, SamplingParams(presence_penalty=0.5)) == 200
    assert reusable_tokens(200, 230, SamplingParams(frequency_penalty=-0.5)) == 200
    assert reusable_tokens(200, 200, SamplingParams(repetition_penalty=1.1)) == 0
    assert reusable_tokens(1, 1, plain) == 0


def _allocator(num_pages=8):
    events = []
    alloc = PageAllocator(num_pages, caching=True, on_event=lambda k, d: events.append((k, d)))
    return alloc, events


def test_shared_pages_are_counted_and_freed_pages_stay_cached():
    alloc, events = _allocator()
    digests = page_digests(TOKENS, 16)
    a = alloc.allocate(4)
    for page, digest in zip(a[:3], digests, strict=False):
        assert alloc.register(page, digest)
    assert alloc.lookup(digests) == a[:3]  # the 4th page is not full: never registered
    assert [k for k, _ in events] == [STORED] * 3
    b = alloc.lookup(digests)
    alloc.acquire(b)
    assert [alloc.refs(p) for p in a] == [2, 2, 2, 1]
    alloc.release(a)
    assert [alloc.refs(p) for p in a] == [1, 1, 1, 0] and alloc.free == 8 - 3
    alloc.release(b)
    # Nobody holds them; they stay cached and count as free.
    assert alloc.free == 8 and alloc.cached == 3 and alloc.lookup(digests) == a[:3]
    alloc.check_all_free()
    # Taking them back costs free pages (they leave the LRU).
    hits = alloc.lookup(digests)
    assert alloc.unheld(hits) == 3
    alloc.acquire(hits)
    assert alloc.free == 5
    alloc.release(hits)


def test_allocation_takes_uncached_pages_first_then_evicts_chain_tails_first():
    alloc, events = _allocator(6)
    first = page_digests(TOKENS[:48], 16)  # 3 pages
    second = page_digests([5] * 32, 16)  # 2 pages
    a = alloc.allocate(3)
    for p, d in zip(a, first, strict=True):
        alloc.register(p, d)
    b = alloc.allocate(2)
    for p, d in zip(b, second, strict=True):
        alloc.register(p, d)
    alloc.release(a)  # released first: evicted first, its tail before its head
    alloc.release(b)
    assert alloc.free == 6 and alloc.cached == 5
    assert alloc.allocate(1) == [5]  # the never-cached page goes first
    events.clear()
    taken = alloc.allocate(2)
    assert taken == [a[2], a[1]]
    assert events == [(EVICTED, first[2]), (EVICTED, first[1])]
    assert alloc.lookup(first) == [a[0]]  # the head is still there
    assert alloc.lookup(second) == b
    with pytest.raises(OutOfPagesError):
        alloc.allocate(4)


def test_duplicates_and_unheld_pages_are_not_registered():
    alloc, events = _allocator()
    digest = page_digests(TOKENS, 16)[0]
    x, y = alloc.allocate(2)
    assert alloc.register(x, digest)
    assert not alloc.register(y, digest)  # computed twice at once: y stays private
    assert not alloc.register(x, page_digests(TOKENS, 16)[1])  # one digest per page
    alloc.release([x, y])
    assert alloc.cached == 1 and len(events) == 1
    with pytest.raises(RuntimeError, match="not held"):
        alloc.register(y, b"z" * 32)
    off = PageAllocator(4)  # caching off: nothing is ever cached
    p = off.allocate(1)
    assert not off.register(p[0], digest) and off.lookup([digest]) == []


def test_event_log_is_bounded_and_tells_a_reader_that_fell_behind():
    log = CacheEventLog(capacity=4)
    for i in range(3):
        log.append(STORED, bytes([i]))
    got = log.read(0)
    assert [d for _, d in got.events] == [b"\x00", b"\x01", b"\x02"] and not got.lost
    assert log.read(got.cursor).events == ()
    for i in range(3, 20):
        log.append(EVICTED, bytes([i]))
    behind = log.read(got.cursor)
    assert behind.lost and len(behind.events) <= 8 and behind.events[-1] == (EVICTED, b"\x13")
    assert not log.read(behind.cursor).lost
    assert log.read(behind.cursor + 5).lost  # a cursor from another log
