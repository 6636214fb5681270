"""Host-side KV page allocation (one allocator per data shard)."""

from __future__ import annotations

import heapq


class OutOfPagesError(RuntimeError):
    pass


class PageAllocator:
    """Free page ids 0..num_pages-1 of one data shard.

    Pages are handed out lowest id first, and a growing sequence gets the page right after
    its last one when that is free. A sequence's pages then lie mostly in ascending runs,
    whatever order earlier sequences released theirs in: the CPU attention kernel streams
    such runs ~1.4x faster than scattered pages (the hardware prefetchers follow them).
    """

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError("the KV cache needs at least one page")
        self.num_pages = num_pages
        self._free = set(range(num_pages))
        # A min-heap over the free ids; ids taken out of order (after a hint) stay in it
        # until popped, and are skipped then.
        self._heap = list(range(num_pages))
        self._used: set[int] = set()

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, count: int, after: int | None = None) -> list[int]:
        """`count` pages: first after+1, after+2, ... while those are free, then the
        lowest free ids."""
        if count > len(self._free):
            raise OutOfPagesError(f"asked for {count} pages, {len(self._free)} free")
        pages = []
        nxt = None if after is None else after + 1
        while len(pages) < count and nxt in self._free:
            pages.append(nxt)
            self._free.remove(nxt)
            nxt += 1
        while len(pages) < count:
            page = heapq.heappop(self._heap)
            if page in self._free:
                pages.append(page)
                self._free.remove(page)
        self._used.update(pages)
        return pages

    def release(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._used:
                raise RuntimeError(f"page {p} released twice or never allocated")
            self._used.remove(p)
            self._free.add(p)
            heapq.heappush(self._heap, p)
        if len(self._heap) > 2 * self.num_pages:  # drop the skipped ids
            self._heap = sorted(self._free)

    def check_all_free(self) -> None:
        if self._used or len(self._free) != self.num_pages:
            raise AssertionError(f"{len(self._used)} pages still in use: {sorted(self._used)[:10]}")
