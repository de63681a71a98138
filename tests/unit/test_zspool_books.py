"""cramfs.zspool: the class layout, the books kept in flat arrays, handles across
compaction, and the frame accounting."""

import os
import random
import sys
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cramfs import PAGE_SIZE
from cramfs.zspool import (
    CLASS_STEP,
    FRAME,
    MAX_FRAMES_PER_BLOCK,
    MERGE_TOLERANCE,
    MIN_OBJECT,
    PoolExhausted,
    ZsPool,
    _frames_for,
    class_layout,
    split_handle,
)

from .test_zspool import Tracked


def per_object(size: int, frames: int) -> float:
    return frames * FRAME / (frames * FRAME // size)


@pytest.mark.parametrize("largest", [PAGE_SIZE, 3264, 1000])
def test_layout_merges_only_what_costs_little(largest):
    layout = class_layout(largest)
    sizes = [size for size, _ in layout]
    assert sizes == sorted(set(sizes)) and sizes[-1] == PAGE_SIZE and sizes[0] == MIN_OBJECT
    assert all(size % CLASS_STEP == 0 for size in sizes)
    assert all(1 <= frames <= MAX_FRAMES_PER_BLOCK for _, frames in layout)
    kept = dict(layout)
    # Every 16-byte size up to the largest object either is a class or goes to the next larger
    # class, which holds it for at most MERGE_TOLERANCE more pool per object.
    for size in range(MIN_OBJECT, min(largest, PAGE_SIZE - 1) + 1, CLASS_STEP):
        upper = next(s for s in sizes if s >= size)
        if size not in kept:
            assert upper < PAGE_SIZE
            assert per_object(upper, kept[upper]) <= per_object(size, _frames_for(size)) * (
                1 + MERGE_TOLERANCE) + 1e-9
    # zsmalloc's merge: no two neighbours below the page class share a shape.
    shapes = [(frames, frames * FRAME // size) for size, frames in layout[:-1]]
    assert all(a != b for a, b in zip(shapes, shapes[1:], strict=False))


def test_class_of_is_the_smallest_class_that_fits():
    pool = ZsPool(4 * FRAME, largest_compressed=3264)
    sizes = [cls.size for cls in pool.classes]
    assert [cls.index for cls in pool.classes] == list(range(len(sizes)))
    for length in range(PAGE_SIZE + 1):
        cls = pool.class_of(length)
        assert cls.size == min(s for s in sizes if s >= max(length, 1)), length
    assert pool.class_of(3265).size == PAGE_SIZE
    pool.close()


def test_fewer_classes_pack_a_sparse_mix_tighter():
    """One object in each of many sizes: the page-per-class tail is what merging saves."""
    pool = ZsPool(1024 * FRAME)
    rng = random.Random(3)
    lengths = [rng.randrange(400, 1200) for _ in range(300)]
    stored = sum(lengths)
    for owner, length in enumerate(lengths):
        pool.store(pool.class_of(length), owner, os.urandom(length))
    unmerged = sum(-(-sum(1 for n in lengths if -(-n // 16) * 16 == size)
                     // (_frames_for(size) * FRAME // size)) * _frames_for(size)
                   for size in range(400, 1216, 16))
    assert pool.used_frames * 5 <= unmerged * 4  # measured: 132 frames against 190
    assert stored <= pool.used_bytes
    pool.check()
    pool.close()


def test_block_books_are_arrays_not_objects():
    """Blocks opening and closing allocate no Python object each: the books are flat arrays
    (objects per block would pin the small-object allocator's arenas in a locked daemon)."""
    pool = ZsPool(4096 * FRAME)
    rng = random.Random(5)
    handles = array("Q")
    lengths = [rng.choice([100, 700, 1500, 3000]) for _ in range(8000)]
    data = {n: bytes(n) for n in set(lengths)}
    for owner, length in enumerate(lengths[:100]):  # every class's arrays exist
        handles.append(pool.store(pool.class_of(length), owner, data[length]))
    before = sys.getallocatedblocks()
    for owner, length in enumerate(lengths[100:], 100):
        handles.append(pool.store(pool.class_of(length), owner, data[length]))
    blocks = len(pool._blocks)
    for i in range(0, len(handles), 3):
        pool.free(handles[i])
    pool.compact()
    grown = sys.getallocatedblocks() - before
    assert blocks > 500
    assert grown < 50, f"{grown} Python allocations for {blocks} blocks"
    pool.check()
    pool.close()


def test_handles_after_compaction():
    pool = ZsPool(512 * FRAME, compact_threshold=1.0)
    t = Tracked(pool)
    cls = pool.class_of(700)
    count = cls.slots_per_block * 12
    for owner in range(count):
        t.put(owner, os.urandom(cls.size))
    moved: list[tuple[int, int]] = []
    track = pool.on_move

    def record(owner: int, old: int, new: int) -> None:
        moved.append((old, new))
        track(owner, old, new)

    pool.on_move = record
    for owner in range(count):
        if owner % 5:
            t.drop(owner)
    blocks_before = {split_handle(h)[0] for h, _ in t.objects.values()}
    freed = pool.compact()
    assert freed and moved
    live = pool.live_objects()
    for old, new in moved:
        assert old not in live and new in live
    blocks_after = {split_handle(h)[0] for h, _ in t.objects.values()}
    assert len(blocks_after) == -(-len(t.objects) // cls.slots_per_block) < len(blocks_before)
    t.verify()
    # A handle of a block compaction dropped names nothing.
    gone = next(old for old, _ in moved if split_handle(old)[0] not in blocks_after)
    with pytest.raises((AssertionError, IndexError)):
        pool.free(gone)
    # The new handles are ordinary handles: rewritten, read, freed.
    for owner in list(t.objects):
        handle, _ = t.objects[owner]
        data = os.urandom(cls.size - 1)
        pool.write(handle, data)
        t.objects[owner] = (handle, data)
    t.verify()
    for owner in list(t.objects):
        t.drop(owner)
    assert pool.used_frames == 0 and not pool.live_objects()
    t.verify()
    pool.close()


def test_capacity_accounting_is_exact():
    """Frames are counted per block, exactly: a pool of 12 frames holds two 6-frame blocks,
    not a frame more, and every frame given back is reused."""
    pool = ZsPool(12 * FRAME)
    six = next(cls for cls in pool.classes if cls.frames_per_block == MAX_FRAMES_PER_BLOCK)
    one = next(cls for cls in pool.classes if cls.frames_per_block == 1 and cls.size < PAGE_SIZE)
    handles = [pool.alloc_in(six, n) for n in range(2 * six.slots_per_block)]
    assert pool.used_frames == 12 == pool.total_frames
    assert pool.growth(six) == 6 * FRAME and pool.growth(one) == FRAME
    with pytest.raises(PoolExhausted):
        pool.alloc_in(six, 0)
    with pytest.raises(PoolExhausted):
        pool.alloc_in(one, 0)
    assert pool.used_frames == 12 and pool.max_used_frames == 12
    for handle in handles[:six.slots_per_block]:
        pool.free(handle)
    assert pool.used_frames == 6
    for n in range(6 * one.slots_per_block):
        pool.alloc_in(one, n)
    assert pool.used_frames == 12
    with pytest.raises(PoolExhausted):
        pool.alloc_in(one, 99)
    pool.check()
    pool.close()


def test_store_refuses_an_object_larger_than_its_class_before_allocating():
    pool = ZsPool(8 * FRAME)
    cls = pool.class_of(100)
    with pytest.raises(ValueError):
        pool.store(cls, 1, bytes(cls.size + 1))
    assert pool.used_frames == 0 and cls.used_slots == 0
    pool.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "drop", "pending", "compact"]),
                          st.integers(0, PAGE_SIZE), st.integers(0, 10**6)),
                min_size=1, max_size=300))
def test_random_operations_keep_the_books(ops):
    pool = ZsPool(40 * FRAME)
    t = Tracked(pool)
    owner = 0
    for op, length, pick in ops:
        if op == "put":
            try:
                t.put(owner, os.urandom(length))
            except PoolExhausted:
                assert pool.used_frames + pool.class_of(length).frames_per_block > 40
            owner += 1
        elif op == "drop" and t.objects:
            t.drop(sorted(t.objects)[pick % len(t.objects)])
        elif op == "pending":
            pool.compact_pending()
        elif op == "compact":
            pool.compact()
            for cls in pool.classes:
                assert len(cls.partial) <= 1
        assert pool.used_frames <= pool.total_frames
    t.verify()
    for key in list(t.objects):
        t.drop(key)
    assert pool.used_frames == 0
    t.verify()
    pool.close()


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_books_are_sized_by_capacity_but_cost_only_what_is_used():
    """The books of a 1 GiB pool are mapped for the most it could hold, and only touched
    pages are resident: a new pool costs well under a megabyte, and one that held 20,000
    objects a few hundred kilobytes more."""
    before = resident()
    pool = ZsPool(1 << 30, largest_compressed=3264)
    assert len(pool._books._mapping) > 1 << 30  # owners and free lists for every slot
    created = resident() - before
    assert created < 2 << 20, created  # measured 12 KiB
    rng = random.Random(9)
    handles = array("Q")
    lengths = [rng.randrange(200, 3000) for _ in range(20_000)]
    data = bytes(3000)
    for owner, length in enumerate(lengths):
        handles.append(pool.store(pool.class_of(length), owner, data[:length]))
    arena = pool.resident_bytes()
    books = resident() - before - created - arena
    assert books < 4 << 20, books  # measured 1.3 MB: a page per class array, ~30 B an object
    pool.close()
