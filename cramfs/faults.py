"""Failure and media emulation, in the spirit of dm-flakey and dm-delay: injected request
errors, latency and bandwidth (cramfs.timing), and what happens to a page the pool cannot
hold under the ``none`` policy (``failure_mode``: dropped, or poisoned so that reads fail
EIO until the page is written whole again).

The marks live here and change only here: ``poisoned`` and ``lost`` (page sets: rare, so
not a bit on every page) and ``mending`` (partial writes into a poisoned page, kept until
the page's whole extent has been written, however the kernel split the write).
"""

from __future__ import annotations

from cramfs import PAGE_SIZE
from cramfs.errors import InjectedFault, PoisonedPage
from cramfs.stats import Stats
from cramfs.timing import Timing, TimingConfig
from cramfs.watermarks import FailureMode

Mend = tuple[int, bytes | None, bytes | None]  # page, bytes so far, coverage (None: done)


class Faults:
    __slots__ = ("stats", "timing", "failure_mode", "poisoned", "lost", "mending")

    def __init__(self, stats: Stats, timing: TimingConfig, failure_mode: FailureMode) -> None:
        self.stats = stats
        self.timing = Timing(timing)
        self.failure_mode = failure_mode
        self.poisoned: set[int] = set()
        self.lost: set[int] = set()
        # page -> (its bytes so far, one byte per byte: 1 where written)
        self.mending: dict[int, tuple[bytes, bytes]] = {}

    # -- requests ----------------------------------------------------------------------
    def inject(self, op: str) -> None:
        """Fail this request (before it touches data) if the error rate says so."""
        if self.timing.should_fail(op):
            counters = self.stats.counters
            counters.injected_errors[op] += 1
            if op == "read":
                counters.failed_reads += 1
            else:
                counters.failed_writes += 1
            raise InjectedFault(f"injected {op} error")

    def delay(self, op: str, nbytes: int) -> float:
        return self.timing.delay(op, nbytes)

    # -- pages -------------------------------------------------------------------------
    def check_read(self, index: int) -> None:
        """A read of a poisoned page fails (EIO), counted once per request."""
        if index in self.poisoned:
            self.stats.counters.failed_reads += 1
            raise PoisonedPage(index)

    def check_partial_write(self, index: int) -> None:
        """Zeroing part of a poisoned page (a discard's edge) fails: its other bytes are
        gone."""
        if index in self.poisoned:
            self.stats.counters.failed_writes += 1
            raise PoisonedPage(index)

    def mended(self, index: int) -> None:
        """Page ``index`` was stored or released whole: its marks go with its old contents."""
        self.poisoned.discard(index)
        self.lost.discard(index)

    def mended_range(self, first: int, stop: int) -> None:
        """``mended`` for pages ``first .. stop - 1``."""
        for pages in (self.poisoned, self.lost):
            if pages:
                for index in ([i for i in pages if first <= i < stop]
                              if stop - first > len(pages) else range(first, stop)):
                    pages.discard(index)

    def fail_page(self, index: int) -> bool:
        """A page the pool could not hold: dropped (it keeps its old contents, counted in
        ``lost_writes``) or poisoned (``poisoned_writes``). Returns True when poisoned: the
        caller forgets the page's contents."""
        counters = self.stats.counters
        if self.failure_mode is FailureMode.DROP:
            counters.lost_writes += 1
            self.lost.add(index)
            return False
        counters.poisoned_writes += 1
        self.poisoned.add(index)
        self.mending.pop(index, None)  # freshly poisoned: nothing is kept for it yet
        return True

    # -- mending a poisoned page -------------------------------------------------------------
    def _merged(self, index: int, start: int, chunk: bytes) -> tuple[bytearray, bytearray]:
        kept, kept_cover = self.mending.get(index, (bytes(PAGE_SIZE), bytes(PAGE_SIZE)))
        data, covered = bytearray(kept), bytearray(kept_cover)
        data[start:start + len(chunk)] = chunk
        covered[start:start + len(chunk)] = b"\1" * len(chunk)
        return data, covered

    def mend(self, index: int, start: int, chunk: bytes) -> Mend:
        """A partial write into poisoned page ``index``: its bytes so far and which are
        written, to keep (``keep_mends``) once the request is in; (index, None, None) when
        the page's whole extent is now written and the page can take it whole
        (``mended_page``)."""
        data, covered = self._merged(index, start, chunk)
        if covered.count(0):
            return index, bytes(data), bytes(covered)
        return index, None, None

    def mended_page(self, index: int, start: int, chunk: bytes) -> bytes:
        """The whole page a completing partial write makes of what was kept for it."""
        return bytes(self._merged(index, start, chunk)[0])

    def keep_mends(self, mends: list[Mend]) -> None:
        for index, data, covered in mends:
            if data is None or covered is None:
                self.mending.pop(index, None)
            else:
                self.mending[index] = (data, covered)

    @property
    def marked(self) -> bool:
        """Are any pages poisoned or lost (the hot paths skip the marks otherwise)?"""
        return bool(self.poisoned or self.lost)
