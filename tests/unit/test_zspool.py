"""cramfs.zspool: the size-class allocator over a bounded arena."""

import os
import random

import pytest

from cramfs import PAGE_SIZE
from cramfs.zspool import (
    FRAME,
    MAX_FRAMES_PER_BLOCK,
    PoolExhausted,
    ZsPool,
    _frames_for,
    make_handle,
    split_handle,
)


class Tracked:
    """A pool plus the owner -> (handle, data) map the page table would keep."""

    def __init__(self, pool: ZsPool) -> None:
        self.pool = pool
        self.objects: dict[int, tuple[int, bytes]] = {}
        self.moves = 0
        pool.on_move = self._moved

    def _moved(self, owner: int, old: int, new: int) -> None:
        handle, data = self.objects[owner]
        assert handle == old
        self.objects[owner] = (new, data)
        self.moves += 1

    def put(self, owner: int, data: bytes) -> int:
        handle = self.pool.alloc(len(data), owner)
        self.pool.write(handle, data)
        self.objects[owner] = (handle, data)
        return handle

    def drop(self, owner: int) -> None:
        handle, _ = self.objects.pop(owner)
        self.pool.free(handle)

    def verify(self) -> None:
        self.pool.check()
        assert self.pool.live_objects() == {h: o for o, (h, _) in self.objects.items()}
        for owner, (handle, data) in self.objects.items():
            assert self.pool.owner(handle) == owner
            assert self.pool.read(handle, len(data)) == data, owner


@pytest.fixture
def pool():
    p = ZsPool(64 * FRAME)
    yield p
    p.close()


def test_capacity_rounds_down_to_frames():
    p = ZsPool(3 * FRAME + 100)
    assert p.capacity == 3 * FRAME and p.total_frames == 3
    p.close()


@pytest.mark.parametrize("bad", [0, 1, FRAME - 1])
def test_capacity_below_a_frame(bad):
    with pytest.raises(ValueError):
        ZsPool(bad)


def test_class_of(pool):
    assert pool.class_of(0).size == 32
    assert pool.class_of(1).size == 32
    assert pool.class_of(32).size == 32
    assert pool.class_of(33).size == 48
    assert pool.class_of(48).size == 48
    assert pool.class_of(4080).size == 4080
    assert pool.class_of(4081).size == PAGE_SIZE
    assert pool.class_of(PAGE_SIZE).size == PAGE_SIZE
    with pytest.raises(ValueError):
        pool.class_of(PAGE_SIZE + 1)
    for length in range(0, PAGE_SIZE + 1, 7):
        assert pool.class_of(length).size >= length


def test_largest_compressed_puts_everything_above_it_in_the_page_class():
    p = ZsPool(16 * FRAME, largest_compressed=3264)
    assert p.class_of(3264).size == 3264
    assert p.class_of(3265).size == PAGE_SIZE
    p.close()


def test_frames_per_block_within_limits(pool):
    for cls in pool.classes:
        assert 1 <= cls.frames_per_block <= MAX_FRAMES_PER_BLOCK
        assert cls.slots_per_block == cls.frames_per_block * FRAME // cls.size >= 1
    assert _frames_for(PAGE_SIZE) == 1
    assert _frames_for(48) == 3  # 3 frames hold exactly 256 objects of 48 bytes


def test_alloc_write_read_free(pool):
    t = Tracked(pool)
    handle = t.put(1, b"hello world")
    assert pool.used_bytes == pool.class_of(11).frames_per_block * FRAME
    assert pool.read(handle, 11) == b"hello world"
    assert pool.slot_size(handle) == 32
    t.verify()
    t.drop(1)
    assert pool.used_bytes == 0
    t.verify()


def test_write_larger_than_slot(pool):
    handle = pool.alloc(40, 1)
    with pytest.raises(ValueError):
        pool.write(handle, bytes(49))


@pytest.mark.parametrize("size", [48, 80, 112, 176, 208, 336, 1056, 2912, 3264])
def test_objects_straddling_frames(size):
    pool = ZsPool(64 * FRAME)
    t = Tracked(pool)
    cls = pool.class_of(size)
    assert cls.size == size and cls.frames_per_block > 1
    # Scatter the free frame list so the next block's frames are not contiguous.
    for owner in range(6):
        t.put(1000 + owner, os.urandom(PAGE_SIZE))
    for owner in (1000, 1002, 1004):
        t.drop(owner)
    straddles = 0
    for owner in range(cls.slots_per_block):
        handle = t.put(owner, os.urandom(size))
        offset = split_handle(handle)[1] * size
        straddles += offset // FRAME != (offset + size - 1) // FRAME
    assert straddles > 0
    frames = pool._block_frames(split_handle(handle)[0])
    assert len(frames) == cls.frames_per_block
    assert frames != sorted(frames) or frames[-1] - frames[0] != len(frames) - 1
    t.verify()
    # Shorter payloads in a straddling slot read back exactly too.
    for owner in list(t.objects)[:5]:
        handle, _ = t.objects[owner]
        data = os.urandom(size - 5)
        pool.write(handle, data)
        t.objects[owner] = (handle, data)
    t.verify()
    pool.close()


def test_slot_and_block_reuse(pool):
    t = Tracked(pool)
    first = t.put(1, b"a" * 100)
    second = t.put(2, b"b" * 100)
    frames = pool.used_frames
    t.drop(1)
    again = t.put(3, b"c" * 100)
    assert again == first  # the freed slot is reused
    assert pool.used_frames == frames
    t.drop(2)
    t.drop(3)
    assert pool.used_frames == 0
    # The block id and the frames are reused by the next block.
    assert t.put(4, b"d" * 100) >> 16 == second >> 16
    assert pool.used_frames == frames
    assert pool.max_used_bytes == frames * FRAME
    t.verify()


def test_capacity_never_exceeded_and_exhaustion():
    pool = ZsPool(8 * FRAME)
    t = Tracked(pool)
    rng = random.Random(1)
    failures = 0
    for owner in range(2000):
        size = rng.choice([20, 100, 500, 1500, 3000, PAGE_SIZE])
        try:
            t.put(owner, rng.randbytes(size))
        except PoolExhausted:
            failures += 1
            if t.objects and rng.random() < 0.5:
                t.drop(rng.choice(list(t.objects)))
        assert pool.used_bytes <= pool.capacity
        assert pool.used_frames <= pool.total_frames
        assert pool.max_used_bytes <= pool.capacity
    assert failures > 0
    t.verify()


def test_pool_exhausted_changes_nothing():
    pool = ZsPool(2 * FRAME)
    t = Tracked(pool)
    t.put(1, os.urandom(PAGE_SIZE))
    t.put(2, os.urandom(PAGE_SIZE))
    with pytest.raises(PoolExhausted):
        pool.alloc(PAGE_SIZE, 3)
    with pytest.raises(PoolExhausted):
        pool.alloc(100, 3)  # needs a new block, no frame left
    assert pool.used_frames == 2
    t.verify()


def test_compaction_frees_frames_and_preserves_data():
    pool = ZsPool(256 * FRAME, compact_threshold=1.0)  # no compaction on free
    t = Tracked(pool)
    size = 200
    cls = pool.class_of(size)
    count = cls.slots_per_block * 10
    for owner in range(count):
        t.put(owner, os.urandom(size))
    full = pool.used_frames
    assert full == 10 * cls.frames_per_block
    for owner in range(count):
        if owner % 4:
            t.drop(owner)
    assert pool.used_frames == full  # every block still holds something
    t.verify()
    freed = pool.compact()
    assert freed > 0
    assert pool.used_frames == full - freed
    assert pool.pages_compacted == freed
    live = len(t.objects)
    needed = -(-live // cls.slots_per_block) * cls.frames_per_block
    assert pool.used_frames == needed
    assert t.moves > 0
    t.verify()
    assert pool.compact() == 0  # already packed
    t.verify()


def test_free_never_moves_objects_compact_pending_does():
    """zs_free and compaction apart: free only notes slack; the owner compacts between
    requests, when a move cannot land inside its own commit or undo."""
    pool = ZsPool(256 * FRAME)  # default threshold
    t = Tracked(pool)
    rng = random.Random(7)
    for owner in range(600):
        t.put(owner, rng.randbytes(rng.choice([60, 300, 700])))
    for owner in rng.sample(range(600), 450):
        t.drop(owner)
        assert pool.used_bytes <= pool.capacity
    assert t.moves == 0 and pool.pages_compacted == 0  # free moved nothing
    assert pool.slack
    used = pool.used_frames
    freed = pool.compact_pending()
    assert freed > 0 and t.moves > 0 and pool.pages_compacted == freed
    assert pool.used_frames == used - freed and not pool.slack
    t.verify()
    for owner in list(t.objects):
        t.drop(owner)
    assert pool.used_frames == 0
    t.verify()


def test_handles_are_opaque_with_one_encoding():
    assert split_handle(make_handle(70000, 513)) == (70000, 513)
    pool = ZsPool(8 * FRAME)
    handle = pool.alloc(100, owner=3)
    block, slot = split_handle(handle)
    assert make_handle(block, slot) == handle and pool.owner(handle) == 3


def test_growth_says_when_a_store_opens_a_block():
    pool = ZsPool(64 * FRAME)
    cls = pool.class_of(1000)
    assert pool.growth(cls) == cls.frames_per_block * FRAME
    pool.alloc_in(cls, 1)
    assert pool.growth(cls) == 0


def test_reset_max(pool):
    t = Tracked(pool)
    for owner in range(4):
        t.put(owner, os.urandom(PAGE_SIZE))
    for owner in range(4):
        t.drop(owner)
    assert pool.max_used_bytes == 4 * FRAME and pool.used_bytes == 0
    pool.reset_max()
    assert pool.max_used_bytes == 0


@pytest.mark.parametrize("seed", range(5))
def test_certainly_fits_is_never_wrong(seed):
    """Whenever the pool says it is certain to hold N objects, N objects of any sizes fit
    (the device then places them without preparing an undo)."""
    rng = random.Random(seed)
    pool = ZsPool(256 * FRAME)
    try:
        owner = 0
        while True:
            n = rng.randint(1, 8)
            if not pool.certainly_fits(n):
                break
            for _ in range(n):
                length = rng.randint(1, PAGE_SIZE)
                pool.store(pool.class_of(length), owner, os.urandom(length))
                owner += 1
        assert owner > 0
        assert not pool.certainly_fits(pool.total_frames)
    finally:
        pool.close()
