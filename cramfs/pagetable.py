"""Per-device page table in two flat arrays: 10 bytes of metadata per advertised page.

``meta`` (uint16): bits 0-12 the stored length (0..4096), bits 13-15 the page's state.
``loc`` (uint64): the pool handle (compressed, huge) or the repeated word (same-filled).
Poisoned pages are rare, so they live in a set rather than costing a bit on every page.
"""

from __future__ import annotations

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


def fixed_bytes(pages: int) -> int:
    """Metadata a table for ``pages`` advertised pages costs before anything is stored.
    Config validation refuses a size whose fixed cost the machine could not hold."""
    return 10 * pages


class PageTable:
    __slots__ = ("pages", "meta", "loc")

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.meta = array("H", bytes(2 * pages))
        self.loc = array("Q", bytes(8 * pages))

    def state(self, index: int) -> int:
        return self.meta[index] >> STATE_SHIFT

    def length(self, index: int) -> int:
        return self.meta[index] & LENGTH_MASK

    def set(self, index: int, state: int, length: int, loc: int) -> None:
        self.meta[index] = (state << STATE_SHIFT) | length
        self.loc[index] = loc

    def clear(self, index: int) -> None:
        self.meta[index] = 0
        self.loc[index] = 0

    def stored_indices(self) -> Iterator[int]:
        """Indices of every page that is not EMPTY, in ascending order."""
        meta = self.meta
        for base in range(0, self.pages, 4096):
            top = min(base + 4096, self.pages)
            if meta[base:top].count(0) == top - base:
                continue
            for index in range(base, top):
                if meta[index]:
                    yield index

    @property
    def metadata_bytes(self) -> int:
        return self.meta.itemsize * len(self.meta) + self.loc.itemsize * len(self.loc)
