"""A model check of zswap page placement: each page lives in exactly one backend, as in the
linux-mm RFC "mm, swap: support zswap and zeroswap as vswap backends".

The reference model keeps, per page, its bytes and the backend it must be in as far as the
model can tell from the page's history (empty, same-filled, pool, backing, or "pool or
backing" when the device's limit decided). After every step the device's books must agree
with themselves, its bytes with the model, and each page's state with its history.
"""

from __future__ import annotations

import random

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cramfs import PAGE_SIZE
from cramfs import codec as enc
from cramfs import pagetable as pt
from cramfs.device import DeviceConfig
from cramfs.zswap import ZswapDevice

P = PAGE_SIZE
PAGES = 48
POOL_FRAMES = 48
GAUGES = ("pages_stored", "same_pages", "huge_pages", "compr_data_size", "backing_pages")

EMPTY, SAME, POOL, BACKING = pt.EMPTY, pt.SAME, pt.COMPRESSED, pt.BACKING
# what the model allows for a page: a set of page-table states
STORED = frozenset({pt.COMPRESSED, pt.BACKING})  # the limit decided
KINDS = ("zero", "same", "text", "half", "random")


def make_page(kind: str, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "zero":
        return bytes(P)
    if kind == "same":
        return rng.randrange(1, 256).to_bytes(1, "little") * P
    if kind == "text":
        words = [b"alpha ", b"beta ", b"gamma ", b"swap ", b"zram\n", b"%d " % seed]
        out = bytearray()
        while len(out) < P:
            out += rng.choice(words)
        return bytes(out[:P])
    if kind == "half":
        n = rng.randrange(600, 2400)
        return rng.randbytes(n) + bytes(P - n)
    return rng.randbytes(P)


class ZswapPlacement(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dev: ZswapDevice | None = None
        self.data = [bytes(P)] * PAGES
        self.where: list[frozenset[int]] = [frozenset({EMPTY})] * PAGES
        self._dir = None

    @initialize(max_pool=st.sampled_from([25, 50, 100]), accept=st.sampled_from([0, 50, 90]))
    def start(self, max_pool, accept):
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="cramfs-zswap-")
        self.dev = ZswapDevice(DeviceConfig(size=PAGES * P, pool=POOL_FRAMES * P, threads=1),
                               backing_file=f"{self._dir.name}/backing.img",
                               max_pool_percent=max_pool, accept_threshold_percent=accept)
        # Chunks of 4 pages: requests and the CLOCK sweep cross chunk boundaries.
        self.dev.table = pt.PageTable(self.dev.pages, referenced=True, chunk_shift=2)

    def teardown(self) -> None:
        if self.dev is not None:
            self.dev.close()
        if self._dir is not None:
            self._dir.cleanup()

    # -- model helpers --
    def expected_after_write(self, page: bytes) -> frozenset[int]:
        if page == bytes(P):
            return frozenset({EMPTY})
        if page == page[:8] * (P // 8):
            return frozenset({SAME})
        if self.dev.codec.encode_pages(page)[0].kind == enc.HUGE:
            return frozenset({BACKING})  # reject_compress_poor: straight to the backing file
        return STORED

    def _write(self, first: int, pages: list[bytes]) -> None:
        poor = self.dev.counters.reject_compress_poor
        self.dev.write(first * P, b"".join(pages))
        expect_poor = 0
        for k, page in enumerate(pages):
            self.data[first + k] = page
            self.where[first + k] = self.expected_after_write(page)
            expect_poor += self.where[first + k] == frozenset({BACKING})
        assert self.dev.counters.reject_compress_poor == poor + expect_poor
        # pages that compress but found the pool refusing went to the backing file
        for k in range(len(pages)):
            state = self.dev.table.state(first + k)
            if self.where[first + k] == STORED:
                self.where[first + k] = frozenset({state})

    # -- rules --
    @rule(first=st.integers(0, PAGES - 1), count=st.integers(1, 6),
          kinds=st.lists(st.sampled_from(KINDS), min_size=6, max_size=6),
          seed=st.integers(0, 2**32))
    def write(self, first, count, kinds, seed):
        count = min(count, PAGES - first)
        self._write(first, [make_page(kinds[k], seed + k) for k in range(count)])

    @rule(data=st.data())
    @precondition(lambda self: self.dev is not None and self.dev.pages_stored)
    def overwrite(self, data):
        stored = [i for i in range(PAGES) if self.dev.table.state(i) != EMPTY]
        index = data.draw(st.sampled_from(stored))
        kind = data.draw(st.sampled_from(KINDS))
        before = self.dev.backing.allocated_bytes()
        was_backing = self.dev.table.state(index) == BACKING
        self._write(index, [make_page(kind, data.draw(st.integers(0, 2**32)))])
        if was_backing and self.dev.table.state(index) != BACKING:
            assert self.dev.backing.allocated_bytes() == before - P  # punched

    @rule(first=st.integers(0, PAGES - 1), count=st.integers(1, 8))
    def zero(self, first, count):
        count = min(count, PAGES - first)
        self._write(first, [bytes(P)] * count)

    @rule(first=st.integers(0, PAGES - 1), count=st.integers(1, 8))
    def read(self, first, count):
        count = min(count, PAGES - first)
        got = self.dev.read(first * P, count * P)
        assert got == b"".join(self.data[first:first + count])

    @rule(offset=st.integers(0, PAGES * P - 1), length=st.integers(1, 3 * P),
          seed=st.integers(0, 2**32))
    def partial_write(self, offset, length, seed):
        length = min(length, PAGES * P - offset)
        chunk = random.Random(seed).choice([bytes(length), b"\x5a" * length,
                                            random.Random(seed).randbytes(length)])
        self.dev.write(offset, chunk)
        buf = bytearray(b"".join(self.data))
        buf[offset:offset + length] = chunk
        first, last = offset // P, (offset + length - 1) // P
        for i in range(first, last + 1):
            self.data[i] = bytes(buf[i * P:(i + 1) * P])
            expected = self.expected_after_write(self.data[i])
            state = self.dev.table.state(i)
            self.where[i] = frozenset({state}) if expected == STORED else expected

    @rule(max_pages=st.integers(1, 64), sweeps=st.integers(1, 3))
    def writeback(self, max_pages, sweeps):
        before = [self.dev.table.state(i) for i in range(PAGES)]
        written = self.dev.counters.written_back_pages
        total = 0
        for _ in range(sweeps):
            total += self.dev.writeback(max_pages=max_pages, max_scan=PAGES)
        assert self.dev.counters.written_back_pages == written + total
        moved = 0
        for i in range(PAGES):
            state = self.dev.table.state(i)
            if state != before[i]:
                # writeback only ever moves a pool page to the backing file
                assert before[i] in (pt.COMPRESSED, pt.HUGE) and state == BACKING, (i, before[i])
                self.where[i] = frozenset({BACKING})
                moved += 1
        assert moved == total

    @rule(max_pool=st.integers(1, 100), accept=st.integers(0, 100))
    def set_limits(self, max_pool, accept):
        self.dev.set_limits(max_pool, accept)
        assert (self.dev.max_pool_percent, self.dev.accept_threshold_percent) == (max_pool,
                                                                                  accept)

    @rule(bad=st.sampled_from([0, 101, -1, 1.5]))
    def bad_limits(self, bad):
        before = (self.dev.max_pool_percent, self.dev.accept_threshold_percent)
        try:
            self.dev.set_limits(max_pool_percent=bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"max_pool_percent={bad!r} accepted")
        assert (self.dev.max_pool_percent, self.dev.accept_threshold_percent) == before

    @rule()
    def compact(self):
        self.dev.compact()

    # -- invariants --
    @invariant()
    def books_agree(self):
        if self.dev is None:
            return
        dev = self.dev
        assert dev.recount() == {g: getattr(dev, g) for g in GAUGES}
        dev.pool.check()
        stats = dev.debugfs()
        assert stats["stored_pages"] == dev.pages_stored - dev.backing_pages
        assert stats["pool_total_size"] == dev.used_bytes

    @invariant()
    def every_page_in_its_place(self):
        if self.dev is None:
            return
        for i in range(PAGES):
            state = self.dev.table.state(i)
            assert state in self.where[i], (i, pt.STATE_NAMES[state],
                                            [pt.STATE_NAMES[s] for s in self.where[i]])
        assert self.dev.backing.allocated_bytes() == self.dev.backing_pages * P

    @invariant()
    def data_matches(self):
        if self.dev is None:
            return
        assert self.dev.read(0, PAGES * P) == b"".join(self.data)

    @invariant()
    def pool_within_limit(self):
        if self.dev is None:
            return
        # set_limits may lower the limit below what is already stored; that is allowed
        # (zswap shrinks back to it), so this only holds while no limit was lowered.
        assert self.dev.used_bytes <= self.dev.pool.capacity


ZswapPlacement.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestZswapPlacement = ZswapPlacement.TestCase


class LimitTracking(RuleBasedStateMachine):
    """No set_limits: the limit is fixed, so every write must leave the pool within it."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="cramfs-zswap-")
        self.dev = ZswapDevice(DeviceConfig(size=PAGES * P, pool=2 * POOL_FRAMES * P,
                                            threads=1),
                               backing_file=f"{self._dir.name}/backing.img",
                               max_pool_percent=30, accept_threshold_percent=60)
        self.dev.table = pt.PageTable(self.dev.pages, referenced=True, chunk_shift=2)
        self.data = [bytes(P)] * PAGES

    def teardown(self) -> None:
        self.dev.close()
        self._dir.cleanup()

    @rule(first=st.integers(0, PAGES - 1), count=st.integers(1, 8),
          kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32))
    def write(self, first, count, kind, seed):
        count = min(count, PAGES - first)
        pages = [make_page(kind, seed + k) for k in range(count)]
        refusing = self.dev.limit_reached and self.dev.used_bytes >= self.dev.accept_bytes
        self.dev.write(first * P, b"".join(pages))
        self.data[first:first + count] = pages
        if refusing:
            # hysteresis: above the accept threshold after a hit, nothing new enters the pool
            for k, page in enumerate(pages):
                if page != page[:8] * (P // 8):
                    assert self.dev.table.state(first + k) == BACKING, first + k
            assert self.dev.limit_reached

    @rule(max_pages=st.integers(1, 32))
    def writeback(self, max_pages):
        written = self.dev.writeback(max_pages=max_pages)
        assert written <= max_pages
        if written < max_pages:
            # it stopped early: the pool is down to the accept threshold, or no page is
            # left in it (a full scan clears every referenced bit, the next writes it)
            assert (self.dev.used_bytes <= self.dev.accept_bytes
                    or not any(self.dev.table.state(i) in (pt.COMPRESSED, pt.HUGE)
                               for i in range(PAGES)))

    @invariant()
    def within_limit(self):
        assert self.dev.used_bytes <= self.dev.pool_limit
        assert self.dev.read(0, PAGES * P) == b"".join(self.data)

    @invariant()
    def hits_counted(self):
        if self.dev.limit_reached:
            assert self.dev.counters.pool_limit_hit >= 1
        assert self.dev.recount()["backing_pages"] == self.dev.backing_pages


LimitTracking.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestLimitTracking = LimitTracking.TestCase
