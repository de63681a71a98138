"""A zswap-like device: a compressed cache in the pool in front of a backing file.

Each page lives in exactly one place (seed 001's virtual swap): nowhere (empty or same-filled),
the compressed pool, or the backing file. As in the kernel's zswap:
- the pool may use ``max_pool_percent`` of its capacity; hitting that counts
  ``pool_limit_hit`` and refuses new pool stores until usage falls below
  ``accept_threshold_percent`` of the limit (hysteresis);
- pages that do not compress (``reject_compress_poor``) and pages the pool refuses go straight
  to the backing file;
- a shrinker writes cold pages back: a CLOCK sweep over a referenced bit per page (a
  second-chance LRU in one byte a page, no per-page objects), counting ``written_back_pages``.
zswap never refuses a write: the backing file is the fallback, so write control is off here.
"""

from __future__ import annotations

from pathlib import Path

from cramfs import PAGE_SIZE
from cramfs import pagetable as pt
from cramfs.backing import BackingStore
from cramfs.codec import Encoded
from cramfs.device import CompressedDevice, DeviceConfig

DEFAULT_MAX_POOL_PERCENT = 20
DEFAULT_ACCEPT_THRESHOLD_PERCENT = 90


def validate_percents(max_pool: int, accept: int) -> None:
    if isinstance(max_pool, bool) or not isinstance(max_pool, int) or not 1 <= max_pool <= 100:
        raise ValueError(f"max_pool_percent must be an integer 1..100, got {max_pool!r}")
    if isinstance(accept, bool) or not isinstance(accept, int) or not 0 <= accept <= 100:
        raise ValueError(f"accept_threshold_percent must be an integer 0..100, got {accept!r}")


class ZswapDevice(CompressedDevice):
    TRACKS_REFERENCES = True  # the shrinker's CLOCK reads a referenced bit per stored page
    REFUSES_WRITES = False  # the backing file takes what the pool does not

    def __init__(self, config: DeviceConfig, backing_file: Path | str,
                 max_pool_percent: int = DEFAULT_MAX_POOL_PERCENT,
                 accept_threshold_percent: int = DEFAULT_ACCEPT_THRESHOLD_PERCENT) -> None:
        validate_percents(max_pool_percent, accept_threshold_percent)
        super().__init__(config)
        try:
            self.backing = BackingStore(backing_file, config.size)
        except OSError:
            self.pool.close()
            self.codec.close()
            raise
        self.max_pool_percent = max_pool_percent
        self.accept_threshold_percent = accept_threshold_percent
        self.limit_reached = False  # zswap_pool_reached_full
        self._hand = 0

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

    def _pool_accepts(self, item: Encoded) -> bool:
        if item.kind == pt.HUGE:  # the codec's kinds are the page table's states
            self.counters.reject_compress_poor += 1
            return False
        # As the kernel's zswap_check_limits(): every store that finds the pool at its limit
        # counts a hit and sets "reached full", which clears once usage is below the accept
        # threshold. The limit test includes the block this store may have to open (up to 8
        # frames), so a store never takes the pool past the limit.
        used = self.pool.used_bytes
        cls = self.pool.class_of(len(item.payload))
        if used + self.pool.growth(cls) > self.pool_limit:
            self.counters.pool_limit_hit += 1
            self.limit_reached = True
        elif self.limit_reached and used < self.accept_bytes:
            self.limit_reached = False
        return not self.limit_reached

    # -- the shrinker ----------------------------------------------------------------------
    def needs_writeback(self) -> bool:
        return self.pool.used_bytes > self.accept_bytes

    def writeback(self, max_pages: int = 64, max_scan: int = 16384) -> int:
        """Write up to ``max_pages`` cold pool pages to the backing file (CLOCK sweep),
        stopping once usage is below the accept threshold. Returns pages written."""
        table, pages, pool = self.table, self.pages, self.pool
        chunks, chunk_shift, chunk_mask = table.chunks, table.chunk_shift, table.chunk_mask
        shift, compressed, huge = pt.STATE_SHIFT, pt.COMPRESSED, pt.HUGE
        written = scanned = 0
        hand = self._hand
        target = self.accept_bytes
        # The hand walks every page (absent chunks count as scanned empty pages, a chunk's
        # worth at a time), with each chunk's arrays fetched once.
        while scanned < max_scan and written < max_pages and pool.used_bytes > target:
            number, start = hand >> chunk_shift, hand & chunk_mask
            base = hand - start
            stop = min(chunk_mask + 1, pages - base, start + max_scan - scanned)
            chunk = chunks.get(number)
            if chunk is None:
                slot = stop
            else:
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
        self._hand = hand
        if written:
            self._settle()
        return written

    def _write_back(self, index: int) -> bool:
        table, pool, counters = self.table, self.pool, self.counters
        assert self.backing is not None
        state, length, handle = table.state(index), table.length(index), table.location(index)
        payload = pool.read(handle, length)
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
        books = self.books
        books.forget(index, free=True)
        books.install(index, pt.BACKING, PAGE_SIZE, 0)
        counters.written_back_pages += 1
        return True

    # -- zswap's debugfs view --------------------------------------------------------------
    def debugfs(self) -> dict[str, int]:
        """zswap's debugfs files, in the kernel's order (stats.ZSWAP_DEBUGFS_FIELDS)."""
        return self.stats.zswap_debugfs(self.books, self.pool)
