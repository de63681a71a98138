"""The device as a compressed-RAM node's driver sees it: the ratio promised and the one
achieved, how much a batch may place before usage crosses ``high``, and how much advertised
capacity to withhold so that the rest is backed. A driver asks these before placing a batch
(the node kind's attribute files, the metrics); they only read the device's parts, so they
live apart from the paths that change them, and the device keeps a thin method for each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cramfs import PAGE_SHIFT, PAGE_SIZE
from cramfs.zspool import MAX_FRAMES_PER_BLOCK

if TYPE_CHECKING:
    from cramfs.books import Books
    from cramfs.control import WriteControl
    from cramfs.watermarks import Watermarks
    from cramfs.zspool import ZsPool

# Headroom safe_pages keeps back, in the allocator's largest blocks: the pool grows a block at
# a time (up to MAX_FRAMES_PER_BLOCK frames), not an object at a time, so a batch that opens
# new blocks near the line would cross it (measured: 16 of 58 batches sized at half of an
# unreserved estimate crossed high on a 16 MiB node).
SAFE_RESERVE_BLOCKS = 4


class NodeView:
    """What a node's driver reads of one device: ratios, headroom, safe_pages, balloon_pages."""

    __slots__ = ("size", "pool", "books", "watermarks", "control")

    def __init__(self, size: int, pool: ZsPool, books: Books, watermarks: Watermarks,
                 control: WriteControl) -> None:
        self.size = size  # advertised capacity, bytes
        self.pool = pool
        self.books = books
        self.watermarks = watermarks
        self.control = control

    def zratio(self) -> float:
        """The ratio the device promises: advertised over real capacity."""
        return self.size / self.pool.capacity

    def effective_ratio(self) -> float:
        """Original bytes per pool byte in use: the ratio the capacity lie depends on."""
        used = self.pool.used_bytes
        return (self.books.pages_stored << PAGE_SHIFT) / used if used else 0.0

    def headroom(self) -> int:
        """Pool bytes left before usage crosses ``high``."""
        return self.watermarks.headroom(self.pool.used_bytes)

    def pressure(self) -> int:
        """0 at ``low`` .. 1000 at ``high``."""
        return self.watermarks.pressure(self.pool.used_bytes)

    def safe_pages(self) -> int:
        """Pages of the present average compressibility that still fit before usage crosses
        ``high`` (with nothing in the pool, at the promised ratio), a few largest blocks held
        back (SAFE_RESERVE_BLOCKS). 0 at or above high, or while the gate is closed."""
        if self.control.no_alloc:
            return 0
        headroom = max(0, self.headroom() - SAFE_RESERVE_BLOCKS * MAX_FRAMES_PER_BLOCK
                       * PAGE_SIZE)
        ratio = self.effective_ratio() if self.pool.used_bytes else self.zratio()
        return int(headroom * ratio) >> PAGE_SHIFT

    def balloon_pages(self) -> int:
        """Pages of advertised capacity the OS should withhold so what remains is backed at
        the ratio achieved so far (never above the promised one); 0 with nothing stored."""
        if not self.pool.used_bytes:
            return 0
        backed = self.pool.capacity * min(self.effective_ratio(), self.zratio())
        return max(0, int(self.size - backed)) >> PAGE_SHIFT
