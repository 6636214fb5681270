"""What identifies a cached KV page, which pages a request may reuse, and the page-hash
events a router reads.

A full page is named by a hash chain: digest_i = H(digest_{i-1}, the page's token ids),
with digest_{-1} = H(version, cache salt, extra keys) — so the salt (and anything else
that changes the KV, such as a LoRA id later) enters the first page and, through the
chain, every page after it. Two requests share page i only if their first (i+1) pages of
tokens and their salts are equal. H is BLAKE2b over a canonical byte encoding: the same
on every process and host (Python's hash() is randomised per process).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import threading
from collections.abc import Sequence

from meshserve.engine.sampling_params import SamplingParams

DIGEST_BYTES = 32
_VERSION = b"meshserve.prefix.v1\x00"


def root_digest(salt: bytes = b"", extra: bytes = b"") -> bytes:
    """The chain's parent of page 0. Lengths are encoded, so ("ab", "") and ("a", "b")
    differ; no salt and an empty salt are the same thing (proto3 cannot tell them apart)."""
    h = hashlib.blake2b(_VERSION, digest_size=DIGEST_BYTES)
    for part in (salt, extra):
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.digest()


def extend_digests(digests: list[bytes], tokens: Sequence[int], page_size: int,
                   pages: int, root: bytes) -> list[bytes]:
    """Append to `digests` (the chain of tokens' first len(digests) pages) until it names
    `pages` full pages (at most as many as `tokens` fills); returns `digests`."""
    pages = min(pages, len(tokens) // page_size)
    for i in range(len(digests), pages):
        page = tokens[i * page_size : (i + 1) * page_size]
        h = hashlib.blake2b(digests[-1] if digests else root, digest_size=DIGEST_BYTES)
        h.update(struct.pack(f"<{page_size}i", *page))
        digests.append(h.digest())
    return digests


def page_digests(tokens: Sequence[int], page_size: int, salt: bytes = b"",
                 pages: int | None = None) -> list[bytes]:
    """Digests of the full pages of `tokens` (the first `pages` of them if given)."""
    n = len(tokens) // page_size if pages is None else pages
    return extend_digests([], tokens, page_size, n, root_digest(salt))


def reusable_tokens(prompt_len: int, num_tokens: int, params: SamplingParams) -> int:
    """How many leading tokens of a sequence (prompt + output so far) may come from cached
    pages instead of being computed.

    Never all of them: the last token must be fed to give the next token's logits. Nor
    tokens whose feeding builds the slot's on-device penalty statistics: every fed token
    marks `seen` (repetition penalty) and fed output tokens are counted (presence and
    frequency penalties), so a request with a repetition penalty reuses nothing and one
    with a presence or frequency penalty only prompt tokens (a preempted sequence
    recomputes its output)."""
    if params.repetition_penalty != 1.0:
        return 0
    limit = num_tokens - 1
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        limit = min(limit, prompt_len)
    return max(0, limit)


STORED, EVICTED = "stored", "evicted"


@dataclasses.dataclass(frozen=True)
class CacheEvents:
    """What `CacheEventLog.read` returns: events after the reader's cursor, the cursor to
    pass next time, and whether events were lost (the reader fell more than the log's
    capacity behind, or the log is not its own): then the reader must forget what it
    knows and start over from `events`."""

    events: tuple[tuple[str, bytes], ...]
    cursor: int
    lost: bool


class CacheEventLog:
    """Bounded log of page-hash events (STORED when a page joins the cache, EVICTED when it
    leaves) of one engine, for any number of readers, each with its own cursor.

    Written by the engine thread, read by routers on other threads. It keeps the last
    `capacity` events (up to twice that between trims): a reader further behind is told so
    (`lost`) instead of the log growing. A page cached in several data shards is stored
    (and evicted) once per shard.
    """

    def __init__(self, capacity: int = 1 << 16):
        if capacity < 1:
            raise ValueError("the event log needs room for at least one event")
        self.capacity = capacity
        self._events: list[tuple[str, bytes]] = []
        self._base = 0  # the position of _events[0] among all events ever appended
        self._lock = threading.Lock()

    def append(self, kind: str, digest: bytes) -> None:
        with self._lock:
            self._events.append((kind, digest))
            if len(self._events) > 2 * self.capacity:
                drop = len(self._events) - self.capacity
                del self._events[:drop]
                self._base += drop

    def read(self, cursor: int = 0) -> CacheEvents:
        with self._lock:
            end = self._base + len(self._events)
            lost = not self._base <= cursor <= end
            start = 0 if lost else cursor - self._base
            return CacheEvents(tuple(self._events[start:]), end, lost)
