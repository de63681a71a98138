"""The device's parts, each on its own: the books' install/forget pair, write control's
decisions, failure emulation's marks, the stats' tables, and the request jobs an adapter
runs (range checked once, the offloaded step named by the device)."""

from __future__ import annotations

import os

import pytest

from cramfs import PAGE_SIZE
from cramfs import pagetable as pt
from cramfs.books import RELEASED_OWNER, Books
from cramfs.control import WriteControl
from cramfs.device import OFFLOAD_MIN_BYTES, CompressedDevice, DeviceConfig
from cramfs.errors import InjectedFault, OutOfRange, PoisonedPage, WriteRejected
from cramfs.faults import Faults
from cramfs.stats import (
    IO_STAT_FIELDS,
    MM_STAT_FIELDS,
    REJECT_FULL,
    REJECT_GATE,
    REJECT_WATERMARK,
    ZSWAP_DEBUGFS_FIELDS,
    Stats,
)
from cramfs.timing import TimingConfig
from cramfs.watermarks import FailureMode, Policy, State, Watermarks
from cramfs.zspool import ZsPool

P = PAGE_SIZE
MIB = 1 << 20


# -- books -------------------------------------------------------------------------------

@pytest.fixture
def books():
    pool = ZsPool(64 * P)
    yield Books(pt.PageTable(1024), pool)
    pool.close()


def test_install_and_forget_keep_the_gauges_exact(books):
    pool = books.pool
    handle = pool.alloc(1000, 1)
    huge = pool.alloc(P, 2)
    books.install(0, pt.SAME, 0, 0xABAB)
    books.install(1, pt.COMPRESSED, 1000, handle)
    books.install(2, pt.HUGE, P, huge)
    books.install(600, pt.BACKING, P, 0)  # another chunk
    assert books.gauges() == {"pages_stored": 4, "same_pages": 1, "huge_pages": 1,
                              "compr_data_size": 1000 + P, "backing_pages": 1}
    assert books.recount() == books.gauges()
    books.forget(2, free=True)
    books.forget(600, free=True)
    books.forget(3, free=True)  # empty: nothing to forget
    assert books.gauges() == {"pages_stored": 2, "same_pages": 1, "huge_pages": 0,
                              "compr_data_size": 1000, "backing_pages": 0}
    assert books.table.give_back() == 1  # page 600's chunk emptied
    assert books.recount() == books.gauges()


def test_a_deferred_forget_parks_the_slot_until_the_flush(books):
    pool = books.pool
    handle = pool.alloc(1000, 5)
    books.install(5, pt.COMPRESSED, 1000, handle)
    used = pool.used_bytes
    books.forget(5, free=True, defer=True)
    assert books.pages_stored == 0 and books.releasing == {handle}
    assert books.releasing_bytes == pool.slot_size(handle)
    assert pool.owner(handle) == RELEASED_OWNER and pool.used_bytes == used
    books.table.give_back()  # the end of the change
    assert books.recount()["pages_stored"] == 0  # the parked slot is accounted for
    assert books.flush_releases() == 1
    assert not books.releasing and books.releasing_bytes == 0
    assert pool.live_objects() == {}


# -- write control ------------------------------------------------------------------------

def control(policy: Policy = Policy.REJECT, used: int = 0, **kw) -> WriteControl:
    wm = Watermarks(100 * P, 0.5, 0.75)
    wm.update(used)
    return WriteControl(Stats(), wm, policy, 0.05, kw.pop("on_full", False), **kw)


def test_an_idle_device_never_asks_whether_a_write_grows():
    c = control()
    assert c.idle
    assert c.admit(lambda: pytest.fail("asked"), 0) == 0.0


def test_the_reason_a_refusal_gives():
    c = control(used=80 * P)
    assert c.watermarks.state is State.PRESSURE
    with pytest.raises(WriteRejected) as exc:
        c.admit(lambda: True, 80 * P)
    assert exc.value.reason == REJECT_WATERMARK
    assert c.admit(lambda: False, 80 * P) == 0.0  # shrinks into its slots: passes
    c.set_no_alloc(True)
    with pytest.raises(WriteRejected) as exc:
        c.admit(lambda: True, 0)
    assert exc.value.reason == REJECT_GATE
    c.set_no_alloc(False)
    c.watermarks.update(80 * P, alloc_failed=True)
    with pytest.raises(WriteRejected) as exc:
        c.refuse()
    assert exc.value.reason == REJECT_FULL
    assert c.stats.counters.rejected == {REJECT_WATERMARK: 1, REJECT_GATE: 1, REJECT_FULL: 1}
    assert c.stats.counters.failed_writes == 3


def test_throttle_holds_the_reply_in_proportion_to_pressure():
    c = control(Policy.THROTTLE, used=int(62.5 * P))
    c.watermarks.update(80 * P)
    delay = c.admit(lambda: True, int(62.5 * P))  # halfway between low and high
    assert delay == pytest.approx(0.025)
    assert c.stats.counters.throttled_writes == 1
    assert c.stats.counters.throttle_seconds == pytest.approx(0.025)


def test_a_device_that_never_refuses_keeps_write_control_off():
    c = control(Policy.REJECT, refuses=False)
    assert c.policy is Policy.NONE
    with pytest.raises(ValueError):
        c.set_policy(Policy.REJECT)
    with pytest.raises(ValueError):
        c.set_no_alloc(True)
    c.set_policy(Policy.NONE)
    c.set_no_alloc(False)
    assert c.policy is Policy.NONE and not c.no_alloc


def test_full_closes_the_gate_when_asked_to():
    c = control(on_full=True)
    c.watermarks.update(0, alloc_failed=True)
    assert c.no_alloc and c.refuses_growth()


# -- faults --------------------------------------------------------------------------------

def test_injected_errors_count_per_direction():
    stats = Stats()
    f = Faults(stats, TimingConfig(read_error_rate=1.0, seed=1), FailureMode.POISON)
    with pytest.raises(InjectedFault):
        f.inject("read")
    f.inject("write")  # no write errors configured
    assert stats.counters.injected_errors == {"read": 1, "write": 0}
    assert stats.counters.failed_reads == 1 and stats.counters.failed_writes == 0


def test_failed_pages_are_dropped_or_poisoned_and_mended_by_a_whole_write():
    stats = Stats()
    f = Faults(stats, TimingConfig(), FailureMode.DROP)
    assert f.fail_page(3) is False and f.lost == {3}
    f.failure_mode = FailureMode.POISON
    f.mending[7] = (b"x", b"\1")
    assert f.fail_page(7) is True and f.poisoned == {7} and 7 not in f.mending
    with pytest.raises(PoisonedPage):
        f.check_read(7)
    f.check_read(3)  # a lost page reads (its old contents)
    assert stats.counters.failed_reads == 1
    assert (stats.counters.lost_writes, stats.counters.poisoned_writes) == (1, 1)
    f.mended_range(4, 8)
    assert f.poisoned == set() and f.lost == {3} and f.marked
    f.mended(3)
    assert not f.marked


# -- stats ---------------------------------------------------------------------------------

def test_the_reports_follow_the_table_of_names():
    dev = CompressedDevice(DeviceConfig(size=4 * MIB, pool=MIB, threads=1))
    try:
        dev.write(0, os.urandom(64) * (P // 64) + bytes(P) + b"\x07" * P)
        mm = dict(zip(MM_STAT_FIELDS, dev.mm_stat(), strict=True))
        assert mm["orig_data_size"] == 2 * P and mm["same_pages"] == 1
        assert mm["compr_data_size"] == dev.compr_data_size
        assert mm["mem_limit"] == MIB
        with pytest.raises(OutOfRange):
            dev.read(dev.size, 1)
        io = dict(zip(IO_STAT_FIELDS, dev.io_stat(), strict=True))
        assert io["invalid_io"] == 1
        assert tuple(dev.stats.zswap_debugfs(dev.books, dev.pool)) == ZSWAP_DEBUGFS_FIELDS
    finally:
        dev.close()


# -- request jobs --------------------------------------------------------------------------

@pytest.fixture
def dev():
    device = CompressedDevice(DeviceConfig(size=16 * MIB, pool=8 * MIB, threads=1))
    yield device
    device.close()


def test_a_small_write_is_done_at_once_and_a_large_one_offloads_its_compression(dev):
    small = dev.submit_write(0, b"\x01" * P)
    assert small.offload is None and small.finish().lost_pages == 0
    data = os.urandom(32) * (OFFLOAD_MIN_BYTES // 32)
    job = dev.submit_write(MIB, data)
    assert job.offload is not None and dev.pages_stored == 1  # nothing placed yet
    job.offload()
    assert job.finish().delay == 0.0 and job.delay() == 0.0
    assert dev.pages_stored == 1 + OFFLOAD_MIN_BYTES // P
    read = dev.submit_read(MIB, len(data))
    assert read.offload is not None
    read.offload()
    assert bytes(read.finish()) == data
    small_read = dev.submit_read(0, P)
    assert small_read.offload is None and small_read.finish() == b"\x01" * P


def test_a_large_read_decodes_into_the_buffer_it_is_handed(dev):
    data = os.urandom(16) * (OFFLOAD_MIN_BYTES // 16)
    dev.write(0, data)
    given = bytearray(len(data))
    sizes = []

    def buffers(size: int) -> bytearray:
        sizes.append(size)
        return given

    job = dev.submit_read(0, len(data), buffers)
    assert job.offload is not None
    job.offload()
    assert sizes == [len(data)] and job.reply is given
    assert bytes(job.finish()) == data


@pytest.mark.parametrize("call", [
    lambda d: d.submit_write(d.size - P, bytes(2 * P)),
    lambda d: d.submit_write(-P, bytes(P)),
    lambda d: d.submit_read(d.size - P, OFFLOAD_MIN_BYTES),
    lambda d: d.prepare_write(d.size, bytes(P)),
    lambda d: d.fetch(d.size, P),
    lambda d: d.write(d.size, bytes(P)),
    lambda d: d.read(-1, P),
    lambda d: d.discard(d.size - P, 2 * P),
])
def test_every_entry_refuses_out_of_range_and_counts_it(dev, call):
    with pytest.raises(OutOfRange):
        call(dev)
    assert dev.counters.invalid_io == 1
    assert dev.pages_stored == 0


def test_out_of_range_comes_before_an_injected_error(dev):
    dev.timing = type(dev.timing)(TimingConfig(write_error_rate=1.0, seed=3))
    with pytest.raises(OutOfRange):
        dev.submit_write(dev.size, bytes(P))
    with pytest.raises(InjectedFault):
        dev.submit_write(0, bytes(P))
    assert dev.counters.injected_errors["write"] == 1 and dev.counters.invalid_io == 1
