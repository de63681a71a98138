"""Device timing and fault injection (cramfs.timing) and the batched zero flush of a device."""

from __future__ import annotations

import os

import pytest

from cramfs import PAGE_SIZE
from cramfs import pagetable as pt
from cramfs.device import CompressedDevice, DeviceConfig
from cramfs.errors import InjectedFault
from cramfs.interrupts import InterruptConfig
from cramfs.timing import MAX_SEED, Timing, TimingConfig

P = PAGE_SIZE


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- TimingConfig ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, name", [(TimingConfig, "seed"),
                                         (InterruptConfig, "interrupts.seed")])
@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, True, "1", 1.0])
def test_a_seed_outside_a_signed_64_bit_integer_is_refused(make, name, seed):
    with pytest.raises(ValueError, match=f"^{name} must be an integer in 0..{MAX_SEED}"):
        make(seed=seed)


@pytest.mark.parametrize("make", [TimingConfig, InterruptConfig])
@pytest.mark.parametrize("seed", [None, 0, MAX_SEED])
def test_a_seed_within_range_is_kept(make, seed):
    assert make(seed=seed).seed == seed


def test_default_config_is_inactive():
    config = TimingConfig()
    assert not config.active
    timing = Timing(config)
    assert timing.delay("read", 1 << 20) == 0
    assert timing.delay("write", 1 << 20) == 0
    assert not timing.should_fail("read")
    assert not timing.should_fail("write")


@pytest.mark.parametrize("key", ["read_latency", "write_latency", "read_bandwidth",
                                 "write_bandwidth", "read_error_rate", "write_error_rate"])
def test_any_setting_makes_it_active(key):
    value = 1000 if "bandwidth" in key else 0.5
    assert TimingConfig(**{key: value}).active


@pytest.mark.parametrize("kwargs", [
    {"read_latency": -0.001}, {"write_latency": 60.5}, {"read_bandwidth": -1},
    {"write_bandwidth": -4096}, {"read_error_rate": -0.1}, {"write_error_rate": 1.01},
])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TimingConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"read_latency": 0}, {"read_latency": 60}, {"write_error_rate": 0.0},
    {"write_error_rate": 1.0}, {"read_bandwidth": 0},
])
def test_edge_values_are_valid(kwargs):
    TimingConfig(**kwargs)


def test_device_config_rejects_bad_zero_flush_interval():
    for bad in (-1, 3601):
        with pytest.raises(ValueError, match="zero_flush_interval"):
            DeviceConfig(size=64 * P, pool=16 * P, zero_flush_interval=bad)


# -- Timing.delay ---------------------------------------------------------------------------

def test_latency_only():
    timing = Timing(TimingConfig(read_latency=0.005, write_latency=0.02))
    assert timing.delay("read", P) == pytest.approx(0.005)
    assert timing.delay("write", P) == pytest.approx(0.02)
    # latency does not queue: every request gets the same
    assert timing.delay("write", 1 << 20) == pytest.approx(0.02)


def test_bandwidth_queues_requests_behind_each_other():
    clock = FakeClock()
    timing = Timing(TimingConfig(write_bandwidth=1_000_000), clock=clock)
    assert timing.delay("write", 100_000) == pytest.approx(0.1)
    # issued at the same instant: waits for the first to finish
    assert timing.delay("write", 100_000) == pytest.approx(0.2)
    assert timing.delay("write", 50_000) == pytest.approx(0.25)
    # time passes: the queue drains
    clock.advance(0.25)
    assert timing.delay("write", 100_000) == pytest.approx(0.1)
    clock.advance(10)  # an idle media does not bank credit
    assert timing.delay("write", 100_000) == pytest.approx(0.1)


def test_bandwidth_partly_drained_queue():
    clock = FakeClock()
    timing = Timing(TimingConfig(read_bandwidth=1000), clock=clock)
    assert timing.delay("read", 1000) == pytest.approx(1.0)
    clock.advance(0.4)
    assert timing.delay("read", 500) == pytest.approx(0.6 + 0.5)


def test_latency_plus_bandwidth_and_directions_are_separate():
    clock = FakeClock()
    timing = Timing(TimingConfig(read_latency=0.01, read_bandwidth=1_000_000,
                                 write_bandwidth=2_000_000), clock=clock)
    assert timing.delay("read", 1_000_000) == pytest.approx(1.01)
    # writes have their own budget: not queued behind the read
    assert timing.delay("write", 1_000_000) == pytest.approx(0.5)
    assert timing.delay("read", 0) == pytest.approx(1.01)  # queued behind, no bytes of its own


# -- Timing.should_fail ---------------------------------------------------------------------

def test_error_rate_zero_never_fails():
    timing = Timing(TimingConfig(read_error_rate=0.0, seed=1))
    assert not any(timing.should_fail("read") for _ in range(10_000))


def test_error_rate_one_always_fails():
    timing = Timing(TimingConfig(write_error_rate=1.0, seed=1))
    assert all(timing.should_fail("write") for _ in range(10_000))
    assert not any(timing.should_fail("read") for _ in range(1000))  # per direction


def test_seeded_fraction_is_close_and_reproducible():
    def run(seed):
        timing = Timing(TimingConfig(read_error_rate=0.25, seed=seed))
        return [timing.should_fail("read") for _ in range(20_000)]

    first = run(7)
    assert first == run(7)
    assert 0.23 < sum(first) / len(first) < 0.27
    assert first != run(8)


# -- CompressedDevice.inject_fault ----------------------------------------------------------

def make_device(**timing) -> CompressedDevice:
    return CompressedDevice(DeviceConfig(size=64 * P, pool=32 * P,
                                         timing=TimingConfig(**timing)))


def test_inject_fault_counts_and_raises():
    dev = make_device(read_error_rate=1.0, seed=3)
    try:
        for n in range(1, 4):
            with pytest.raises(InjectedFault):
                dev.inject_fault("read")
            assert dev.counters.injected_errors == {"read": n, "write": 0}
            assert dev.counters.failed_reads == n
        assert dev.counters.failed_writes == 0
        dev.inject_fault("write")  # write rate 0: passes
        assert dev.io_stat()[0] == 3  # failed_reads, zram order
    finally:
        dev.close()


def test_inject_fault_on_writes():
    dev = make_device(write_error_rate=1.0)
    try:
        for _ in range(5):
            with pytest.raises(InjectedFault, match="write"):
                dev.inject_fault("write")
        assert dev.counters.injected_errors["write"] == 5
        assert dev.counters.failed_writes == 5
        assert dev.counters.failed_reads == 0
        # an injected fault touches no data: the device is still empty and working
        assert dev.pages_stored == 0
        dev.write(0, b"x" * P)
        assert dev.read(0, P) == b"x" * P
    finally:
        dev.close()


def test_inject_fault_seeded_fraction():
    dev = make_device(read_error_rate=0.5, seed=11)
    try:
        failed = 0
        for _ in range(2000):
            try:
                dev.inject_fault("read")
            except InjectedFault:
                failed += 1
        assert dev.counters.injected_errors["read"] == failed == dev.counters.failed_reads
        assert 900 < failed < 1100
    finally:
        dev.close()


def test_io_delay_uses_the_device_timing():
    dev = make_device(write_latency=0.02)
    try:
        assert dev.io_delay("write", P) == pytest.approx(0.02)
        assert dev.io_delay("read", P) == 0
    finally:
        dev.close()


# -- zero_flush_interval --------------------------------------------------------------------

def text_page(i: int) -> bytes:
    line = f"page {i:06d} the quick brown fox jumps over the lazy dog\n".encode()
    return (line * (P // len(line) + 1))[:P]


def random_page() -> bytes:
    return os.urandom(P)


@pytest.fixture
def flushdev():
    dev = CompressedDevice(DeviceConfig(size=128 * P, pool=128 * P, zero_flush_interval=1.0))
    yield dev
    dev.close()


def consistent(dev: CompressedDevice) -> None:
    counts = dev.recount()
    assert counts == {"pages_stored": dev.pages_stored, "same_pages": dev.same_pages,
                      "huge_pages": dev.huge_pages, "compr_data_size": dev.compr_data_size,
                      "backing_pages": dev.backing_pages}
    dev.pool.check()
    assert dev.releasing_bytes == sum(dev.pool.slot_size(h) for h in dev.releasing)


def test_zero_write_keeps_pool_space_until_flush(flushdev):
    dev = flushdev
    pages = [random_page() if i % 2 else text_page(i) for i in range(32)]
    dev.write(0, b"".join(pages))
    consistent(dev)
    used = dev.used_bytes
    assert used > 0
    dev.write(0, bytes(32 * P))  # release everything
    assert dev.pages_stored == 0
    assert dev.releasing_bytes > 0
    assert dev.used_bytes == used  # the device has not given the space back yet
    assert dev.read(0, 32 * P) == bytes(32 * P)  # but the pages read as zeros already
    assert all(dev.table.state(i) == pt.EMPTY for i in range(32))
    assert dev.counters.notify_free == 32
    consistent(dev)
    assert dev.flush_releases() == 32
    assert dev.releasing_bytes == 0 and not dev.releasing
    assert dev.used_bytes == 0
    consistent(dev)
    assert dev.flush_releases() == 0


def test_zero_flush_with_compaction_in_between(flushdev):
    dev = flushdev
    pages = [text_page(i) if i % 3 else random_page() for i in range(96)]
    dev.write(0, b"".join(pages))
    # release scattered pages so blocks are half empty and compaction has work
    for i in range(0, 96, 2):
        dev.write(i * P, bytes(P))
        pages[i] = bytes(P)
    consistent(dev)
    pending = dev.releasing_bytes
    assert pending > 0
    dev.compact()
    consistent(dev)  # moved released slots are still tracked
    assert dev.releasing_bytes == pending
    for i, page in enumerate(pages):
        assert dev.read(i * P, P) == page, i
    # rewrite a few released pages, release a few live ones, compact again
    for i in range(0, 20, 2):
        pages[i] = text_page(1000 + i)
        dev.write(i * P, pages[i])
    for i in range(1, 21, 4):
        pages[i] = bytes(P)
        dev.write(i * P, pages[i])
    dev.compact()
    consistent(dev)
    freed = dev.flush_releases()
    assert freed > 0
    consistent(dev)
    assert dev.releasing_bytes == 0
    dev.compact()
    consistent(dev)
    for i, page in enumerate(pages):
        assert dev.read(i * P, P) == page, i


def test_zero_write_over_empty_page_parks_nothing(flushdev):
    dev = flushdev
    dev.write(0, bytes(8 * P))
    assert dev.releasing_bytes == 0 and dev.flush_releases() == 0
    assert dev.counters.notify_free == 0


def test_without_interval_zero_write_frees_at_once():
    dev = CompressedDevice(DeviceConfig(size=64 * P, pool=64 * P))
    try:
        dev.write(0, b"".join(random_page() for _ in range(8)))
        assert dev.used_bytes > 0
        dev.write(0, bytes(8 * P))
        assert dev.used_bytes == 0 and dev.releasing_bytes == 0
        consistent(dev)
    finally:
        dev.close()


def test_pending_release_counts_toward_watermarks():
    """Parked slots still occupy the pool, so the device stays in pressure until the flush."""
    dev = CompressedDevice(DeviceConfig(size=64 * P, pool=16 * P, low=0.25, high=0.5,
                                        zero_flush_interval=5))
    try:
        dev.write(0, b"".join(random_page() for _ in range(10)))
        assert dev.watermarks.state.value == "pressure"
        dev.write(0, bytes(10 * P))
        assert dev.watermarks.state.value == "pressure"
        dev.flush_releases()
        assert dev.watermarks.state.value == "ok"
        assert dev.used_bytes == 0
    finally:
        dev.close()
