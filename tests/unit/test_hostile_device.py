"""Hostile checks of the chunked page table through the device, where the existing model
checks are thin: requests through the daemon's job path (submit_write/submit_read, with the
offloaded step run as the adapter runs it), releases parked for the batched media zero, a
device whose last chunk is partial, and a 15 TiB device at its far end."""

from __future__ import annotations

import random
import time
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cramfs import PAGE_SIZE
from cramfs.device import CompressedDevice, DeviceConfig
from cramfs.errors import InjectedFault, OutOfRange, WriteRejected
from cramfs.pagetable import PageTable
from cramfs.timing import TimingConfig
from cramfs.watermarks import Policy

P = PAGE_SIZE
PAGES = 61  # not a multiple of the 4-page chunks: the last chunk is partial
SIZE = PAGES * P
TiB = 1 << 40


def page_data(kind: str, length: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(length)
    if kind == "zeros":
        return bytes(length)
    if kind == "fill":
        return bytes([rng.randrange(1, 256)]) * length
    unit = rng.randbytes(rng.randrange(2, 64))
    return (unit * (length // len(unit) + 1))[:length]


KINDS = ("random", "zeros", "fill", "pattern")
offsets = st.one_of(st.integers(0, PAGES - 1).map(lambda p: p * P), st.integers(0, SIZE - 1),
                    st.integers(0, 3).map(lambda k: SIZE - P - k * P))
lengths = st.one_of(st.integers(1, 6).map(lambda n: n * P), st.integers(0, 3 * P),
                    st.just(16 * P), st.just(20 * P))  # 64 KiB and up: the offloaded path


class JobPathModel(RuleBasedStateMachine):
    """The device against a bytearray, every request through the job path, releases parked
    until flushed, 4-page chunks on a 61-page device; the pool is large enough that nothing is
    refused (refusals are the other model's subject), so every byte is known."""

    def __init__(self) -> None:
        super().__init__()
        self.dev = CompressedDevice(DeviceConfig(
            size=SIZE, pool=2 * SIZE, low=0.8, high=0.9, policy=Policy.REJECT, threads=1,
            zero_flush_interval=5.0))
        self.dev.table = PageTable(self.dev.pages, chunk_shift=2)
        self.ref = bytearray(SIZE)

    def teardown(self) -> None:
        self.dev.close()

    def submit_write(self, offset: int, data: bytes) -> None:
        job = self.dev.submit_write(offset, data)
        if job.offload is not None:
            job.offload()
        job.finish()

    def submit_read(self, offset: int, length: int) -> bytes:
        job = self.dev.submit_read(offset, length)
        if job.offload is not None:
            job.offload()
        return bytes(job.finish())

    @rule(offset=offsets, length=lengths, kind=st.sampled_from(KINDS), seed=st.integers(0, 99))
    def write(self, offset: int, length: int, kind: str, seed: int) -> None:
        length = min(length, SIZE - offset)
        data = page_data(kind, length, seed)
        self.submit_write(offset, data)
        self.ref[offset:offset + length] = data

    @rule(offset=offsets, length=lengths)
    def discard(self, offset: int, length: int) -> None:
        length = min(length, SIZE - offset)
        self.dev.discard(offset, length)
        self.ref[offset:offset + length] = bytes(length)

    @rule(offset=offsets, length=lengths)
    def read(self, offset: int, length: int) -> None:
        length = min(length, SIZE - offset)
        assert self.submit_read(offset, length) == self.ref[offset:offset + length]

    @rule()
    def flush(self) -> None:
        self.dev.flush_releases()
        assert self.dev.releasing_bytes == 0

    @rule()
    def compact(self) -> None:
        self.dev.compact()

    @rule(offset=st.integers(SIZE - 3 * P, SIZE + P), length=st.integers(1, 3 * P))
    def past_the_end(self, offset: int, length: int) -> None:
        if offset + length <= SIZE:
            return
        before = self.dev.counters.invalid_io
        with pytest.raises(OutOfRange):
            self.submit_write(offset, b"\x01" * length)
        with pytest.raises(OutOfRange):
            self.submit_read(offset, length)
        with pytest.raises(OutOfRange):
            self.dev.discard(offset, length)
        assert self.dev.counters.invalid_io == before + 3

    @invariant()
    def books_and_chunks_follow_the_contents(self) -> None:
        dev = self.dev
        counts = dev.recount()  # also audits: no allocated chunk is empty
        assert counts == {k: getattr(dev, k) for k in counts}
        table = dev.books.table
        holding = {i >> table.chunk_shift for i in range(PAGES) if self.ref[i * P:(i + 1) * P]
                   != bytes(P)}
        # a chunk is allocated exactly when one of its pages is stored (a page of zeros is
        # stored as nothing: a release)
        assert set(table.chunks) == holding
        assert bytes(b"".join(dev._page_bytes(i) for i in range(PAGES))) == self.ref


TestJobPath = JobPathModel.TestCase
TestJobPath.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])


def test_a_15_tib_device_discards_and_audits_its_far_end_at_once() -> None:
    dev = CompressedDevice(DeviceConfig(size=15 * TiB, pool=8 << 20, threads=1))
    try:
        last = dev.size - P
        stores = [0, 511 * P, 512 * P, 7 * TiB + 3 * P, last - 512 * P, last]
        for i, off in enumerate(stores):
            dev.write(off, random.Random(i).randbytes(P))
        assert len(dev.books.table.chunks) == 5
        started = time.process_time()
        assert dev.discard(P, dev.size - 2 * P) == 4  # keeps page 0 and the last page
        dev.recount()
        assert sorted(dev.books.table.stored_indices()) == [0, dev.pages - 1]
        assert len(dev.books.table.chunks) == 2
        assert dev.read(last, P) == random.Random(5).randbytes(P)
        assert dev.discard(0, dev.size) == 2
        assert not dev.books.table.chunks and dev.pool.used_bytes == 0
        assert time.process_time() - started < 1.0  # by the directory, not 4e9 pages
    finally:
        dev.close()


def test_a_flood_far_out_is_refused_without_leaving_chunks_behind() -> None:
    """A write refused for want of pool space allocates nothing that stays: the table's
    chunks are exactly those of the pages still stored."""
    dev = CompressedDevice(DeviceConfig(size=15 * TiB, pool=1 << 20, threads=1))
    try:
        refused = 0
        for i in range(64):
            try:
                dev.write(3 * TiB + i * 513 * P - 2 * P, random.Random(i).randbytes(16 * P))
            except WriteRejected:
                refused += 1
        assert refused
        dev.recount()
        table = dev.books.table
        assert set(table.chunks) == {i >> table.chunk_shift for i in table.stored_indices()}
    finally:
        dev.close()


def test_an_out_of_range_read_request_is_out_of_range_even_with_injected_errors() -> None:
    """check_range's contract: every entry point, the request jobs included, runs it before
    anything else; submit_write does (EFBIG before an injected error), submit_read does not."""
    dev = CompressedDevice(DeviceConfig(size=1 << 20, pool=1 << 20, threads=1,
                                        timing=TimingConfig(read_error_rate=1.0, seed=1)))
    try:
        try:
            dev.submit_read(1 << 20, P)
        except InjectedFault:
            pytest.fail("an injected EIO came before the range check")
        except OutOfRange:
            pass
        assert dev.counters.invalid_io == 1
    finally:
        dev.close()


def test_a_pool_the_machine_cannot_map_is_refused_naming_the_key() -> None:
    from daemon import config, main

    cfg = config.parse('mountpoint = "/tmp/cramfs-hostile-never"\nmetrics_address = ""\n'
                       '[device.n]\nkind = "node"\nsize = "1G"\npool = "64T"\n')
    with pytest.raises(main.UsageError, match=r"device\.n\.pool"):
        main.make_device(cfg.devices[0]).close()


def _zswap_far_end_writeback(size: int, tmp_path: Path) -> tuple[int, bool]:
    """A zswap device over a 4 MiB pool, 2000 half-random pages stored at its far end (past
    the pool limit): how many pages 200 shrinker runs write back, and whether it still
    needs writeback afterwards."""
    from cramfs.zswap import ZswapDevice

    dev = ZswapDevice(DeviceConfig(size=size, pool=4 << 20, threads=1), tmp_path / "backing")
    try:
        rng = random.Random(1)
        base = size - (64 << 20)
        for i in range(2000):
            dev.write(base + i * P, rng.randbytes(2000) + bytes(P - 2000))
        assert dev.needs_writeback()
        written = sum(dev.writeback() for _ in range(200))
        dev.recount()
        return written, dev.needs_writeback()
    finally:
        dev.close()


def test_zswap_writes_back_far_end_pages_of_a_small_device(tmp_path: Path) -> None:
    written, needs = _zswap_far_end_writeback(1 << 30, tmp_path)
    assert written > 0 and not needs


def test_zswap_writes_back_far_end_pages_of_a_15_tib_device(tmp_path: Path) -> None:
    written, needs = _zswap_far_end_writeback(15 * TiB, tmp_path)
    assert written > 0 and not needs
