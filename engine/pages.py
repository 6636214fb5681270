"""Host-side KV page allocation and the prefix cache (one allocator per data shard)."""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable

from meshserve.engine.prefix_cache import EVICTED, STORED


class OutOfPagesError(RuntimeError):
    pass


class PageAllocator:
    """Page ids 0..num_pages-1 of one data shard, reference-counted, with a prefix cache.

    Pages are handed out lowest id first, and a growing sequence gets the page right after
    its last one when that is free. A sequence's pages then lie mostly in ascending runs,
    whatever order earlier sequences released theirs in: the CPU attention kernel streams
    such runs ~1.4x faster than scattered pages (the hardware prefetchers follow them).

    Prefix cache (`caching`): a full page whose K/V is computed may be `register`ed under
    its digest (engine/prefix_cache.py); `lookup` finds the longest chain of cached pages
    for a request and `acquire` shares them (read-only: a sequence writes only pages
    after its cached ones). A page nobody holds any more stays cached in an LRU, still
    counted as free: `allocate` takes never-cached pages first and then evicts the least
    recently released cached ones, the tails of chains before their heads.
    `on_event(kind, digest)` hears every page joining (STORED) or leaving (EVICTED).
    """

    def __init__(self, num_pages: int, caching: bool = False,
                 on_event: Callable[[str, bytes], None] | None = None):
        if num_pages < 1:
            raise ValueError("the KV cache needs at least one page")
        self.num_pages = num_pages
        self.caching = caching
        self._on_event = on_event
        self._free = set(range(num_pages))  # held by nobody, cached under no digest
        # A min-heap over the free ids; ids taken out of order (after a hint) stay in it
        # until popped, and are skipped then.
        self._heap = list(range(num_pages))
        self._refs: dict[int, int] = {}  # held pages: how many sequences hold each
        self._digest_of: dict[int, bytes] = {}  # cached pages (held or not)
        self._page_of: dict[bytes, int] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest first

    @property
    def free(self) -> int:
        """Pages an allocation may take: never cached, or cached and held by nobody."""
        return len(self._free) + len(self._lru)

    @property
    def cached(self) -> int:
        return len(self._page_of)

    def refs(self, page: int) -> int:
        return self._refs.get(page, 0)

    def allocate(self, count: int, after: int | None = None) -> list[int]:
        """`count` fresh pages: first after+1, after+2, ... while those are free, then the
        lowest free ids, then the least recently released cached pages (evicted)."""
        if count > self.free:
            raise OutOfPagesError(f"asked for {count} pages, {self.free} free")
        pages = []
        nxt = None if after is None else after + 1
        while len(pages) < count and nxt in self._free:
            pages.append(nxt)
            self._free.remove(nxt)
            nxt += 1
        while len(pages) < count and self._free:
            page = heapq.heappop(self._heap)
            if page in self._free:
                pages.append(page)
                self._free.remove(page)
        while len(pages) < count:
            page, _ = self._lru.popitem(last=False)
            self._uncache(page)
            pages.append(page)
        for p in pages:
            self._refs[p] = 1
        return pages

    def release(self, pages: list[int]) -> None:
        """Drop one hold on each page. A page nobody holds becomes free, or, if cached,
        joins the LRU; the last page of a chain joins first, so it is evicted first."""
        for p in reversed(pages):
            refs = self._refs.get(p, 0)
            if refs < 1:
                raise RuntimeError(f"page {p} released twice or never allocated")
            if refs > 1:
                self._refs[p] = refs - 1
                continue
            del self._refs[p]
            if p in self._digest_of:
                self._lru[p] = None
            else:
                self._free.add(p)
                heapq.heappush(self._heap, p)
        if len(self._heap) > 2 * self.num_pages:  # drop the skipped ids
            self._heap = sorted(self._free)

    # -- the prefix cache --------------------------------------------------------------
    def lookup(self, digests: list[bytes]) -> list[int]:
        """The cached pages of the longest leading run of `digests` (holds nothing)."""
        pages = []
        for digest in digests:
            page = self._page_of.get(digest)
            if page is None:
                break
            pages.append(page)
        return pages

    def unheld(self, pages: list[int]) -> int:
        """How many of these cached pages nobody holds (acquiring them uses free pages)."""
        return sum(1 for p in pages if p in self._lru)

    def acquire(self, pages: list[int]) -> None:
        """Hold cached pages (found by `lookup`) for one more sequence."""
        for p in pages:
            if p not in self._digest_of:
                raise RuntimeError(f"page {p} is not cached")
            if p in self._lru:
                del self._lru[p]
            self._refs[p] = self._refs.get(p, 0) + 1

    def register(self, page: int, digest: bytes) -> bool:
        """Cache a held, full page whose K/V is computed. False if the digest is cached
        already (another sequence computed the same page at the same time: this copy stays
        private and is freed with its sequence) or the page is."""
        if not self.caching or digest in self._page_of or page in self._digest_of:
            return False
        if page not in self._refs:
            raise RuntimeError(f"page {page} is not held")
        self._digest_of[page] = digest
        self._page_of[digest] = page
        if self._on_event is not None:
            self._on_event(STORED, digest)
        return True

    def _uncache(self, page: int) -> None:
        digest = self._digest_of.pop(page)
        del self._page_of[digest]
        if self._on_event is not None:
            self._on_event(EVICTED, digest)

    def check_all_free(self) -> None:
        """No page is held (cached pages nobody holds count as free)."""
        if self._refs or self.free != self.num_pages:
            held = sorted(self._refs)[:10]
            raise AssertionError(f"{len(self._refs)} pages still in use: {held}")
