"""The device's statistics: event counters, zram's ``mm_stat`` and ``io_stat``, zswap's
debugfs view, and one table of their names that the attribute files, the metrics and the
tests read (a name is spelled once, here).

Counters are monotonic events counted as the device works, never recounted on read; the
gauges they are reported beside live in the books (cramfs.books).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cramfs import PAGE_SHIFT

if TYPE_CHECKING:
    from cramfs.books import Books
    from cramfs.zspool import ZsPool

REJECT_WATERMARK = "watermark"
REJECT_FULL = "full"
REJECT_GATE = "gate"  # the allocation gate (no_alloc) is closed
REJECT_REASONS = (REJECT_WATERMARK, REJECT_FULL, REJECT_GATE)

# zram's /sys/block/zramN/mm_stat and io_stat fields, in the kernel's order.
MM_STAT_FIELDS = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit",
                  "mem_used_max", "same_pages", "pages_compacted", "huge_pages",
                  "huge_pages_since")
IO_STAT_FIELDS = ("failed_reads", "failed_writes", "invalid_io", "notify_free")
# mm/zswap.c's debugfs files (Linux 6.18), in its order.
ZSWAP_DEBUGFS_FIELDS = ("pool_limit_hit", "reject_reclaim_fail", "reject_alloc_fail",
                        "reject_kmemcache_fail", "reject_compress_fail",
                        "reject_compress_poor", "decompress_fail", "written_back_pages",
                        "pool_total_size", "stored_pages", "stored_incompressible_pages")


@dataclass
class Counters:
    """Event counters (monotonic) kept as the device works, never recounted on read."""

    read_requests: int = 0
    write_requests: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    failed_reads: int = 0
    failed_writes: int = 0
    invalid_io: int = 0
    notify_free: int = 0  # pages released: zero writes that freed one, every discarded page
    discard_requests: int = 0  # fallocate(PUNCH_HOLE / ZERO_RANGE) requests served
    discarded_pages: int = 0  # whole pages those requests covered (the node's trim count)
    huge_pages_since: int = 0
    reject_compress_poor: int = 0
    reject_alloc_fail: int = 0
    pool_limit_hit: int = 0
    lost_writes: int = 0  # pages dropped by FailureMode.DROP
    poisoned_writes: int = 0  # pages poisoned by FailureMode.POISON
    throttled_writes: int = 0
    throttle_seconds: float = 0.0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))
    # zswap's debugfs counters (stay 0 on devices without a backing file)
    written_back_pages: int = 0
    reject_reclaim_fail: int = 0
    reject_compress_fail: int = 0
    decompress_fail: int = 0
    backing_write_errors: int = 0
    injected_errors: dict[str, int] = field(
        default_factory=lambda: {"read": 0, "write": 0})


class Stats:
    """Holds the device's counters (``counters`` may be replaced whole: a replay resets
    them) and reports them in the kernel's shapes."""

    __slots__ = ("counters",)

    def __init__(self) -> None:
        self.counters = Counters()

    def mm_stat(self, books: Books, pool: ZsPool) -> tuple[int, ...]:
        """zram's mm_stat fields, in MM_STAT_FIELDS order."""
        return (books.pages_stored << PAGE_SHIFT, books.compr_data_size, pool.used_bytes,
                pool.capacity, pool.max_used_bytes, books.same_pages, pool.pages_compacted,
                books.huge_pages, self.counters.huge_pages_since)

    def io_stat(self) -> tuple[int, ...]:
        """zram's io_stat fields, in IO_STAT_FIELDS order."""
        c = self.counters
        return (c.failed_reads, c.failed_writes, c.invalid_io, c.notify_free)

    def zswap_debugfs(self, books: Books, pool: ZsPool) -> dict[str, int]:
        """zswap's debugfs files, keyed by ZSWAP_DEBUGFS_FIELDS in order."""
        c = self.counters
        values = (c.pool_limit_hit, c.reject_reclaim_fail, c.reject_alloc_fail, 0,
                  c.reject_compress_fail, c.reject_compress_poor, c.decompress_fail,
                  c.written_back_pages, pool.used_bytes,
                  books.pages_stored - books.backing_pages, books.huge_pages)
        return dict(zip(ZSWAP_DEBUGFS_FIELDS, values, strict=True))
