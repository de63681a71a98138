"""Per-device page table whose memory follows what is stored, not the advertised size.

A device advertises far more than it holds (that is the point of a capacity-lying node), so a
flat array per advertised page is the wrong shape: 10 B a page is 2.7 GB for 1 TiB before the
first write. The table is two-level instead: a directory (a dict) from chunk number to a
:class:`Chunk` of ``CHUNK_PAGES`` (512) consecutive pages, allocated on the first store into it and
given back (:meth:`PageTable.give_back`) once every page in it is empty again.

Per page in a chunk:
``meta`` (uint16): bits 0-12 the stored length (0..4096), bits 13-15 the page's state;
``loc`` (uint64): the pool handle (compressed, huge) or the repeated word (same-filled);
``ref`` (one byte, only on tables that track references, zswap's CLOCK): the referenced bit.

Cost, measured by ``metadata_bytes`` (tests/bench/sparse_bench.py reports it per stored page):
a full chunk is 10 B a page (11 B with reference bits) plus ~0.4 B of object and directory
overhead: 10.4 B a page (11.5 B on zswap). Swap allocates in clusters of 512 pages (the
kernel's SWAPFILE_CLUSTER) and writes large requests, so its pages arrive in runs that fill
chunks. The worst case is one stored page per chunk: ~5.2 KiB for that page (5.8 KiB on
zswap), a random 4 KiB write every 2 MiB. The directory costs nothing until a chunk exists:
its fixed cost (``fixed_bytes``) is the empty directory whatever the size.

Hot paths do not call a method per page: a request of up to ``CHUNK_PAGES`` pages spans at
most two chunks, so callers fetch a chunk's arrays once (``view`` to read, where an absent
chunk reads as the shared empty one; ``writable`` to store) and index them locally with
``index & self.chunk_mask``, switching chunks when that wraps to 0.

Poisoned pages are rare, so they live in a set (on the device) rather than a bit on every page.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator

EMPTY = 0  # never written, or released by a zero write: reads as zeros, costs nothing
SAME = 1  # one repeated 8-byte word (not zero): costs no pool space
COMPRESSED = 2  # zstd payload in the pool
HUGE = 3  # raw page in the pool: did not compress below the huge threshold
BACKING = 4  # raw page in a backing file (zswap writeback)

STATE_NAMES = {EMPTY: "empty", SAME: "same", COMPRESSED: "compressed", HUGE: "huge",
               BACKING: "backing"}

LENGTH_MASK = 0x1FFF
STATE_SHIFT = 13

CHUNK_SHIFT = 9  # 512 pages (2 MiB of address): one swap cluster
CHUNK_PAGES = 1 << CHUNK_SHIFT


class Chunk:
    """``pages`` consecutive pages' entries. ``ref`` is None on tables without reference
    bits."""

    __slots__ = ("meta", "loc", "ref")

    def __init__(self, pages: int, referenced: bool) -> None:
        # Built by repetition: exactly sized (from bytes, an array keeps ~6 % spare).
        self.meta = array("H", [0]) * pages
        self.loc = array("Q", [0]) * pages
        self.ref: bytearray | None = bytearray(pages) if referenced else None

    def is_empty(self, zeros: bytes) -> bool:
        """``zeros``: as many zero bytes as ``meta`` holds (a memcmp, not a loop in Python)."""
        return self.meta.tobytes() == zeros

    @property
    def nbytes(self) -> int:
        """What this chunk really holds: its arrays' buffers and the objects around them."""
        size = (sys.getsizeof(self) + sys.getsizeof(self.meta) + sys.getsizeof(self.loc))
        if self.ref is not None:
            size += sys.getsizeof(self.ref)
        return size


def fixed_bytes(pages: int) -> int:
    """Metadata a table for ``pages`` advertised pages costs before anything is stored: the
    empty directory, whatever the size. Config validation refuses a size whose fixed cost the
    machine could not hold."""
    # the empty directory, the set of chunks to look at, and the shared absent chunk
    return (sys.getsizeof({}) + sys.getsizeof(set())
            + Chunk(CHUNK_PAGES, referenced=True).nbytes)


class PageTable:
    """``chunk_shift`` sets the chunk size (``1 << chunk_shift`` pages); tests make it small
    so that every request crosses chunk boundaries."""

    __slots__ = ("pages", "chunks", "referenced", "absent", "emptied", "chunk_shift",
                 "chunk_pages", "chunk_mask", "_zeros")

    def __init__(self, pages: int, referenced: bool = False,
                 chunk_shift: int = CHUNK_SHIFT) -> None:
        self.pages = pages
        self.referenced = referenced  # tracks a referenced bit per stored page (zswap)
        self.chunk_shift = chunk_shift
        self.chunk_pages = 1 << chunk_shift
        self.chunk_mask = self.chunk_pages - 1
        self._zeros = bytes(2 * self.chunk_pages)
        self.chunks: dict[int, Chunk] = {}
        # The chunk every absent one reads as: all empty. Only ever read, except that
        # readers may set reference bits in its ``ref`` (scratch: an empty page's bit is
        # never looked at; a store sets the bit of the page it stores).
        self.absent = Chunk(self.chunk_pages, referenced)
        # Chunks that may have emptied: chunk number -> the slot a clear last emptied (or a
        # store opened the chunk for). give_back looks there first: a rewrite refills it at
        # once, so the common case costs one array read, not a scan of the chunk.
        self.emptied: dict[int, int] = {}

    # -- chunks -------------------------------------------------------------------------
    def view(self, index: int) -> Chunk:
        """The chunk holding page ``index`` to read (the shared empty one if absent)."""
        return self.chunks.get(index >> self.chunk_shift) or self.absent

    def writable(self, index: int) -> Chunk:
        """The chunk holding page ``index`` to store into, allocated if absent."""
        number = index >> self.chunk_shift
        chunk = self.chunks.get(number)
        if chunk is None:
            chunk = self.chunks[number] = Chunk(self.chunk_pages, self.referenced)
            self.emptied[number] = index & self.chunk_mask  # a store may yet leave it empty
        return chunk

    def give_back(self) -> int:
        """Free every chunk that a clear left empty; returns chunks freed. Callers run it at
        the end of a change, never while they hold a chunk's arrays to write into."""
        freed = 0
        chunks, zeros = self.chunks, self._zeros
        for number, slot in self.emptied.items():
            chunk = chunks.get(number)
            if chunk is not None and not chunk.meta[slot] and chunk.is_empty(zeros):
                del chunks[number]
                freed += 1
        self.emptied.clear()
        return freed

    def chunk_numbers(self, first: int, stop: int) -> list[int]:
        """Numbers of the allocated chunks overlapping pages ``first .. stop - 1``, ascending
        (by the directory when the range is wider than what is allocated)."""
        shift = self.chunk_shift
        lo, hi = first >> shift, (stop + self.chunk_mask) >> shift
        if hi - lo > len(self.chunks):
            return sorted(n for n in self.chunks if lo <= n < hi)
        return [n for n in range(lo, hi) if n in self.chunks]

    # -- one page at a time (tests, audits, rare paths) ----------------------------------
    def entry(self, index: int) -> int:
        """The raw meta word of page ``index``: 0 exactly when the page is EMPTY."""
        return self.view(index).meta[index & self.chunk_mask]

    def state(self, index: int) -> int:
        return self.entry(index) >> STATE_SHIFT

    def length(self, index: int) -> int:
        return self.entry(index) & LENGTH_MASK

    def location(self, index: int) -> int:
        return self.view(index).loc[index & self.chunk_mask]

    def set(self, index: int, state: int, length: int, loc: int) -> None:
        chunk = self.writable(index)
        slot = index & self.chunk_mask
        chunk.meta[slot] = (state << STATE_SHIFT) | length
        chunk.loc[slot] = loc

    def set_location(self, index: int, loc: int) -> None:
        """Move a stored page's handle (the pool compacted its object)."""
        self.chunks[index >> self.chunk_shift].loc[index & self.chunk_mask] = loc

    def clear(self, index: int) -> None:
        chunk = self.chunks.get(index >> self.chunk_shift)
        if chunk is None:
            return
        slot = index & self.chunk_mask
        chunk.meta[slot] = 0
        chunk.loc[slot] = 0
        self.emptied[index >> self.chunk_shift] = slot

    def reference(self, index: int) -> None:
        ref = self.view(index).ref
        if ref is not None:
            ref[index & self.chunk_mask] = 1

    def referenced_bit(self, index: int) -> bool:
        ref = self.view(index).ref
        return bool(ref is not None and ref[index & self.chunk_mask])

    # -- whole table --------------------------------------------------------------------
    def stored_indices(self, first: int = 0, stop: int | None = None) -> Iterator[int]:
        """Indices of every page that is not EMPTY in ``first .. stop - 1``, ascending."""
        stop = self.pages if stop is None else stop
        for number in self.chunk_numbers(first, stop):
            chunk = self.chunks.get(number)
            if chunk is None:  # given back while the caller iterated
                continue
            meta = chunk.meta
            base = number << self.chunk_shift
            for slot in range(max(first - base, 0), min(stop - base, self.chunk_pages)):
                if meta[slot]:
                    yield base + slot

    def entries(self) -> list[tuple[int, int, int]]:
        """(index, meta word, loc) of every stored page: a snapshot tests compare."""
        return [(i, self.entry(i), self.location(i)) for i in self.stored_indices()]

    def check(self) -> None:
        """Audit: every allocated chunk holds a stored page (a settled change gave back what
        it emptied), and the shared absent chunk is still empty."""
        zeros = self._zeros
        for number, chunk in self.chunks.items():
            assert not chunk.is_empty(zeros), f"chunk {number} is empty but still allocated"
            assert number << self.chunk_shift < self.pages, f"chunk {number} is past the end"
        assert self.absent.is_empty(zeros) and not any(self.absent.loc), "absent chunk written"

    @property
    def metadata_bytes(self) -> int:
        """What the table really holds: the directory and every allocated chunk."""
        chunks = self.chunks
        per_chunk = next(iter(chunks.values())).nbytes if chunks else 0
        return (sys.getsizeof(chunks) + self.absent.nbytes + sys.getsizeof(self.emptied)
                + per_chunk * len(chunks))
