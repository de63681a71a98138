"""A bounded arena with a zsmalloc-style size-class allocator.

Why not a dict of bytes: Python object overhead (~100 B a page) would hide the real usage the
emulator exists to show. Here the pool is one anonymous mmap of exactly the real capacity, cut
into 4 KiB frames. Size classes step by 16 bytes; each owns blocks of 1..6 frames, chosen per
class to waste the least tail space; objects may straddle two frames of a block (frames need
not be contiguous, as in zsmalloc's zspages). Neighbouring classes are merged, as zsmalloc
merges classes with the same pages and objects per zspage, here also when the larger class
costs at most 2 % more pool per object: each class's last block is on average half empty,
and on 64 MiB of a real program's heap fewer classes save more of that than the coarser
rounding costs (tests/bench/pool_bench.py: efficiency 0.881 -> 0.940). Blocks stop at 6
frames rather than 8 for the same reason: replaying those objects offline, 8 wins back tail
waste only once the pool holds a GiB or more (0.976 against 0.973 at 16x the objects).

The allocator's own books are flat arrays indexed by block id and, per class, by slot: no
Python object per block or per object. A daemon that mlockall()s itself keeps whatever its
heap once held, and small per-block objects, coming and going with the traffic, pin
pymalloc's arenas (tests/bench/rss_bench.py).

The arena is a memfd mapped shared, and freed frames are returned to the kernel by punching
a hole in it, so the daemon's memory follows ``used_bytes`` even when the daemon has
mlockall'ed itself (MADV_DONTNEED refuses locked pages; truncating the backing file does not).
Compaction moves objects from the emptiest blocks of a class into the fullest and frees whole
blocks (zram's pages_compacted).
"""

from __future__ import annotations

import mmap
import os
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from cramfs import PAGE_SHIFT, PAGE_SIZE
from cramfs.errors import PoolUnavailable
from cramfs.sparse import allocated_bytes, punch_hole

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cramfs.codec import Payload

FRAME = PAGE_SIZE
CLASS_STEP = 16
MIN_OBJECT = 32
MAX_FRAMES_PER_BLOCK = 6
MERGE_TOLERANCE = 0.02  # a class joins the next larger one if that costs <= 2 % more per object
SLOT_BITS = 16
SLOT_MASK = (1 << SLOT_BITS) - 1
FREE_SLOT = 0xFFFFFFFF  # owner of a free slot
NO_BLOCK = 0xFFFFFFFF  # end of a list of blocks (or of spare slot books)
NO_FRAME = 0xFFFFFFFF  # end of the list of given-back frames
NO_SLOT = 0xFFFF  # end of a block's list of free slots
DEAD = 0xFFFF  # class of a block id not in use


def _frames_for(size: int) -> int:
    """Frames per block that waste the least tail space for objects of ``size`` bytes."""
    best, best_waste = 1, 1.0
    for frames in range(1, MAX_FRAMES_PER_BLOCK + 1):
        waste = (frames * FRAME % size) / (frames * FRAME)
        if waste < best_waste - 1e-9:
            best, best_waste = frames, waste
    return best


def class_layout(largest_compressed: int = PAGE_SIZE) -> list[tuple[int, int]]:
    """(slot size, frames per block) of every class, smallest first.

    Sizes step by CLASS_STEP up to the largest compressed object, then one class for raw
    (huge) pages. Going down from the top, a size is dropped (its objects go to the next
    larger class) when that class's pool bytes per object are at most MERGE_TOLERANCE more
    than its own would be: with zero tolerance this is zsmalloc's merge of classes with the
    same pages and objects per zspage, which costs no memory at all.
    """
    sizes = range(MIN_OBJECT, min(largest_compressed, PAGE_SIZE) + CLASS_STEP, CLASS_STEP)
    layout = [(PAGE_SIZE, 1)]
    for size in reversed([s for s in sizes if s < PAGE_SIZE]):
        frames = _frames_for(size)
        per_object = frames * FRAME / (frames * FRAME // size)
        upper_size, upper_frames = layout[-1]
        upper = upper_frames * FRAME / (upper_frames * FRAME // upper_size)
        if upper_size < PAGE_SIZE and upper <= per_object * (1 + MERGE_TOLERANCE):
            continue
        layout.append((size, frames))
    return layout[::-1]


IntCode = Literal["H", "I"]  # the array typecodes of the books: 16- and 32-bit unsigned
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python 3.11 lacks it


class LazyArrays:
    """Zeroed typed arrays laid out in one anonymous mapping, sized for the most the pool can
    ever need. The kernel supplies a page when it is first touched, so only what is in use
    costs memory (locked as it is touched, under mlockall's MCL_ONFAULT), and none of it sits
    in the malloc heap, where an array reallocated as it grows ends up near the top and keeps
    the heap from shrinking after a burst of traffic."""

    def __init__(self) -> None:
        self._specs: list[tuple[IntCode, int]] = []
        self._views: list[memoryview[int]] = []
        self._mapping: mmap.mmap | None = None

    def want(self, typecode: IntCode, count: int) -> int:
        """Ask for an array; returns its number for ``view`` once ``map`` has run."""
        self._specs.append((typecode, count))
        return len(self._specs) - 1

    def map(self) -> list[memoryview[int]]:
        offsets, total = [], 0
        for typecode, count in self._specs:
            offsets.append(total)
            total += -(-count * array(typecode).itemsize // 8) * 8
        self._mapping = mmap.mmap(-1, max(total, mmap.PAGESIZE),
                                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        whole = memoryview(self._mapping)
        self._views = [whole[at:at + count * array(typecode).itemsize].cast(typecode)
                       for at, (typecode, count) in zip(offsets, self._specs, strict=True)]
        whole.release()
        return self._views

    def close(self) -> None:
        for view in self._views:
            view.release()
        if self._mapping is not None:
            self._mapping.close()


class SizeClass:
    """One size class: its shape, its counts, and the per-slot books of all its blocks.

    A block of this class has a *base*: the offset of its slots in ``owners`` and
    ``next_free`` (base = n * slots_per_block for the n-th block the class has made). A
    dropped block's base is kept for reuse on a chain through ``owners[base]``, headed by
    ``spare_base``. Blocks with a free slot form a doubly linked list through the pool's block
    arrays, headed by ``head``.
    """

    __slots__ = ("index", "size", "frames_per_block", "slots_per_block", "free_slots",
                 "used_slots", "head", "owners", "next_free", "made", "spare_base",
                 "_block_next", "_owners_at", "_next_free_at", "_fresh_owners", "_fresh_free")

    def __init__(self, index: int, size: int, frames_per_block: int, total_frames: int,
                 books: LazyArrays) -> None:
        self.index = index
        self.size = size
        self.frames_per_block = frames_per_block
        self.slots_per_block = slots = frames_per_block * FRAME // size
        self.free_slots = 0
        self.used_slots = 0
        self.head = NO_BLOCK  # first block with a free slot
        most = total_frames // frames_per_block * slots  # every frame in this class
        self._owners_at = books.want("I", most)  # owner of each slot, FREE_SLOT where free
        self._next_free_at = books.want("H", most)  # a free slot's successor in its block
        self.owners: memoryview[int]
        self.next_free: memoryview[int]
        self._block_next: memoryview[int]
        self.made = 0  # slots of books handed out so far
        self.spare_base = NO_BLOCK
        self._fresh_owners = array("I", [FREE_SLOT]) * slots
        self._fresh_free = array("H", range(1, slots + 1))
        self._fresh_free[-1] = NO_SLOT

    def attach(self, views: list[memoryview[int]], block_next: memoryview[int]) -> None:
        self.owners, self.next_free = views[self._owners_at], views[self._next_free_at]
        self._block_next = block_next

    @property
    def partial(self) -> list[int]:
        """Ids of this class's blocks that have a free slot, allocation order first."""
        out, block, after = [], self.head, self._block_next
        while block != NO_BLOCK:
            out.append(block)
            block = after[block]
        return out

    def take_base(self) -> int:
        """Slot books for a new block: a dropped block's, or fresh ones at the end."""
        slots = self.slots_per_block
        base = self.spare_base
        if base != NO_BLOCK:
            self.spare_base = self.owners[base]
        else:
            base = self.made
            self.made += slots
        self.owners[base:base + slots] = self._fresh_owners
        self.next_free[base:base + slots] = self._fresh_free
        return base

    def give_base(self, base: int) -> None:
        """Keep the books of a dropped (empty) block for the next block of this class."""
        self.owners[base] = self.spare_base
        self.spare_base = base

    def spare_bases(self) -> list[int]:
        out, base = [], self.spare_base
        while base != NO_BLOCK:
            out.append(base)
            base = self.owners[base]
        return out


class BlockTable:
    """Per-block metadata as flat arrays indexed by block id, and the ids in use.

    There are never more blocks than frames, so the arrays are sized by the pool's frame
    count; ids are handed out from 0 up, a dropped block's id first (a chain through ``next``
    headed by ``spare``), so only as many entries are touched as blocks were ever open at once.
    """

    __slots__ = ("cls", "used", "base", "free", "next", "prev", "frames", "count", "spare",
                 "_at")

    def __init__(self, total_frames: int, books: LazyArrays) -> None:
        shapes: list[tuple[IntCode, int]] = [("H", 1), ("H", 1), ("I", 1), ("H", 1), ("I", 1),
                                             ("I", 1), ("I", MAX_FRAMES_PER_BLOCK)]
        self._at = [books.want(code, total_frames * n) for code, n in shapes]
        self.cls: memoryview[int]  # class index, DEAD for an id not in use
        self.used: memoryview[int]  # slots in use
        self.base: memoryview[int]  # offset of its slots in the class's owners / next_free
        self.free: memoryview[int]  # first free slot, NO_SLOT when full
        self.next: memoryview[int]  # links of its class's list of partial blocks
        self.prev: memoryview[int]
        self.frames: memoryview[int]  # frame numbers, MAX_FRAMES_PER_BLOCK per id
        self.count = 0  # ids handed out so far
        self.spare = NO_BLOCK  # first dropped id

    def attach(self, views: list[memoryview[int]]) -> None:
        (self.cls, self.used, self.base, self.free, self.next, self.prev,
         self.frames) = (views[at] for at in self._at)

    def __len__(self) -> int:
        return self.count

    def take_id(self) -> int:
        block = self.spare
        if block != NO_BLOCK:
            self.spare = self.next[block]
            return block
        self.count += 1
        return self.count - 1

    def give_id(self, block: int) -> None:
        self.cls[block] = DEAD
        self.free[block] = NO_SLOT
        self.next[block] = self.spare
        self.spare = block

    def live(self) -> Iterator[int]:
        """Ids of the blocks in use, in id order."""
        cls = self.cls
        return (block for block in range(self.count) if cls[block] != DEAD)


class PoolExhausted(Exception):
    """No free slot and no free frame for a new block."""


def make_handle(block_id: int, slot: int) -> int:
    """The opaque handle of ``slot`` in block ``block_id`` (the one place it is spelled)."""
    return (block_id << SLOT_BITS) | slot


def split_handle(handle: int) -> tuple[int, int]:
    """(block id, slot) of a handle: make_handle's inverse."""
    return handle >> SLOT_BITS, handle & SLOT_MASK


def _map_arena(capacity: int) -> tuple[int, mmap.mmap]:
    """The pool's memory: a memfd of ``capacity`` bytes mapped shared. PoolUnavailable, with
    nothing left open, when the machine refuses it."""
    fd = os.memfd_create("cramfs-pool", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, capacity)
        return fd, mmap.mmap(fd, capacity, mmap.MAP_SHARED)
    except (OSError, OverflowError) as exc:
        os.close(fd)
        raise PoolUnavailable(capacity, exc) from None


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
        self._fd, self._arena = _map_arena(self.capacity)
        self.release_errors = 0
        self._view = memoryview(self._arena)
        self._next_frame = 0  # frames handed out so far
        self._spare_frame = NO_FRAME  # first given-back frame (a chain through _frame_next)
        self.used_frames = 0
        self.max_used_frames = 0
        self.pages_compacted = 0
        self.compact_threshold = compact_threshold
        self.slack: set[SizeClass] = set()  # classes free() found worth compacting
        self._books = books = LazyArrays()
        self._blocks = blocks = BlockTable(self.total_frames, books)
        self.classes = [SizeClass(i, size, frames, self.total_frames, books)
                        for i, (size, frames) in enumerate(class_layout(largest_compressed))]
        frame_next = books.want("I", self.total_frames)
        try:
            views = books.map()
        except (OSError, OverflowError) as exc:  # the books' mapping: 1.46x the capacity
            self._view.release()
            self._arena.close()
            os.close(self._fd)
            raise PoolUnavailable(self.capacity, exc) from None
        blocks.attach(views)
        for cls in self.classes:
            cls.attach(views, blocks.next)
        self._frame_next = views[frame_next]
        # The block arrays the per-object paths index, bound once.
        self._block_class, self._block_used, self._block_base = blocks.cls, blocks.used, blocks.base
        self._block_free, self._block_frames_at = blocks.free, blocks.frames
        self._sizes = [cls.size for cls in self.classes]  # slot size by class index
        # Class index for every object length 0..PAGE_SIZE: one lookup per object.
        index, lengths = array("H"), range(PAGE_SIZE + 1)
        for cls in self.classes:
            index.extend([cls.index] * (min(cls.size, PAGE_SIZE) + 1 - len(index)))
        assert len(index) == len(lengths)
        self._class_index = index
        # Called as on_move(owner, old_handle, new_handle) when compaction relocates an object.
        self.on_move: Callable[[int, int, int], None] = lambda owner, old, new: None

    # -- sizes --------------------------------------------------------------------------
    def class_of(self, length: int) -> SizeClass:
        """The class whose slots hold an object of ``length`` bytes (the smallest that fits)."""
        if length > PAGE_SIZE:
            raise ValueError(f"object of {length} bytes is larger than a page")
        return self.classes[self._class_index[max(length, 0)]]

    def slot_size(self, handle: int) -> int:
        return self._sizes[self._block_class[handle >> SLOT_BITS]]

    @property
    def used_bytes(self) -> int:
        return self.used_frames << PAGE_SHIFT

    @property
    def max_used_bytes(self) -> int:
        return self.max_used_frames << PAGE_SHIFT

    def reset_max(self) -> None:
        self.max_used_frames = self.used_frames

    # -- blocks -------------------------------------------------------------------------
    def _class_of_block(self, block: int) -> SizeClass:
        index = self._blocks.cls[block]
        assert index != DEAD, f"stale block {block}"
        return self.classes[index]

    def _link(self, cls: SizeClass, block: int) -> None:
        """Put ``block`` first on its class's list of partial blocks."""
        blocks = self._blocks
        head = cls.head
        blocks.next[block] = head
        blocks.prev[block] = NO_BLOCK
        if head != NO_BLOCK:
            blocks.prev[head] = block
        cls.head = block

    def _unlink(self, cls: SizeClass, block: int) -> None:
        blocks = self._blocks
        nxt, prev = blocks.next[block], blocks.prev[block]
        if prev == NO_BLOCK:
            cls.head = nxt
        else:
            blocks.next[prev] = nxt
        if nxt != NO_BLOCK:
            blocks.prev[nxt] = prev
        blocks.next[block] = blocks.prev[block] = NO_BLOCK

    def _new_block(self, cls: SizeClass) -> int:
        """Open a block for ``cls`` and put it first on its partial list; PoolExhausted
        when the frames are not there."""
        count = cls.frames_per_block
        if self.used_frames + count > self.total_frames:
            raise PoolExhausted(cls.size)
        blocks = self._blocks
        block = blocks.take_id()
        at, frames = block * MAX_FRAMES_PER_BLOCK, blocks.frames
        for i in range(count):
            frame = self._spare_frame
            if frame != NO_FRAME:
                self._spare_frame = self._frame_next[frame]
            else:
                frame = self._next_frame
                self._next_frame += 1
            frames[at + i] = frame
        self.used_frames += count
        if self.used_frames > self.max_used_frames:
            self.max_used_frames = self.used_frames
        blocks.cls[block] = cls.index
        blocks.used[block] = 0
        blocks.base[block] = cls.take_base()
        blocks.free[block] = 0
        cls.free_slots += cls.slots_per_block
        self._link(cls, block)
        return block

    def _drop_block(self, cls: SizeClass, block: int) -> None:
        """Give an empty block's frames back (punched out of the arena) and its id up."""
        blocks = self._blocks
        self._unlink(cls, block)
        cls.free_slots -= cls.slots_per_block
        cls.give_base(blocks.base[block])
        at = block * MAX_FRAMES_PER_BLOCK
        for frame in blocks.frames[at:at + cls.frames_per_block]:
            try:
                punch_hole(self._fd, frame << PAGE_SHIFT, FRAME)
            except OSError:
                self.release_errors += 1  # the frame stays resident; the books are still right
            self._frame_next[frame] = self._spare_frame
            self._spare_frame = frame
        self.used_frames -= cls.frames_per_block
        blocks.give_id(block)

    def _block_frames(self, block: int) -> list[int]:
        cls = self._class_of_block(block)
        at = block * MAX_FRAMES_PER_BLOCK
        return self._blocks.frames[at:at + cls.frames_per_block].tolist()

    # -- objects ------------------------------------------------------------------------
    def alloc(self, length: int, owner: int) -> int:
        """Reserve a slot for ``length`` bytes owned by ``owner``; raise PoolExhausted."""
        return self.alloc_in(self.class_of(length), owner)

    def alloc_in(self, cls: SizeClass, owner: int) -> int:
        """Reserve a slot of class ``cls`` (from class_of) for ``owner``."""
        block = cls.head
        if block == NO_BLOCK:
            block = self._new_block(cls)
        block_free = self._block_free
        slot = block_free[block]
        at = self._block_base[block] + slot
        nxt = cls.next_free[at]
        block_free[block] = nxt
        cls.owners[at] = owner
        self._block_used[block] += 1
        cls.free_slots -= 1
        cls.used_slots += 1
        if nxt == NO_SLOT:
            self._unlink(cls, block)
        return (block << SLOT_BITS) | slot

    def free(self, handle: int) -> None:
        """Give the slot back; never compacts (see the class docstring)."""
        block, slot = handle >> SLOT_BITS, handle & SLOT_MASK
        cls = self.classes[self._block_class[block]]  # IndexError: a block not in use
        at = self._block_base[block] + slot
        owners = cls.owners
        assert owners[at] != FREE_SLOT, f"double free {handle:#x}"
        owners[at] = FREE_SLOT
        block_free = self._block_free
        first = block_free[block]
        cls.next_free[at] = first
        block_free[block] = slot
        used = self._block_used[block] - 1
        self._block_used[block] = used
        cls.free_slots += 1
        cls.used_slots -= 1
        if first == NO_SLOT:  # it was full: it has a free slot now
            self._link(cls, block)
        if used == 0:
            self._drop_block(cls, block)
            return
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

    def certainly_fits(self, objects: int) -> bool:
        """Is the pool certain to hold ``objects`` new objects of any sizes: a frame each,
        plus a fresh block for every size class they may open? (A yes lets a caller place
        them without preparing an undo.)"""
        return (self.total_frames - self.used_frames
                >= objects + MAX_FRAMES_PER_BLOCK * min(objects, len(self.classes)))

    def growth(self, cls: SizeClass) -> int:
        """Bytes the pool grows by to place one more object of ``cls``: none while one of
        its blocks has a free slot, else a new block."""
        return 0 if cls.head != NO_BLOCK else cls.frames_per_block << PAGE_SHIFT

    def gather(self, handles: list[int], lengths: list[int]) -> bytearray:
        """The objects' bytes end to end, in one call (large reads gather their compressed
        frames this way: no Python call per object)."""
        into = bytearray()
        view, read, sizes = self._view, self.read, self._sizes
        block_class, frames = self._block_class, self._block_frames_at
        for handle, length in zip(handles, lengths, strict=True):
            block = handle >> SLOT_BITS
            slot_at = (handle & SLOT_MASK) * sizes[block_class[block]]
            within = slot_at & (FRAME - 1)
            base = (frames[block * MAX_FRAMES_PER_BLOCK + (slot_at >> PAGE_SHIFT)]
                    << PAGE_SHIFT) + within
            if within + length <= FRAME:
                into += view[base:base + length]
            else:
                into += read(handle, length)
        return into

    def write(self, handle: int, data: Payload) -> None:
        """Copy ``data`` (bytes or any contiguous buffer) into the slot of ``handle``."""
        block = handle >> SLOT_BITS
        size = self._sizes[self._block_class[block]]
        if len(data) > size:
            raise ValueError(f"{len(data)} bytes do not fit a {size}-byte slot")
        self._put(block, (handle & SLOT_MASK) * size, data)

    def _put(self, block: int, offset: int, data: Payload) -> None:
        """Copy ``data`` to ``offset`` in ``block`` (the one copy into the arena)."""
        frames, at = self._block_frames_at, block * MAX_FRAMES_PER_BLOCK + (offset >> PAGE_SHIFT)
        within = offset & (FRAME - 1)
        base = (frames[at] << PAGE_SHIFT) + within
        length = len(data)
        if within + length <= FRAME:
            self._view[base:base + length] = data
        else:
            first = FRAME - within
            data = memoryview(data)
            self._view[base:base + first] = data[:first]
            nxt = frames[at + 1] << PAGE_SHIFT
            self._view[nxt:nxt + length - first] = data[first:]

    def store(self, cls: SizeClass, owner: int, data: Payload) -> int:
        """``alloc_in(cls, owner)`` then ``write`` of ``data``, in one call (the device's
        batch path); raises PoolExhausted like alloc_in, and ValueError before allocating
        when ``data`` does not fit the class."""
        if len(data) > cls.size:
            raise ValueError(f"{len(data)} bytes do not fit a {cls.size}-byte slot")
        handle = self.alloc_in(cls, owner)
        self._put(handle >> SLOT_BITS, (handle & SLOT_MASK) * cls.size, data)
        return handle

    def read(self, handle: int, length: int) -> bytes:
        block = handle >> SLOT_BITS
        offset = (handle & SLOT_MASK) * self._sizes[self._block_class[block]]
        frames, at = self._block_frames_at, block * MAX_FRAMES_PER_BLOCK + (offset >> PAGE_SHIFT)
        within = offset & (FRAME - 1)
        base = frames[at] << PAGE_SHIFT
        first = FRAME - within
        if length <= first:
            return self._arena[base + within:base + within + length]
        nxt = frames[at + 1] << PAGE_SHIFT
        return self._arena[base + within:base + FRAME] + self._arena[nxt:nxt + length - first]

    def _owner_at(self, handle: int) -> tuple[SizeClass, int]:
        block = handle >> SLOT_BITS
        return self._class_of_block(block), self._block_base[block] + (handle & SLOT_MASK)

    def set_owner(self, handle: int, owner: int) -> None:
        cls, at = self._owner_at(handle)
        cls.owners[at] = owner

    def owner(self, handle: int) -> int:
        cls, at = self._owner_at(handle)
        return cls.owners[at]

    # -- compaction ---------------------------------------------------------------------
    def compact_class(self, cls: SizeClass) -> int:
        """Pack a class into as few blocks as possible; returns frames freed."""
        partial = cls.partial
        if len(partial) < 2:
            return 0
        blocks, owners, next_free = self._blocks, cls.owners, cls.next_free
        used, base, free = blocks.used, blocks.base, blocks.free
        order = sorted(partial, key=used.__getitem__)
        src_i, dst_i = 0, len(order) - 1
        freed, size, slots = 0, cls.size, cls.slots_per_block
        while src_i < dst_i:
            src, dst = order[src_i], order[dst_i]
            src_base, dst_base = base[src], base[dst]
            for slot in range(slots):
                new_slot = free[dst]
                if new_slot == NO_SLOT:
                    break
                owner = owners[src_base + slot]
                if owner == FREE_SLOT:
                    continue
                old = (src << SLOT_BITS) | slot
                data = self.read(old, size)
                free[dst] = next_free[dst_base + new_slot]
                owners[dst_base + new_slot] = owner
                used[dst] += 1
                new = (dst << SLOT_BITS) | new_slot
                self.write(new, data)
                owners[src_base + slot] = FREE_SLOT
                next_free[src_base + slot] = free[src]
                free[src] = slot
                used[src] -= 1
                self.on_move(owner, old, new)
            if free[dst] == NO_SLOT:
                self._unlink(cls, dst)
                dst_i -= 1
            if used[src] == 0:
                freed += cls.frames_per_block
                self._drop_block(cls, src)
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
        blocks = self._blocks
        for block in blocks.live():
            cls = self.classes[blocks.cls[block]]
            at = blocks.base[block]
            for slot, owner in enumerate(cls.owners[at:at + cls.slots_per_block]):
                if owner != FREE_SLOT:
                    live[make_handle(block, slot)] = owner
        return live

    def check(self) -> None:
        """Assert the allocator's books agree with its blocks: every count, every list, and
        every frame accounted for exactly once."""
        blocks = self._blocks
        frames_seen: list[int] = []
        counts = {cls.index: [0, 0] for cls in self.classes}
        bases: dict[int, list[int]] = {cls.index: [] for cls in self.classes}
        partial = {block for cls in self.classes for block in cls.partial}
        for block in blocks.live():
            cls = self.classes[blocks.cls[block]]
            slots, at = cls.slots_per_block, blocks.base[block]
            owners = cls.owners[at:at + slots]
            in_use = sum(1 for o in owners if o != FREE_SLOT)
            assert blocks.used[block] == in_use >= 1, block
            free: list[int] = []
            slot = blocks.free[block]
            while slot != NO_SLOT:
                assert owners[slot] == FREE_SLOT and len(free) < slots, (block, slot)
                free.append(slot)
                slot = cls.next_free[at + slot]
            assert sorted(free) == [s for s, o in enumerate(owners) if o == FREE_SLOT], block
            assert (block in partial) == bool(free), block
            counts[cls.index][0] += in_use
            counts[cls.index][1] += len(free)
            bases[cls.index].append(at)
            frames_seen.extend(self._block_frames(block))
        for cls in self.classes:
            assert counts[cls.index] == [cls.used_slots, cls.free_slots], cls.size
            listed = cls.partial
            assert len(set(listed)) == len(listed)
            assert all(blocks.cls[b] == cls.index for b in listed)
            known = sorted(bases[cls.index] + cls.spare_bases())
            assert known == list(range(0, cls.made, cls.slots_per_block)), cls.size
        assert len(set(frames_seen)) == len(frames_seen) == self.used_frames <= self.total_frames
        spare, frame = [], self._spare_frame
        while frame != NO_FRAME:
            spare.append(frame)
            frame = self._frame_next[frame]
        assert sorted(frames_seen + spare) == list(range(self._next_frame))
        assert self._next_frame <= self.total_frames

    def resident_bytes(self) -> int:
        """Bytes of the arena the kernel really holds (fstat of the memfd)."""
        return allocated_bytes(self._fd)

    def close(self) -> None:
        self._books.close()
        self._view.release()
        self._arena.close()
        os.close(self._fd)
