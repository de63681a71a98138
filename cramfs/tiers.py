"""Where a page goes: the tier a device stores into.

``PoolTier`` (swap, node): the pool only. A page the pool cannot hold is the write's failure,
which write control and the failure mode decide (cramfs.control, cramfs.faults).

``BackingTier`` (zswap): the pool in front of a backing file, as the kernel's zswap. Each page
lives in exactly one place: nowhere (empty or same-filled), the pool, or the file.
- the pool may use ``max_pool_percent`` of its capacity; hitting that counts
  ``pool_limit_hit`` and refuses new pool stores until usage falls below
  ``accept_threshold_percent`` of the limit (hysteresis, as zswap_check_limits());
- pages that do not compress (``reject_compress_poor``) and pages the pool refuses go
  straight to the backing file: nothing is ever refused;
- a shrinker writes cold pages back: a CLOCK sweep over a referenced bit per stored page (in
  the page table's chunks: no per-page objects), counting ``written_back_pages``.
The device asks the tier (``spills``, ``admits``, ``spill``) instead of branching on a kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from cramfs import PAGE_SIZE
from cramfs import codec as enc
from cramfs import pagetable as pt

if TYPE_CHECKING:
    from cramfs.backing import BackingStore
    from cramfs.books import Books
    from cramfs.codec import Codec, Encoded
    from cramfs.stats import Stats
    from cramfs.zspool import ZsPool

DEFAULT_MAX_POOL_PERCENT = 20
DEFAULT_ACCEPT_THRESHOLD_PERCENT = 90


def validate_percents(max_pool: int, accept: int) -> None:
    if isinstance(max_pool, bool) or not isinstance(max_pool, int) or not 1 <= max_pool <= 100:
        raise ValueError(f"max_pool_percent must be an integer 1..100, got {max_pool!r}")
    if isinstance(accept, bool) or not isinstance(accept, int) or not 0 <= accept <= 100:
        raise ValueError(f"accept_threshold_percent must be an integer 0..100, got {accept!r}")


class PoolTier:
    """The pool only: nowhere else to put a page."""

    spills = False  # has a place besides the pool

    def admits(self, item: Encoded) -> bool:
        """May this page go to the pool?"""
        return True

    def spill(self, index: int, item: Encoded) -> None:
        raise AssertionError("a pool-only tier has nowhere to spill to")

    def read_spilled(self, index: int) -> bytes:
        raise AssertionError("a pool-only tier holds no spilled page")


class BackingTier(PoolTier):
    """The pool in front of a backing file (zswap)."""

    spills = True

    def __init__(self, books: Books, pool: ZsPool, codec: Codec, stats: Stats,
                 backing: BackingStore, max_pool_percent: int,
                 accept_threshold_percent: int) -> None:
        validate_percents(max_pool_percent, accept_threshold_percent)
        self.books = books
        self.pool = pool
        self.codec = codec
        self.stats = stats
        self.backing = books.backing = backing
        self.max_pool_percent = max_pool_percent
        self.accept_threshold_percent = accept_threshold_percent
        self.limit_reached = False  # zswap_pool_reached_full
        self.hand = 0  # the CLOCK hand: the next page the shrinker looks at

    # -- the limit and its hysteresis ------------------------------------------------------
    @property
    def pool_limit(self) -> int:
        return self.pool.capacity * self.max_pool_percent // 100

    @property
    def accept_bytes(self) -> int:
        return self.pool_limit * self.accept_threshold_percent // 100

    def set_limits(self, max_pool_percent: int | None = None,
                   accept_threshold_percent: int | None = None) -> None:
        max_pool = self.max_pool_percent if max_pool_percent is None else max_pool_percent
        accept = (self.accept_threshold_percent if accept_threshold_percent is None
                  else accept_threshold_percent)
        validate_percents(max_pool, accept)
        self.max_pool_percent, self.accept_threshold_percent = max_pool, accept

    def admits(self, item: Encoded) -> bool:
        if item.kind == enc.HUGE:
            self.stats.counters.reject_compress_poor += 1
            return False
        # As the kernel's zswap_check_limits(): every store that finds the pool at its limit
        # counts a hit and sets "reached full", which clears once usage is below the accept
        # threshold. The limit test includes the block this store may have to open, so a
        # store never takes the pool past the limit.
        pool = self.pool
        used = pool.used_bytes
        if used + pool.growth(pool.class_of(len(item.payload))) > self.pool_limit:
            self.stats.counters.pool_limit_hit += 1
            self.limit_reached = True
        elif self.limit_reached and used < self.accept_bytes:
            self.limit_reached = False
        return not self.limit_reached

    # -- the backing file -------------------------------------------------------------------
    def spill(self, index: int, item: Encoded) -> None:
        """Write page ``index`` to the backing file, raw (OSError if the file refuses)."""
        # From encode_batch the payload is a buffer (a memoryview slice, a zstd BufferSegment),
        # not bytes: zstd's decompress and os.pwrite take any buffer, though Codec.decompress
        # and BackingStore.write say bytes (other compressors' payloads are always bytes).
        payload = cast("bytes", item.payload)
        raw = payload if item.kind == enc.HUGE else self.codec.decompress(payload)
        self.backing.write(index, raw)

    def read_spilled(self, index: int) -> bytes:
        return self.backing.read(index)

    # -- the shrinker ----------------------------------------------------------------------
    def needs_writeback(self) -> bool:
        return self.pool.used_bytes > self.accept_bytes

    def writeback(self, pages: int, max_pages: int, max_scan: int) -> int:
        """Write up to ``max_pages`` cold pool pages of a ``pages``-page device to the
        backing file (CLOCK sweep), stopping once usage is below the accept threshold.
        Returns pages written; the caller settles the pool afterwards."""
        table, pool = self.books.table, self.pool
        chunks, chunk_shift, chunk_mask = table.chunks, table.chunk_shift, table.chunk_mask
        shift, compressed, huge = pt.STATE_SHIFT, pt.COMPRESSED, pt.HUGE
        written = scanned = 0
        hand = self.hand
        target = self.accept_bytes
        # The hand walks the stored chunks in address order, each chunk's arrays fetched
        # once; absent chunks are jumped over free of the scan budget (on a 15 TiB device
        # they would otherwise use it up before the hand reached pages stored far out).
        while scanned < max_scan and written < max_pages and pool.used_bytes > target:
            number, start = hand >> chunk_shift, hand & chunk_mask
            chunk = chunks.get(number)
            if chunk is None:
                if not chunks:
                    break
                later = [n for n in chunks if n > number]
                hand = (min(later) if later else min(chunks)) << chunk_shift
                continue
            base = hand - start
            stop = min(chunk_mask + 1, pages - base, start + max_scan - scanned)
            meta, referenced = chunk.meta, chunk.ref
            assert referenced is not None  # this table tracks references
            slot = start
            while slot < stop:
                if written >= max_pages or pool.used_bytes <= target:
                    break
                s = slot
                slot += 1
                state = meta[s] >> shift
                if state != compressed and state != huge:
                    continue
                if referenced[s]:
                    referenced[s] = 0  # second chance
                    continue
                if self._write_back(base + s):
                    written += 1
            scanned += slot - start
            hand = base + slot
            if hand >= pages:
                hand = 0
        self.hand = hand
        return written

    def _write_back(self, index: int) -> bool:
        books, pool, counters = self.books, self.pool, self.stats.counters
        table = books.table
        state, length = table.state(index), table.length(index)
        payload = pool.read(table.location(index), length)
        try:
            page = payload if state == pt.HUGE else self.codec.decompress(payload)
        except Exception:
            counters.decompress_fail += 1
            return False
        try:
            self.backing.write(index, page)
        except OSError:
            counters.reject_reclaim_fail += 1
            return False
        books.forget(index, free=True)
        books.install(index, pt.BACKING, PAGE_SIZE, 0)
        counters.written_back_pages += 1
        return True
