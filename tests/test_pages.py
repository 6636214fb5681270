"""The host-side page allocator: lowest ids first, runs after a sequence's last page."""

import pytest

from meshserve.engine.pages import OutOfPagesError, PageAllocator


def test_lowest_free_ids_first_whatever_the_release_order():
    alloc = PageAllocator(16)
    a, b = alloc.allocate(4), alloc.allocate(4)
    assert (a, b) == ([0, 1, 2, 3], [4, 5, 6, 7])
    alloc.release(list(reversed(a)))  # released backwards: still handed out ascending
    assert alloc.allocate(3) == [0, 1, 2]
    assert alloc.free == 16 - 7


def test_a_growing_sequence_continues_its_run():
    alloc = PageAllocator(32)
    seq = alloc.allocate(2)  # 0, 1
    other = alloc.allocate(2)  # 2, 3
    alloc.release(other)
    seq += alloc.allocate(3, after=seq[-1])
    assert seq == [0, 1, 2, 3, 4]
    blocker = alloc.allocate(1)  # 5
    # The page after the run is taken: the rest come from the lowest free ids.
    assert alloc.allocate(2, after=seq[-1]) == [6, 7]
    alloc.release(blocker)
    assert alloc.allocate(1) == [5]


def test_hint_past_the_end_and_skipped_heap_entries():
    alloc = PageAllocator(4)
    assert alloc.allocate(2, after=3) == [0, 1]  # no page 4: lowest free instead
    assert alloc.allocate(1, after=1) == [2]  # taken out of order; 2 stays in the heap
    assert alloc.allocate(1) == [3]  # the stale heap entry for 2 is skipped
    with pytest.raises(OutOfPagesError):
        alloc.allocate(1)
    alloc.release([0, 1, 2, 3])
    alloc.check_all_free()


def test_many_cycles_keep_the_heap_bounded_and_every_page_unique():
    alloc = PageAllocator(8)
    for i in range(200):
        pages = alloc.allocate(3, after=i % 8)
        assert len(set(pages)) == 3
        alloc.release(pages)
        assert len(alloc._heap) <= 2 * alloc.num_pages
    alloc.check_all_free()


def test_double_release_is_refused():
    alloc = PageAllocator(4)
    pages = alloc.allocate(2)
    alloc.release(pages)
    with pytest.raises(RuntimeError, match="released twice"):
        alloc.release(pages[:1])
