"""Host-side KV page allocation (one allocator per data shard)."""

from __future__ import annotations


class OutOfPagesError(RuntimeError):
    pass


class PageAllocator:
    """A free list of page ids. Page 0..num_pages-1 all belong to one data shard."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError("the KV cache needs at least one page")
        self.num_pages = num_pages
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(num_pages - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPagesError(f"asked for {count} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(count)]
        self._used.update(pages)
        return pages

    def release(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._used:
                raise RuntimeError(f"page {p} released twice or never allocated")
            self._used.remove(p)
            self._free.append(p)

    def check_all_free(self) -> None:
        if self._used or len(self._free) != self.num_pages:
            raise AssertionError(f"{len(self._used)} pages still in use: {sorted(self._used)[:10]}")
