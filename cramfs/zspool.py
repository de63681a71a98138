"""A bounded arena with a zsmalloc-style size-class allocator.

Why not a dict of bytes: Python object overhead (~100 B a page) would hide the real usage the
emulator exists to show. Here the pool is one anonymous mmap of exactly the real capacity, cut
into 4 KiB frames. Each size class (16-byte steps) owns blocks of 1..8 frames, chosen per class
to waste the least tail space; objects may straddle two frames of a block (frames need not be
contiguous, as in zsmalloc's zspages). The arena is a memfd mapped shared, and freed frames
are returned to the kernel by punching a hole in it, so the daemon's memory follows
``used_bytes`` even when the daemon has mlockall'ed itself (MADV_DONTNEED refuses locked
pages; truncating the backing file does not). Compaction moves objects from the
emptiest blocks of a class into the fullest and frees whole blocks (zram's pages_compacted).
"""

from __future__ import annotations

import mmap
import os
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from cramfs import PAGE_SHIFT, PAGE_SIZE
from cramfs.sparse import allocated_bytes, punch_hole

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Protocol

    from cramfs.codec import Payload

FRAME = PAGE_SIZE
CLASS_STEP = 16
MIN_OBJECT = 32
MAX_FRAMES_PER_BLOCK = 8
SLOT_BITS = 16
SLOT_MASK = (1 << SLOT_BITS) - 1
FREE_SLOT = 0xFFFFFFFF


def _frames_for(size: int) -> int:
    """Frames per block that waste the least tail space for objects of ``size`` bytes."""
    best, best_waste = 1, 1.0
    for frames in range(1, MAX_FRAMES_PER_BLOCK + 1):
        waste = (frames * FRAME % size) / (frames * FRAME)
        if waste < best_waste - 1e-9:
            best, best_waste = frames, waste
    return best


class SizeClass:
    __slots__ = ("index", "size", "frames_per_block", "slots_per_block", "partial",
                 "free_slots", "used_slots")

    def __init__(self, index: int, size: int) -> None:
        self.index = index
        self.size = size
        self.frames_per_block = _frames_for(size)
        self.slots_per_block = self.frames_per_block * FRAME // size
        self.partial: dict[int, None] = {}  # block ids with a free slot (an ordered set)
        self.free_slots = 0
        self.used_slots = 0


class Block:
    __slots__ = ("cls", "frames", "owners", "free", "used")

    def __init__(self, cls: SizeClass, frames: list[int]) -> None:
        self.cls = cls
        self.frames = frames
        self.owners = array("I", [FREE_SLOT]) * cls.slots_per_block
        self.free = list(range(cls.slots_per_block - 1, -1, -1))
        self.used = 0


if TYPE_CHECKING:
    class BlockTable(Protocol):
        """``ZsPool._blocks`` as it is used: a list indexed by block id, None where an id is
        free. Indexing gives a Block: every handle the pool's callers hold (the page table,
        a pending write, a parked release) names a live block, and only the scans over the
        whole table (iteration) meet the free ids."""

        def __getitem__(self, block_id: int, /) -> Block: ...
        def __setitem__(self, block_id: int, block: Block | None, /) -> None: ...
        def __iter__(self) -> Iterator[Block | None]: ...
        def __len__(self) -> int: ...
        def append(self, block: Block, /) -> None: ...


class PoolExhausted(Exception):
    """No free slot and no free frame for a new block."""


def make_handle(block_id: int, slot: int) -> int:
    """The opaque handle of ``slot`` in block ``block_id`` (the one place it is spelled)."""
    return (block_id << SLOT_BITS) | slot


def split_handle(handle: int) -> tuple[int, int]:
    """(block id, slot) of a handle: make_handle's inverse."""
    return handle >> SLOT_BITS, handle & SLOT_MASK


class ZsPool:
    """Fixed-capacity arena. Handles are opaque ints (make_handle / split_handle).

    As zsmalloc keeps zs_free and compaction apart, ``free`` never moves objects: it notes the
    classes whose slack has grown, and the owner compacts them with ``compact_pending`` once it
    is between requests, when a move (reported through ``on_move``) cannot land in the middle of
    its own commit or undo.
    """

    def __init__(self, capacity: int, compact_threshold: float = 0.05,
                 largest_compressed: int = PAGE_SIZE) -> None:
        if capacity < FRAME:
            raise ValueError(f"pool capacity must be at least {FRAME} bytes, got {capacity}")
        self.capacity = capacity - capacity % FRAME
        self.total_frames = self.capacity >> PAGE_SHIFT
        self._fd = os.memfd_create("cramfs-pool", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self.capacity)
        self._arena = mmap.mmap(self._fd, self.capacity, mmap.MAP_SHARED)
        self.release_errors = 0
        self._view = memoryview(self._arena)
        self._free_frames: list[int] = []
        self._next_frame = 0
        self.used_frames = 0
        self.max_used_frames = 0
        self.pages_compacted = 0
        self.compact_threshold = compact_threshold
        self.slack: set[SizeClass] = set()  # classes free() found worth compacting
        # Classes up to the largest compressed object, then one class for raw (huge) pages.
        sizes = list(range(MIN_OBJECT, min(largest_compressed, PAGE_SIZE) + CLASS_STEP,
                           CLASS_STEP))
        sizes = [s for s in sizes if s < PAGE_SIZE] + [PAGE_SIZE]
        self.classes = [SizeClass(i, s) for i, s in enumerate(sizes)]
        self._blocks = cast("BlockTable", [])
        self._free_block_ids: list[int] = []
        # Called as on_move(owner, old_handle, new_handle) when compaction relocates an object.
        self.on_move: Callable[[int, int, int], None] = lambda owner, old, new: None

    # -- sizes --------------------------------------------------------------------------
    def class_of(self, length: int) -> SizeClass:
        if length <= MIN_OBJECT:
            return self.classes[0]
        index = (length - MIN_OBJECT + CLASS_STEP - 1) // CLASS_STEP
        if index >= len(self.classes) - 1:
            if length > PAGE_SIZE:
                raise ValueError(f"object of {length} bytes is larger than a page")
            index = len(self.classes) - 1
        return self.classes[index]

    def slot_size(self, handle: int) -> int:
        return self._block(handle).cls.size

    @property
    def used_bytes(self) -> int:
        return self.used_frames << PAGE_SHIFT

    @property
    def max_used_bytes(self) -> int:
        return self.max_used_frames << PAGE_SHIFT

    def reset_max(self) -> None:
        self.max_used_frames = self.used_frames

    # -- frames -------------------------------------------------------------------------
    def _take_frames(self, count: int) -> list[int] | None:
        if self.used_frames + count > self.total_frames:
            return None
        frames = []
        for _ in range(count):
            if self._free_frames:
                frames.append(self._free_frames.pop())
            else:
                frames.append(self._next_frame)
                self._next_frame += 1
        self.used_frames += count
        if self.used_frames > self.max_used_frames:
            self.max_used_frames = self.used_frames
        return frames

    def _give_frames(self, frames: list[int]) -> None:
        for frame in frames:
            try:
                punch_hole(self._fd, frame << PAGE_SHIFT, FRAME)
            except OSError:
                self.release_errors += 1  # the frame stays resident; the books are still right
        self._free_frames.extend(frames)
        self.used_frames -= len(frames)

    # -- blocks -------------------------------------------------------------------------
    def _block(self, handle: int) -> Block:
        block = self._blocks[split_handle(handle)[0]]
        assert block is not None, f"stale handle {handle:#x}"
        return block

    def _new_block(self, cls: SizeClass) -> int | None:
        frames = self._take_frames(cls.frames_per_block)
        if frames is None:
            return None
        block = Block(cls, frames)
        if self._free_block_ids:
            block_id = self._free_block_ids.pop()
            self._blocks[block_id] = block
        else:
            block_id = len(self._blocks)
            self._blocks.append(block)
        cls.partial[block_id] = None
        cls.free_slots += cls.slots_per_block
        return block_id

    def _drop_block(self, block_id: int, block: Block) -> None:
        cls = block.cls
        cls.partial.pop(block_id, None)
        cls.free_slots -= cls.slots_per_block
        self._blocks[block_id] = None
        self._free_block_ids.append(block_id)
        self._give_frames(block.frames)

    # -- objects ------------------------------------------------------------------------
    def alloc(self, length: int, owner: int) -> int:
        """Reserve a slot for ``length`` bytes owned by ``owner``; raise PoolExhausted."""
        return self.alloc_in(self.class_of(length), owner)

    def alloc_in(self, cls: SizeClass, owner: int) -> int:
        """Reserve a slot of class ``cls`` (from class_of) for ``owner``."""
        if cls.partial:
            block_id = next(iter(cls.partial))
        else:
            new_id = self._new_block(cls)
            if new_id is None:
                raise PoolExhausted(cls.size)
            block_id = new_id
        block = self._blocks[block_id]
        assert block is not None
        slot = block.free.pop()
        block.owners[slot] = owner
        block.used += 1
        cls.free_slots -= 1
        cls.used_slots += 1
        if not block.free:
            del cls.partial[block_id]
        return make_handle(block_id, slot)

    def free(self, handle: int) -> None:
        """Give the slot back; never compacts (see the class docstring)."""
        block_id, slot = split_handle(handle)
        block = self._blocks[block_id]
        assert block is not None and block.owners[slot] != FREE_SLOT, f"double free {handle:#x}"
        cls = block.cls
        block.owners[slot] = FREE_SLOT
        block.free.append(slot)
        block.used -= 1
        cls.free_slots += 1
        cls.used_slots -= 1
        if block.used == 0:
            self._drop_block(block_id, block)
            return
        if len(block.free) == 1:
            cls.partial[block_id] = None
        if cls.free_slots > cls.slots_per_block and cls.free_slots > self.compact_threshold * (
                cls.free_slots + cls.used_slots):
            self.slack.add(cls)

    def compact_pending(self) -> int:
        """Compact the classes free() noted (more than a block and ``compact_threshold`` of
        their slots free); returns frames freed. Call it between requests."""
        freed = 0
        while self.slack:
            freed += self.compact_class(self.slack.pop())
        return freed

    def growth(self, cls: SizeClass) -> int:
        """Bytes the pool grows by to place one more object of ``cls``: none while one of
        its blocks has a free slot, else a new block."""
        return 0 if cls.partial else cls.frames_per_block << PAGE_SHIFT

    def gather(self, handles: list[int], lengths: list[int]) -> bytearray:
        """The objects' bytes end to end, in one call (large reads gather their compressed
        frames this way: no Python call per object)."""
        into = bytearray()
        blocks, view, read = self._blocks, self._view, self.read
        for handle, length in zip(handles, lengths, strict=True):
            block_id, slot = split_handle(handle)
            block = blocks[block_id]
            slot_at = slot * block.cls.size
            within = slot_at & (FRAME - 1)
            base = (block.frames[slot_at >> PAGE_SHIFT] << PAGE_SHIFT) + within
            if within + length <= FRAME:
                into += view[base:base + length]
            else:
                into += read(handle, length)
        return into

    def _span(self, handle: int) -> tuple[Block, int, int]:
        block = self._block(handle)
        offset = split_handle(handle)[1] * block.cls.size
        return block, offset >> PAGE_SHIFT, offset & (FRAME - 1)

    def write(self, handle: int, data: Payload) -> None:
        """Copy ``data`` (bytes or any contiguous buffer) into the slot of ``handle``."""
        block, index, within = self._span(handle)
        length = len(data)
        if length > block.cls.size:
            raise ValueError(f"{length} bytes do not fit a {block.cls.size}-byte slot")
        base = block.frames[index] << PAGE_SHIFT
        first = FRAME - within
        if length <= first:
            self._view[base + within:base + within + length] = data
        else:
            data = memoryview(data)
            self._view[base + within:base + FRAME] = data[:first]
            nxt = block.frames[index + 1] << PAGE_SHIFT
            self._view[nxt:nxt + length - first] = data[first:]

    def store(self, cls: SizeClass, owner: int, data: Payload) -> int:
        """``alloc_in(cls, owner)`` then ``write`` of ``data``, in one call (the device's
        batch path); raises PoolExhausted like alloc_in."""
        handle = self.alloc_in(cls, owner)
        self.write(handle, data)
        return handle

    def read(self, handle: int, length: int) -> bytes:
        block, index, within = self._span(handle)
        base = block.frames[index] << PAGE_SHIFT
        first = FRAME - within
        if length <= first:
            return self._arena[base + within:base + within + length]
        nxt = block.frames[index + 1] << PAGE_SHIFT
        return self._arena[base + within:base + FRAME] + self._arena[nxt:nxt + length - first]

    def set_owner(self, handle: int, owner: int) -> None:
        self._block(handle).owners[split_handle(handle)[1]] = owner

    def owner(self, handle: int) -> int:
        return self._block(handle).owners[split_handle(handle)[1]]

    # -- compaction ---------------------------------------------------------------------
    def compact_class(self, cls: SizeClass) -> int:
        """Pack a class into as few blocks as possible; returns frames freed."""
        if len(cls.partial) < 2:
            return 0
        order = sorted(cls.partial, key=lambda b: self._blocks[b].used)
        src_i, dst_i = 0, len(order) - 1
        freed = 0
        size = cls.size
        while src_i < dst_i:
            src_id, dst_id = order[src_i], order[dst_i]
            src, dst = self._blocks[src_id], self._blocks[dst_id]
            assert src is not None and dst is not None
            for slot in range(cls.slots_per_block):
                if not dst.free:
                    break
                owner = src.owners[slot]
                if owner == FREE_SLOT:
                    continue
                old = make_handle(src_id, slot)
                data = self.read(old, size)
                new_slot = dst.free.pop()
                dst.owners[new_slot] = owner
                dst.used += 1
                new = make_handle(dst_id, new_slot)
                self.write(new, data)
                src.owners[slot] = FREE_SLOT
                src.free.append(slot)
                src.used -= 1
                self.on_move(owner, old, new)
            if not dst.free:
                cls.partial.pop(dst_id, None)
                dst_i -= 1
            if src.used == 0:
                freed += len(src.frames)
                self._drop_block(src_id, src)
                src_i += 1
        self.pages_compacted += freed
        return freed

    def compact(self) -> int:
        """Compact every class (zram's ``compact`` attribute); returns frames freed."""
        self.slack.clear()
        return sum(self.compact_class(cls) for cls in self.classes)

    # -- checks -------------------------------------------------------------------------
    def live_objects(self) -> dict[int, int]:
        """handle -> owner for every allocated slot; for tests and recounts, not hot paths."""
        live = {}
        for block_id, block in enumerate(self._blocks):
            if block is None:
                continue
            for slot, owner in enumerate(block.owners):
                if owner != FREE_SLOT:
                    live[make_handle(block_id, slot)] = owner
        return live

    def check(self) -> None:
        """Assert the allocator's books agree with its blocks."""
        frames = 0
        for cls in self.classes:
            used = free = 0
            for block_id, block in enumerate(self._blocks):
                if block is None or block.cls is not cls:
                    continue
                frames += len(block.frames)
                assert block.used == sum(1 for o in block.owners if o != FREE_SLOT)
                assert len(block.free) == cls.slots_per_block - block.used
                assert (block_id in cls.partial) == bool(block.free)
                used += block.used
                free += len(block.free)
            assert (used, free) == (cls.used_slots, cls.free_slots), cls.size
        assert frames == self.used_frames <= self.total_frames

    def resident_bytes(self) -> int:
        """Bytes of the arena the kernel really holds (fstat of the memfd)."""
        return allocated_bytes(self._fd)

    def close(self) -> None:
        self._view.release()
        self._arena.close()
        os.close(self._fd)
