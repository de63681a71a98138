"""cramfs.device: the compressed block device (zram-like) and its write control."""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import struct

import pytest

from cramfs import PAGE_SIZE
from cramfs.device import REJECT_FULL, REJECT_WATERMARK, CompressedDevice, DeviceConfig
from cramfs.errors import OutOfRange, PoisonedPage, WriteRejected
from cramfs.watermarks import EVENT_FULL, FailureMode, Policy, State

P = PAGE_SIZE
GAUGES = ("pages_stored", "same_pages", "huge_pages", "compr_data_size", "backing_pages")


def make(size: int = 256 * P, pool: int = 64 * P, **kwargs) -> CompressedDevice:
    return CompressedDevice(DeviceConfig(size=size, pool=pool, **kwargs))


def rand(n: int, seed: int | None = None) -> bytes:
    return random.Random(seed).randbytes(n) if seed is not None else os.urandom(n)


def text(n: int, seed: int = 0) -> bytes:
    line = f"{seed}: lorem ipsum dolor sit amet, consectetur adipiscing elit\n".encode()
    return (line * (n // len(line) + 1))[:n]


def word(value: int, pages: int = 1) -> bytes:
    return struct.pack("<Q", value) * (pages * P // 8)


def gauges(dev: CompressedDevice) -> dict[str, int]:
    return {name: getattr(dev, name) for name in GAUGES}


def check(dev: CompressedDevice, reference: bytearray | None = None) -> None:
    """The device's books agree with themselves (and its bytes with a reference)."""
    dev.pool.check()
    assert dev.recount() == gauges(dev)
    assert dev.pool.used_bytes <= dev.pool.capacity
    mm = dev.mm_stat()
    assert mm[0] == dev.pages_stored * P
    assert mm[2] <= mm[3] and mm[2] <= mm[4]
    if reference is not None:
        assert dev.read(0, dev.size) == bytes(reference)


def snapshot(dev: CompressedDevice) -> dict:
    """Everything a failed write must leave alone (read without touching counters)."""
    return {
        "data": b"".join(dev._page_bytes(i) for i in range(dev.pages)),
        "gauges": gauges(dev),
        "used": dev.pool.used_bytes,
        "mm_stat": dev.mm_stat(),
        "counters": copy.deepcopy(dataclasses.asdict(dev.counters)),
        "table": dev.table.entries(),
        "poisoned": set(dev.poisoned),
        "lost": set(dev.lost),
    }


def fill_to_pressure(dev: CompressedDevice, reference: bytearray, start: int = 0) -> int:
    """Write incompressible pages one by one until write control engages; next free page."""
    page = start
    while dev.watermarks.state is State.OK:
        data = rand(P)
        dev.write(page * P, data)
        reference[page * P:(page + 1) * P] = data
        page += 1
    return page


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(size=0, pool=P), dict(size=P + 1, pool=P), dict(size=P, pool=0),
     dict(size=P, pool=P - 1), dict(size=P, pool=P + 1), dict(size=-P, pool=P),
     dict(size=1 << 44, pool=P)],
)
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        DeviceConfig(**kwargs)


@pytest.mark.parametrize("key, value", [
    ("throttle_max_delay", -0.01), ("throttle_max_delay", 60.5),
    ("throttle_max_delay", float("nan")), ("throttle_max_delay", True),
    ("huge_threshold", 255), ("huge_threshold", PAGE_SIZE + 1), ("huge_threshold", 0),
    ("huge_threshold", True), ("huge_threshold", 1024.0)])
def test_config_refuses_a_value_out_of_its_range_naming_it(key, value):
    """The device owns these ranges (the TOML config only checks types): a delay of a minute
    per write is already a hung swap, and below a 256-byte cut-off nearly every page is raw."""
    with pytest.raises(ValueError, match=f"^{key} must be"):
        DeviceConfig(size=P, pool=P, **{key: value})


@pytest.mark.parametrize("key, value", [("throttle_max_delay", 0), ("throttle_max_delay", 60),
                                        ("huge_threshold", 256),
                                        ("huge_threshold", PAGE_SIZE)])
def test_config_takes_the_ends_of_each_range(key, value):
    config = DeviceConfig(size=P, pool=P, **{key: value})
    assert getattr(config, key) == value
    dev = CompressedDevice(config)
    held = dev.codec.huge_threshold if key == "huge_threshold" else dev.throttle_max_delay
    assert held == value


def test_bad_watermarks_in_config():
    with pytest.raises(ValueError):
        make(low=0.9, high=0.8)


def test_fresh_device_reads_zeros():
    dev = make()
    assert dev.read(0, dev.size) == bytes(dev.size)
    assert dev.mm_stat() == (0, 0, 0, 64 * P, 0, 0, 0, 0, 0)
    assert dev.io_stat() == (0, 0, 0, 0)
    check(dev)


# -- reads and writes at any offset --------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, P), (0, 1), (1, 1), (P - 1, 2), (100, 10_000), (3 * P + 5, 5 * P + 17),
     (0, 64 * P), (7, 64 * P - 7), (250 * P, 6 * P), (256 * P - 3, 3), (P, 0), (256 * P, 0),
     (12_345, 100 * P + 99)],
)
@pytest.mark.parametrize("kind", ["random", "text", "zeros", "words"])
def test_write_read_any_offset(offset, length, kind):
    dev = make(pool=256 * P)
    reference = bytearray(dev.size)
    # Something under the write first, so partial pages must merge with it.
    base = text(dev.size, seed=9)
    dev.write(0, base)
    reference[:] = base
    data = {"random": rand, "text": text, "zeros": bytes, "words": lambda n: word(
        0x0102030405060708, -(-n // P) + 1)[:n]}[kind](length)
    result = dev.write(offset, data)
    assert result.delay == 0 and result.lost_pages == 0
    reference[offset:offset + length] = data
    assert dev.read(offset, length) == data
    check(dev, reference)
    # Arbitrary sub-ranges read back what the reference holds.
    rng = random.Random(offset ^ length)
    for _ in range(20):
        start = rng.randrange(dev.size)
        n = rng.randrange(dev.size - start + 1)
        assert dev.read(start, n) == reference[start:start + n]


def test_partial_page_read_modify_write():
    dev = make()
    page = rand(P)
    dev.write(5 * P, page)
    dev.write(5 * P + 100, b"XYZ")
    expected = page[:100] + b"XYZ" + page[103:]
    assert dev.read(5 * P, P) == expected
    # Partial write into a same-filled page and into a never-written page.
    dev.write(6 * P, word(0xAB))
    dev.write(6 * P + 8, b"\x00" * 8)
    assert dev.read(6 * P, P) == word(0xAB)[:8] + bytes(8) + word(0xAB)[16:]
    dev.write(7 * P + P - 1, b"\x01")
    assert dev.read(7 * P, P) == bytes(P - 1) + b"\x01"
    check(dev)


def test_many_small_unaligned_writes_match_reference():
    dev = make(size=64 * P, pool=1024 * P)
    reference = bytearray(dev.size)
    rng = random.Random(3)
    for _ in range(300):
        offset = rng.randrange(dev.size)
        n = rng.randrange(min(3 * P, dev.size - offset) + 1)
        data = rng.choice([rng.randbytes, bytes, lambda k: text(k, rng.randrange(5))])(n)
        dev.write(offset, data)
        reference[offset:offset + n] = data
    check(dev, reference)


def test_prepare_commit_and_fetch_decode_split():
    dev = make()
    data = text(10 * P + 123)
    plan = dev.prepare_write(P + 7, data)
    dev.commit_write(plan)
    fetched = dev.fetch(P + 7, len(data))
    assert dev.decode(fetched) == data
    assert dev.counters.write_requests == 1 and dev.counters.read_requests == 1
    assert dev.counters.written_bytes == len(data) and dev.counters.read_bytes == len(data)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 1), (-P, P), (256 * P, 1), (256 * P - 1, 2), (0, 256 * P + 1), (255 * P, 2 * P),
     (1 << 50, 1)],
)
def test_out_of_range_changes_nothing(offset, length):
    dev = make()
    dev.write(0, text(4 * P))
    before = snapshot(dev)
    with pytest.raises(OutOfRange):
        dev.write(offset, b"x" * length)
    with pytest.raises(OutOfRange):
        dev.read(offset, length)
    after = snapshot(dev)
    assert after["counters"].pop("invalid_io") == before["counters"].pop("invalid_io") + 2
    assert after == before
    assert dev.io_stat()[2] == 2


def test_negative_read_length_is_out_of_range():
    dev = make()
    with pytest.raises(OutOfRange):
        dev.read(10, -1)
    assert dev.counters.invalid_io == 1


def test_prepare_write_checks_range():
    dev = make()
    with pytest.raises(OutOfRange):
        dev.prepare_write(dev.size - 1, b"ab")


# -- releasing by zero writes --------------------------------------------------------------


def test_zero_write_frees_pool_space_at_once():
    dev = make()
    for i in range(10):
        dev.write(i * P, rand(P))  # huge pages: one frame each
    assert dev.pool.used_bytes == 10 * P
    assert dev.huge_pages == 10 == dev.pages_stored
    dev.write(3 * P, bytes(P))
    assert dev.pool.used_bytes == 9 * P
    assert dev.pages_stored == 9 and dev.huge_pages == 9
    assert dev.counters.notify_free == 1
    assert dev.read(3 * P, P) == bytes(P)
    # Zeroing a page that was never written is not a release.
    dev.write(100 * P, bytes(P))
    assert dev.counters.notify_free == 1
    check(dev)


def test_freeing_everything_returns_all_gauges_to_zero():
    dev = make(pool=1024 * P)
    rng = random.Random(5)
    for i in range(0, 200, 2):
        n = rng.randrange(1, 3 * P)
        dev.write(i * P + rng.randrange(P), rng.choice(
            [rng.randbytes(n), text(n, i), word(i + 1, 3)[:n]]))
    dev.write(201 * P, word(0xFF))
    check(dev)
    assert dev.pool.used_bytes > 0 and dev.same_pages > 0
    dev.write(0, bytes(dev.size))
    assert dev.pool.used_bytes == 0
    assert gauges(dev) == dict.fromkeys(GAUGES, 0)
    mm = dev.mm_stat()
    assert (mm[0], mm[1], mm[2], mm[5], mm[7]) == (0, 0, 0, 0, 0)
    assert dev.pool.live_objects() == {}
    assert dev.read(0, dev.size) == bytes(dev.size)
    check(dev)


# -- mm_stat / io_stat ---------------------------------------------------------------------


def test_mm_stat_fields_in_zram_order():
    dev = make(pool=32 * P)
    compressible = text(P)
    dev.write(0, compressible)
    dev.write(P, rand(P))
    dev.write(2 * P, word(0x55))
    dev.write(3 * P, bytes(P))
    compr = dev.table.length(0) + P
    used = dev.pool.used_bytes
    # orig_data_size compr_data_size mem_used_total mem_limit mem_used_max same_pages
    # pages_compacted huge_pages huge_pages_since
    assert dev.mm_stat() == (3 * P, compr, used, 32 * P, used, 1, 0, 1, 1)
    dev.write(P, bytes(P))  # huge page released: huge_pages drops, huge_pages_since does not
    mm = dev.mm_stat()
    assert mm[0] == 2 * P and mm[7] == 0 and mm[8] == 1 and mm[4] == used
    assert dev.io_stat() == (0, 0, 0, 1)  # failed_reads failed_writes invalid_io notify_free


def test_compact_really_moves_objects_and_keeps_every_page():
    """Three objects per block in one size class, two of every three released: compaction
    must move survivors (counted through the pool's move hook) and free frames."""
    dev = make(pool=512 * P)
    moves = []
    moved = dev.pool.on_move
    dev.pool.on_move = lambda owner, old, new: (moves.append(owner), moved(owner, old, new))
    reference = bytearray(dev.size)
    rng = random.Random(11)
    for i in range(240):
        data = rng.randbytes(1200) + bytes(P - 1200)  # ~1.2 KiB objects, one class
        dev.write(i * P, data)
        reference[i * P:(i + 1) * P] = data
    for i in range(240):
        if i % 3:
            dev.write(i * P, bytes(P))  # release
            reference[i * P:(i + 1) * P] = bytes(P)
    used = dev.pool.used_bytes
    freed = dev.compact()
    assert moves and freed > 0 and dev.pool.used_bytes == used - freed * P
    assert dev.pool.pages_compacted >= freed
    check(dev, reference)


# -- write control: reject -----------------------------------------------------------------


def test_reject_in_pressure_changes_nothing():
    dev = make(pool=32 * P, low=0.25, high=0.5)
    reference = bytearray(dev.size)
    nxt = fill_to_pressure(dev, reference)
    assert dev.watermarks.state is State.PRESSURE
    before = snapshot(dev)
    for offset, data in [(nxt * P, rand(P)), (nxt * P + 10, b"abc"), (200 * P, text(3 * P)),
                         ((nxt - 1) * P, rand(2 * P))]:
        with pytest.raises(WriteRejected) as info:
            dev.write(offset, data)
        assert info.value.reason == REJECT_WATERMARK
    after = snapshot(dev)
    assert after["counters"].pop("failed_writes") == before["counters"].pop("failed_writes") + 4
    assert after["counters"]["rejected"].pop(REJECT_WATERMARK) == before["counters"][
        "rejected"].pop(REJECT_WATERMARK) + 4
    assert after == before
    assert dev.io_stat()[1] == 4
    check(dev, reference)


def test_shrinking_and_zero_writes_succeed_in_pressure():
    dev = make(pool=32 * P, low=0.25, high=0.5)
    reference = bytearray(dev.size)
    nxt = fill_to_pressure(dev, reference)
    used = dev.pool.used_bytes
    # An incompressible page overwritten with compressible data needs less space.
    dev.write(0, text(P))
    reference[0:P] = text(P)
    # Same-filled and zero writes need no pool space at all.
    dev.write(nxt * P, word(0x77))
    reference[nxt * P:(nxt + 1) * P] = word(0x77)
    dev.write(P, bytes(P))
    reference[P:2 * P] = bytes(P)
    # Overwriting a huge page with another huge page reuses its slot.
    data = rand(P)
    dev.write(2 * P, data)
    reference[2 * P:3 * P] = data
    # A partial write that keeps the page incompressible reuses its slot too.
    dev.write(3 * P + 5, b"hello")
    reference[3 * P + 5:3 * P + 10] = b"hello"
    # (The compressed page may still open a new block of its size class: pool usage can
    # rise by a few frames although no page needs a larger slot.)
    assert dev.pool.used_bytes <= used + 8 * P
    assert dev.counters.failed_writes == 0
    check(dev, reference)


def test_pressure_clears_below_low_and_writes_resume():
    dev = make(pool=32 * P, low=0.25, high=0.5)
    reference = bytearray(dev.size)
    nxt = fill_to_pressure(dev, reference)
    page = 0
    while dev.watermarks.state is not State.OK:
        dev.write(page * P, bytes(P))
        reference[page * P:(page + 1) * P] = bytes(P)
        page += 1
    assert dev.pool.used_bytes < 0.25 * dev.pool.capacity
    dev.write(nxt * P, rand(P))
    assert dev.watermarks.events == {"high": 1, "low": 1, "full": 0}


def test_physically_full_under_reject_changes_nothing():
    dev = make(pool=16 * P, low=0.9, high=0.99)
    reference = bytearray(dev.size)
    for i in range(4):
        data = rand(P)
        dev.write(i * P, data)
        reference[i * P:(i + 1) * P] = data
    assert dev.watermarks.state is State.OK
    before = snapshot(dev)
    with pytest.raises(WriteRejected) as info:
        dev.write(10 * P, rand(20 * P))  # 20 huge pages, 12 frames free
    assert info.value.reason == REJECT_FULL
    after = snapshot(dev)
    for name in ("failed_writes", "reject_alloc_fail", "pool_limit_hit"):
        assert after["counters"].pop(name) == before["counters"].pop(name) + 1
    assert after["counters"]["rejected"].pop(REJECT_FULL) == before["counters"][
        "rejected"].pop(REJECT_FULL) + 1
    assert after == before
    assert dev.watermarks.state is State.FULL
    assert dev.watermarks.events[EVENT_FULL] == 1
    assert dev.pressure() == 1000
    check(dev, reference)
    # A release still works and clears the state (usage is far below low).
    dev.write(0, bytes(P))
    reference[0:P] = bytes(P)
    assert dev.watermarks.state is State.OK
    check(dev, reference)


def test_partial_write_exceeding_pool_is_rejected_atomically():
    dev = make(pool=8 * P, low=0.9, high=0.99)
    reference = bytearray(dev.size)
    data = text(3 * P)
    dev.write(0, data)
    reference[:3 * P] = data
    before = snapshot(dev)
    with pytest.raises(WriteRejected):
        dev.write(P // 2, rand(12 * P))  # partial head and tail pages, too big in total
    after = snapshot(dev)
    assert after["data"] == before["data"] and after["gauges"] == before["gauges"]
    check(dev, reference)


# -- write control: throttle ---------------------------------------------------------------


def test_throttle_delay_grows_with_pressure():
    dev = make(pool=64 * P, low=0.25, high=0.75, policy=Policy.THROTTLE,
               throttle_max_delay=0.1)
    page = 0
    while dev.watermarks.state is State.OK:  # no delay before pressure
        assert dev.write(page * P, rand(P)).delay == 0
        page += 1
    # At or above high the delay is the maximum; releases are never delayed.
    assert dev.pressure() == 1000
    assert dev.write(page * P, rand(P)).delay == pytest.approx(0.1)
    page += 1
    released = 0
    while dev.pool.used_bytes > 0.3 * dev.pool.capacity:
        assert dev.write(released * P, bytes(P)).delay == 0
        released += 1
    assert dev.watermarks.state is State.PRESSURE  # hysteresis: not yet below low
    delays = []
    while dev.pool.used_bytes < 0.75 * dev.pool.capacity:
        pressure = dev.pressure()
        result = dev.write(page * P, rand(P))
        assert result.delay == pytest.approx(0.1 * pressure / 1000)
        delays.append(result.delay)
        page += 1
    assert len(delays) > 3
    assert delays == sorted(delays) and delays[-1] > delays[0] > 0
    assert dev.counters.throttled_writes == len(delays) + 1
    assert dev.counters.throttle_seconds == pytest.approx(sum(delays) + 0.1)
    assert dev.counters.failed_writes == 0
    check(dev)


def test_throttle_still_rejects_when_physically_full():
    dev = make(pool=8 * P, policy=Policy.THROTTLE)
    with pytest.raises(WriteRejected) as info:
        dev.write(0, rand(9 * P))
    assert info.value.reason == REJECT_FULL
    assert dev.pool.used_bytes == 0 and dev.pages_stored == 0
    check(dev, bytearray(dev.size))


# -- policy none: emulated hardware failure ------------------------------------------------


def overcommit(mode: FailureMode):
    """8-frame pool, 12 same-filled pages (free), then 12 incompressible pages over them."""
    dev = make(pool=8 * P, policy=Policy.NONE, failure_mode=mode)
    reference = bytearray(dev.size)
    old = b"".join(word(0x1000 + i) for i in range(12))
    dev.write(0, old)
    reference[:12 * P] = old
    new = rand(12 * P)
    result = dev.write(0, new)
    return dev, reference, old, new, result


def test_none_drop_keeps_old_contents():
    dev, reference, old, new, result = overcommit(FailureMode.DROP)
    assert result.lost_pages == 4
    assert dev.lost == {8, 9, 10, 11}
    assert dev.counters.lost_writes == 4
    assert dev.counters.failed_writes == 0
    assert dev.watermarks.state is State.FULL
    assert dev.pool.used_bytes == dev.pool.capacity
    reference[:8 * P] = new[:8 * P]
    check(dev, reference)
    assert dev.read(9 * P, P) == old[9 * P:10 * P]
    # Free room and rewrite a lost page: it is no longer lost.
    dev.write(0, bytes(P))
    reference[:P] = bytes(P)
    data = rand(P)
    dev.write(9 * P, data)
    reference[9 * P:10 * P] = data
    assert dev.lost == {8, 10, 11}
    # A zero write to a lost page also clears it (it needs no space).
    dev.write(10 * P, bytes(P))
    reference[10 * P:11 * P] = bytes(P)
    assert dev.lost == {8, 11}
    check(dev, reference)


def test_none_poison_reads_fail_until_rewritten():
    dev, reference, old, new, result = overcommit(FailureMode.POISON)
    assert result.lost_pages == 4
    assert dev.poisoned == {8, 9, 10, 11}
    assert dev.counters.poisoned_writes == 4
    assert dev.read(0, 8 * P) == new[:8 * P]
    assert dev.read(12 * P, P) == bytes(P)
    for page in (8, 9, 10, 11):
        with pytest.raises(PoisonedPage) as info:
            dev.read(page * P + 100, 10)
        assert info.value.page == page
    with pytest.raises(PoisonedPage):
        dev.read(7 * P, 2 * P)  # spans a good and a poisoned page
    assert dev.counters.failed_reads == 5
    assert dev.io_stat()[0] == 5
    # A partial write cannot merge with a poisoned page: it is kept aside, the page stays
    # poisoned until its whole extent has been written.
    dev.write(8 * P + 1, b"x")
    assert 8 in dev.poisoned and dev.counters.failed_writes == 0
    # Rewriting the whole page clears the poison (once there is room).
    dev.write(0, bytes(2 * P))
    data = rand(P)
    dev.write(8 * P, data)
    assert 8 not in dev.poisoned
    assert dev.read(8 * P, P) == data
    dev.write(9 * P, word(3))  # same-filled: needs no room
    assert dev.read(9 * P, P) == word(3)
    assert dev.poisoned == {10, 11}
    check(dev)


def test_none_accepts_in_pressure():
    dev = make(pool=32 * P, low=0.25, high=0.5, policy=Policy.NONE)
    reference = bytearray(dev.size)
    nxt = fill_to_pressure(dev, reference)
    dev.write(nxt * P, rand(P))
    assert dev.counters.failed_writes == 0


# -- tunables ------------------------------------------------------------------------------


def test_set_watermarks_takes_effect_at_once():
    dev = make(pool=32 * P)
    for i in range(16):
        dev.write(i * P, rand(P))
    assert dev.watermarks.state is State.OK
    dev.set_watermarks(low=0.2, high=0.4)
    assert dev.watermarks.state is State.PRESSURE
    with pytest.raises(WriteRejected):
        dev.write(100 * P, rand(P))
    dev.set_watermarks(low=0.6, high=0.7)
    assert dev.watermarks.state is State.OK
    dev.write(100 * P, rand(P))


@pytest.mark.parametrize(("low", "high"), [(0.95, None), (None, 0.5), (0.5, 0.5), (-1, None),
                                           (None, 1.5), ("x", None)])
def test_bad_watermarks_change_nothing(low, high):
    dev = make()
    before = (dev.watermarks.low, dev.watermarks.high, dev.watermarks.state)
    with pytest.raises(ValueError):
        dev.set_watermarks(low, high)
    assert (dev.watermarks.low, dev.watermarks.high, dev.watermarks.state) == before


def test_ratios_and_headroom():
    dev = make(pool=64 * P)
    assert dev.effective_ratio() == 0.0 and dev.compression_ratio() == 0.0
    assert dev.allocator_efficiency() == 1.0
    assert dev.headroom() == int(64 * P * 0.9)
    dev.write(0, text(16 * P))
    assert 0 < dev.compression_ratio() < 0.5
    assert dev.effective_ratio() > 1
    assert 0 < dev.allocator_efficiency() <= 1
    dev.reset_max()
    assert dev.mm_stat()[4] == dev.pool.used_bytes


def test_watermark_listeners_see_device_transitions():
    dev = make(pool=32 * P, low=0.25, high=0.5)
    seen = []
    dev.watermarks.subscribe(lambda old, new: seen.append((old.value, new.value)))
    reference = bytearray(dev.size)
    fill_to_pressure(dev, reference)
    dev.write(0, bytes(dev.size))
    assert seen == [("ok", "pressure"), ("pressure", "ok")]
    assert dev.watermarks.generation == 2


# -- discard (fallocate PUNCH_HOLE / ZERO_RANGE) ---------------------------------------------


def test_discard_releases_whole_pages_and_zeroes_the_edges_in_place():
    dev = make()
    data = rand(8 * P, 7)  # huge pages: a frame each
    dev.write(0, data)
    used = dev.pool.used_bytes
    released = dev.discard(P + 100, 4 * P)  # edge pages 1 and 5, whole pages 2..4
    assert released == 3
    expected = bytearray(data)
    expected[P + 100:5 * P + 100] = bytes(4 * P)
    assert dev.read(0, 8 * P) == bytes(expected)
    assert [dev.table.state(i) for i in (2, 3, 4)] == [0, 0, 0]
    assert dev.pages_stored == 5
    assert dev.pool.used_bytes == used - 3 * P
    assert dev.counters.notify_free == 3 == dev.counters.discarded_pages
    assert dev.counters.discard_requests == 1
    assert dev.io_stat()[3] == 3
    check(dev)


def test_discard_counts_every_whole_page_as_zram_does_stored_or_not():
    dev = make()
    dev.write(0, text(P))
    assert dev.discard(0, 16 * P) == 1
    assert dev.counters.notify_free == 16
    assert dev.pages_stored == 0 and dev.pool.used_bytes == 0
    check(dev)


def test_discard_inside_one_page_is_a_partial_zero():
    dev = make()
    dev.write(0, text(P, 3))
    assert dev.discard(10, 20) == 0
    assert dev.read(0, P) == text(P, 3)[:10] + bytes(20) + text(P, 3)[30:]
    assert dev.counters.notify_free == 0
    check(dev)


def test_discard_out_of_range_changes_nothing():
    dev = make()
    dev.write(0, text(P))
    before = snapshot(dev)
    for offset, length in ((dev.size - P, 2 * P), (-P, P), (0, dev.size + 1)):
        with pytest.raises(OutOfRange):
            dev.discard(offset, length)
    before["counters"]["invalid_io"] += 3
    assert snapshot(dev) == before


def test_discard_clears_poison_and_loss_of_whole_pages():
    dev = make(pool=4 * P, policy=Policy.NONE, failure_mode=FailureMode.POISON, high=1.0,
               low=0.9)
    dev.write(0, rand(8 * P, 1))  # four fit, four are poisoned
    assert dev.poisoned
    dev.discard(0, 8 * P)
    assert not dev.poisoned
    assert dev.read(0, 8 * P) == bytes(8 * P)
    assert dev.pool.used_bytes == 0
    check(dev)


def test_discard_of_a_poisoned_edge_fails_and_changes_nothing():
    dev = make(pool=1 * P, policy=Policy.NONE, failure_mode=FailureMode.POISON, high=1.0,
               low=0.9)
    dev.write(0, rand(2 * P, 2))
    assert 1 in dev.poisoned
    before = snapshot(dev)
    with pytest.raises(PoisonedPage):
        dev.discard(P + 10, 100)
    before["counters"]["failed_writes"] += 1
    assert snapshot(dev) == before


def test_discard_is_never_refused_by_write_control():
    dev = make(pool=8 * P, low=0.1, high=0.2)
    dev.write(0, rand(2 * P, 4))
    assert dev.watermarks.state is not State.OK
    dev.discard(0, 2 * P)
    assert dev.pool.used_bytes == 0
    assert dev.watermarks.state is State.OK


def test_discard_waits_for_the_zero_flush_when_the_device_batches_it():
    dev = make(zero_flush_interval=1.0)
    dev.write(0, rand(4 * P, 5))
    dev.discard(0, 4 * P)
    assert dev.pages_stored == 0 and dev.read(0, 4 * P) == bytes(4 * P)
    assert dev.pool.used_bytes == 4 * P == dev.releasing_bytes
    assert dev.flush_releases() == 4
    assert dev.pool.used_bytes == 0
    check(dev)


# -- zram's other compressors ------------------------------------------------------------------

@pytest.mark.parametrize("compressor", ["zstd", "lz4", "lz4hc", "lzo", "deflate"])
def test_every_compressor_stores_and_reads_back(compressor):
    dev = make(compressor=compressor, pool=512 * P)  # room for everything: no write control
    reference = bytearray(dev.size)
    rng = random.Random(9)
    for _ in range(150):
        offset, length = rng.randrange(dev.size - 8 * P), rng.randrange(1, 8 * P)
        data = rng.choice([text(length, rng.randrange(99)), rand(length, rng.randrange(99)),
                           word(rng.randrange(1, 9), 8)[:length], bytes(length)])
        dev.write(offset, data)
        reference[offset:offset + length] = data
    check(dev, reference)
    assert dev.codec.compressor == compressor
    assert 0 < dev.compr_data_size < dev.pages_stored * P  # it compressed something
    dev.close()


def test_level_defaults_follow_the_compressor():
    assert make(compressor="lzo").codec.level is None
    assert make(compressor="lz4hc").codec.level == 9
    assert make().codec.level == -1
    with pytest.raises(ValueError, match="lzo takes no level"):
        DeviceConfig(size=P, pool=P, compressor="lzo", level=1)
    with pytest.raises(ValueError, match="unknown compressor"):
        DeviceConfig(size=P, pool=P, compressor="lzo-rle")


def test_a_poisoned_page_written_whole_in_pieces_is_mended():
    """The kernel splits a write(2) where the caller's O_DIRECT buffer is: 1 MiB - 48 B, then
    48 B. Each piece of a poisoned page is kept aside; the page takes them once its whole
    extent is written, however it was split, and reads back right."""
    dev, reference, old, new, result = overcommit(FailureMode.POISON)
    dev.write(0, bytes(8 * P))  # make room
    page = rand(P, 3)
    dev.write(8 * P + 48, page[48:])  # the big piece first: the page is still poisoned
    assert 8 in dev.poisoned
    with pytest.raises(PoisonedPage):
        dev.read(8 * P, P)
    dev.write(8 * P, page[:48])
    assert 8 not in dev.poisoned and not dev.mending
    assert dev.read(8 * P, P) == page
    # a request spanning two pages that ends mid-page in a poisoned one, then the rest
    data = rand(P + 100, 4)
    dev.write(9 * P - 100, data[:P + 60])  # page 8's last 100 bytes + page 9 but 40 bytes
    assert 9 in dev.poisoned and dev.read(8 * P, P)[-100:] == data[:100]
    dev.write(10 * P - 40, data[P + 60:])
    assert 9 not in dev.poisoned
    assert dev.read(9 * P, P) == data[100:]
    check(dev)
