"""A random-operation model check of CompressedDevice against a plain bytearray.

Small device, smaller pool, so write control and allocation failures happen often. After every
step the device's books must agree with themselves and its bytes with the reference model.
"""

from __future__ import annotations

import random
import struct

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cramfs import PAGE_SIZE
from cramfs.device import REJECT_REASONS, CompressedDevice, DeviceConfig
from cramfs.errors import OutOfRange, PoisonedPage, WriteRejected
from cramfs.pagetable import PageTable
from cramfs.watermarks import FailureMode, Policy, State

P = PAGE_SIZE
PAGES = 128  # 512 KiB advertised
POOL_FRAMES = 32  # 128 KiB real: the device holds its 512 KiB only at 4:1 or better
SIZE = PAGES * P
KINDS = ("random", "pattern", "zeros", "words", "text", "mixed")
GAUGES = ("pages_stored", "same_pages", "huge_pages", "compr_data_size", "backing_pages")

SETTINGS = settings(max_examples=80, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def make_data(kind: str, offset: int, length: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(length)
    if kind == "pattern":
        unit = rng.randbytes(rng.randrange(1, 200))
        return (unit * (length // len(unit) + 1))[:length]
    if kind == "zeros":
        return bytes(length)
    if kind == "words":
        # Aligned to the device, so every whole page it covers is same-filled.
        word = struct.pack("<Q", rng.choice([rng.getrandbits(64), 0xFF, 1 << 63, 0]))
        start = offset % 8
        return (word * ((start + length) // 8 + 1))[start:start + length]
    if kind == "text":
        words = [b"alpha", b"beta", b"gamma", b"delta", b"page", b"swap", b"zram", b"\n"]
        out = bytearray()
        while len(out) < length:
            out += rng.choice(words) + b" "
        return bytes(out[:length])
    parts = bytearray()  # mixed: chunks of every kind, some page-sized
    while len(parts) < length:
        n = rng.choice([P, rng.randrange(1, 2 * P)])
        parts += make_data(rng.choice(KINDS[:-1]), offset + len(parts), n, rng.getrandbits(32))
    return bytes(parts[:length])


offsets = st.one_of(
    st.integers(0, PAGES - 1).map(lambda p: p * P),
    st.integers(0, SIZE - 1),
)
lengths = st.one_of(
    st.integers(1, 8).map(lambda n: n * P),
    st.integers(0, 3 * P),
    st.integers(0, 24 * P),
)


class DeviceModel(RuleBasedStateMachine):
    policy = Policy.REJECT
    failure_mode = FailureMode.POISON
    pool_frames = POOL_FRAMES

    def __init__(self) -> None:
        super().__init__()
        self.dev = CompressedDevice(DeviceConfig(
            size=SIZE, pool=self.pool_frames * P, low=0.5, high=0.75, policy=self.policy,
            failure_mode=self.failure_mode, threads=2))
        # Chunks of 8 pages: most requests cross a chunk boundary, and chunks come and go.
        self.dev.table = PageTable(self.dev.pages, chunk_shift=3)
        self.ref = bytearray(SIZE)
        self.poisoned: set[int] = set()  # pages whose contents the model no longer knows
        # partial writes kept aside for poisoned pages: page -> (bytes so far, coverage)
        self.mend: dict[int, tuple[bytearray, bytearray]] = {}
        self.rejects = 0
        self.losses = 0

    def teardown(self) -> None:
        self.dev.close()

    # -- helpers ------------------------------------------------------------------------
    def gauges(self) -> dict[str, int]:
        return {name: getattr(self.dev, name) for name in GAUGES}

    def stored_bytes(self) -> bytes:
        """The device's view of every page, without going through the counted read path."""
        return b"".join(self.dev._page_bytes(i) for i in range(PAGES))

    def do_write(self, offset: int, data: bytes) -> None:
        dev = self.dev
        length = len(data)
        if offset + length > SIZE:
            data = data[:SIZE - offset]
            length = len(data)
        first, last = offset // P, (offset + length - 1) // P
        touched = range(first, last + 1) if length else range(0)
        partial = [i for i in touched
                   if i * P < offset or (i + 1) * P > offset + length]
        before = (self.gauges(), dev.pool.used_bytes, self.stored_bytes(), set(dev.lost),
                  set(dev.poisoned))
        failed_writes = dev.counters.failed_writes
        lost_before = set(dev.lost)
        try:
            result = dev.write(offset, data)
        except WriteRejected as error:
            assert self.policy is not Policy.NONE
            assert error.reason in REJECT_REASONS
            self.rejects += 1
            event(f"rejected: {error.reason}")
            after = (self.gauges(), dev.pool.used_bytes, self.stored_bytes(), set(dev.lost),
                     set(dev.poisoned))
            assert after[0] == before[0] and after[2:] == before[2:]
            assert after[1] <= before[1]  # a retry may have compacted, never grown
            assert dev.counters.failed_writes == failed_writes + 1
            return
        mended = {i for i in partial if i in self.poisoned}
        pieces = {}  # mended page -> (its bytes, its coverage) after this write
        for i in mended:
            lo, hi = max(offset, i * P) - i * P, min(offset + length, (i + 1) * P) - i * P
            buf, covered = (bytearray(x) for x in self.mend.get(i, (bytes(P), bytes(P))))
            buf[lo:hi] = data[i * P + lo - offset:i * P + hi - offset]
            covered[lo:hi] = b"\1" * (hi - lo)
            pieces[i] = (buf, covered)
        kept = {i for i, (_, covered) in pieces.items() if covered.count(0)}
        new_lost = dev.lost - lost_before
        lost_here = {i for i in touched if i in dev.lost} | {
            i for i in touched if i in dev.poisoned and i not in kept}
        assert result.lost_pages == len(lost_here)
        assert new_lost <= set(touched)
        if self.policy is not Policy.NONE:
            assert result.lost_pages == 0
        self.losses += result.lost_pages
        if result.lost_pages:
            event(f"{self.failure_mode.value}: lost pages")
        if result.delay:
            event("throttled")
        # The reference takes the new bytes except on pages the hardware failed to store.
        new = bytearray(self.ref)
        new[offset:offset + length] = data
        for i in touched:
            if i in dev.lost:
                continue  # drop: the page keeps its old contents
            if i in kept:  # a partial write into a poisoned page: kept aside until whole
                assert i in dev.poisoned, "poison cleared before the extent was written"
                self.mend[i] = pieces[i]
                event("partial write kept for a poisoned page")
                continue
            if i in mended:  # its extent is complete: the page takes the pieces
                self.mend.pop(i, None)
                if i in dev.poisoned:  # ...and had no room for them (policy none): poisoned
                    event("mended page poisoned again")
                    self.ref[i * P:(i + 1) * P] = bytes(P)
                    continue
                event("poisoned page mended by partial writes")
                self.poisoned.discard(i)
                self.ref[i * P:(i + 1) * P] = pieces[i][0]
                continue
            if i in dev.poisoned:
                self.poisoned.add(i)
                self.mend.pop(i, None)
                self.ref[i * P:(i + 1) * P] = bytes(P)
                continue
            self.poisoned.discard(i)
            self.mend.pop(i, None)
            self.ref[i * P:(i + 1) * P] = new[i * P:(i + 1) * P]

    # -- rules --------------------------------------------------------------------------
    @rule(offset=offsets, length=lengths, kind=st.sampled_from(KINDS),
          seed=st.integers(0, 2**32 - 1))
    def write(self, offset, length, kind, seed):
        self.do_write(offset, make_data(kind, offset, length, seed))

    @rule(data=st.data(), kind=st.sampled_from(KINDS), count=st.integers(1, 4))
    def overwrite_stored(self, data, kind, count):
        stored = [i for i in range(PAGES) if self.dev.table.state(i) != 0] or [0]
        page = data.draw(st.sampled_from(stored))
        self.do_write(page * P, make_data(kind, page * P, count * P,
                                          data.draw(st.integers(0, 2**32 - 1))))

    @rule(page=st.integers(0, PAGES - 1), count=st.integers(1, 16))
    def zero_pages(self, page, count):
        count = min(count, PAGES - page)
        used = self.dev.pool.used_bytes
        self.do_write(page * P, bytes(count * P))
        # Releases always succeed and never need space.
        for i in range(page, page + count):
            assert self.dev.table.state(i) == 0
            assert i not in self.dev.poisoned and i not in self.dev.lost
        assert self.dev.pool.used_bytes <= used

    @rule(offset=offsets, length=lengths)
    def discard(self, offset, length):
        """fallocate(PUNCH_HOLE): whole pages leave the pool, edges are zeroed in place;
        all or nothing; never more pool than before unless an edge grew."""
        dev = self.dev
        length = min(length, SIZE - offset)
        first, stop = -(-offset // P), (offset + length) // P
        touched = range(offset // P, (offset + length - 1) // P + 1) if length else range(0)
        edges = [i for i in touched if not first <= i < stop]
        before = (self.gauges(), self.stored_bytes(), set(dev.poisoned))
        notify = dev.counters.notify_free
        try:
            dev.discard(offset, length)
        except (WriteRejected, PoisonedPage) as error:
            if isinstance(error, PoisonedPage):
                assert error.page in self.poisoned and error.page in edges
            event(f"discard refused: {type(error).__name__}")
            assert (self.gauges(), self.stored_bytes(), set(dev.poisoned)) == before
            return
        assert not set(edges) & self.poisoned
        whole = max(0, stop - first)
        # An edge that becomes all zeros is released like a zero write, and counts too.
        assert notify + whole <= dev.counters.notify_free <= notify + whole + len(edges)
        for i in range(first, stop):
            assert dev.table.state(i) == 0
            assert i not in dev.poisoned and i not in dev.lost
            self.poisoned.discard(i)
        self.ref[offset:offset + length] = bytes(length)
        event("discard" + (" with edges" if edges else ""))

    @rule(offset=st.integers(0, SIZE), length=st.integers(0, 24 * P))
    def read(self, offset, length):
        length = min(length, SIZE - offset)
        touched = set(range(offset // P, (offset + length - 1) // P + 1)) if length else set()
        if touched & self.poisoned:
            failed = self.dev.counters.failed_reads
            with pytest.raises(PoisonedPage):
                self.dev.read(offset, length)
            assert self.dev.counters.failed_reads == failed + 1
        else:
            assert self.dev.read(offset, length) == self.ref[offset:offset + length]

    @rule(page=st.integers(0, PAGES - 1), start=st.integers(0, P - 1),
          length=st.integers(1, P))
    def read_in_one_page(self, page, start, length):
        """The swap-in short cut of device.read: same bytes, errors and counters."""
        offset, length = page * P + start, min(length, P - start)
        requests, read_bytes = self.dev.counters.read_requests, self.dev.counters.read_bytes
        if page in self.poisoned:
            self.read(offset, length)
            return
        assert self.dev.read(offset, length) == self.ref[offset:offset + length]
        assert self.dev.counters.read_requests == requests + 1
        assert self.dev.counters.read_bytes == read_bytes + length

    @rule(offset=st.integers(-P, SIZE + P), length=st.integers(1, 2 * P))
    def out_of_range(self, offset, length):
        if offset >= 0 and offset + length <= SIZE:
            return
        invalid = self.dev.counters.invalid_io
        stored = self.stored_bytes()
        with pytest.raises(OutOfRange):
            self.dev.write(offset, bytes(length))
        with pytest.raises(OutOfRange):
            self.dev.read(offset, length)
        assert self.dev.counters.invalid_io == invalid + 2
        assert self.stored_bytes() == stored

    @rule()
    def compact(self):
        used = self.dev.pool.used_bytes
        freed = self.dev.compact()
        assert self.dev.pool.used_bytes == used - freed * P

    @rule(low=st.floats(0.05, 0.95), gap=st.floats(0.01, 0.5))
    def set_watermarks(self, low, gap):
        self.dev.set_watermarks(low, min(1.0, low + gap))

    @rule(low=st.one_of(st.floats(allow_nan=True), st.just(0.9)), high=st.sampled_from(
        [0.5, -0.1, 1.5, float("nan")]))
    def set_bad_watermarks(self, low, high):
        wm = self.dev.watermarks
        if isinstance(low, float) and 0 <= low < high <= 1:
            return
        before = (wm.low, wm.high, wm.state, wm.generation)
        with pytest.raises(ValueError):
            self.dev.set_watermarks(low, high)
        assert (wm.low, wm.high, wm.state, wm.generation) == before

    # -- invariants ---------------------------------------------------------------------
    @invariant()
    def books_balance(self):
        dev = self.dev
        pool = dev.pool
        assert pool.used_bytes <= pool.capacity
        pool.check()
        assert dev.recount() == self.gauges()
        mm = dev.mm_stat()
        assert mm == (dev.pages_stored * P, dev.compr_data_size, pool.used_bytes, pool.capacity,
                      pool.max_used_bytes, dev.same_pages, pool.pages_compacted,
                      dev.huge_pages, dev.counters.huge_pages_since)
        assert mm[2] <= mm[4] <= mm[3]
        assert mm[7] <= mm[8]
        assert mm[5] + mm[7] <= mm[0] // P
        assert dev.io_stat() == (dev.counters.failed_reads, dev.counters.failed_writes,
                                 dev.counters.invalid_io, dev.counters.notify_free)

    @invariant()
    def watermark_state_matches_usage(self):
        wm, used = self.dev.watermarks, self.dev.pool.used_bytes
        assert 0 <= self.dev.pressure() <= 1000
        if wm.state is State.OK:
            assert used <= wm.high * wm.capacity
        elif wm.state is State.PRESSURE:
            assert used >= wm.low * wm.capacity

    @invariant()
    def contents_match_reference(self):
        dev = self.dev
        assert dev.poisoned == self.poisoned
        if not self.poisoned:
            assert dev.read(0, SIZE) == self.ref
        else:
            stored = self.stored_bytes()
            for i in range(PAGES):
                if i not in self.poisoned:
                    assert stored[i * P:(i + 1) * P] == self.ref[i * P:(i + 1) * P], i


class RejectModel(DeviceModel):
    policy = Policy.REJECT


class ThrottleModel(DeviceModel):
    policy = Policy.THROTTLE


class DropModel(DeviceModel):
    policy = Policy.NONE
    failure_mode = FailureMode.DROP
    pool_frames = 16


class PoisonModel(DeviceModel):
    policy = Policy.NONE
    failure_mode = FailureMode.POISON
    pool_frames = 16


RejectModel.TestCase.settings = SETTINGS
ThrottleModel.TestCase.settings = settings(SETTINGS, max_examples=25)
DropModel.TestCase.settings = SETTINGS
PoisonModel.TestCase.settings = SETTINGS

TestReject = RejectModel.TestCase
TestThrottle = ThrottleModel.TestCase
TestDrop = DropModel.TestCase
TestPoison = PoisonModel.TestCase
