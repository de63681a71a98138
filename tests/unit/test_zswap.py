"""The zswap device: pool limit with hysteresis, backing file, CLOCK writeback, placement."""

from __future__ import annotations

import os
import random

import pytest

from cramfs import PAGE_SIZE
from cramfs import pagetable as pt
from cramfs.device import DeviceConfig
from cramfs.zswap import ZswapDevice

P = PAGE_SIZE
# mm/zswap.c's debugfs files (Linux 6.18), in its order.
KERNEL_DEBUGFS = ("pool_limit_hit", "reject_reclaim_fail", "reject_alloc_fail",
                  "reject_kmemcache_fail", "reject_compress_fail", "reject_compress_poor",
                  "decompress_fail", "written_back_pages", "pool_total_size", "stored_pages",
                  "stored_incompressible_pages")
GAUGES = ("pages_stored", "same_pages", "huge_pages", "compr_data_size", "backing_pages")


def text_page(i: int, gen: int = 0) -> bytes:
    line = f"{i:06d}.{gen} alpha beta gamma delta page swap zram zswap node pool\n".encode()
    return (line * (P // len(line) + 1))[:P]


def half_page(i: int, gen: int = 0) -> bytes:
    """About 2 KiB of noise then zeros: compresses to ~2 KiB (a pool object, not huge)."""
    rng = random.Random(i * 7919 + gen)
    n = 1800 + rng.randrange(400)
    return rng.randbytes(n) + bytes(P - n)


def random_page(i: int, gen: int = 0) -> bytes:
    return random.Random(f"{i}:{gen}").randbytes(P)


def make(tmp_path, pages=256, pool_pages=64, max_pool=100, accept=90, **kw) -> ZswapDevice:
    return ZswapDevice(DeviceConfig(size=pages * P, pool=pool_pages * P, **kw),
                       backing_file=tmp_path / "backing.img", max_pool_percent=max_pool,
                       accept_threshold_percent=accept)


@pytest.fixture
def dev(tmp_path):
    device = make(tmp_path)
    yield device
    device.close()


def check(dev: ZswapDevice) -> None:
    counts = dev.recount()
    assert counts == {g: getattr(dev, g) for g in GAUGES}
    dev.pool.check()
    assert dev.used_bytes <= dev.pool_limit, (dev.used_bytes, dev.pool_limit)
    backing = [i for i in range(dev.pages) if dev.table.state(i) == pt.BACKING]
    assert len(backing) == dev.backing_pages
    # the backing file holds exactly the pages that live there (blocks are punched out)
    assert dev.backing.allocated_bytes() == len(backing) * P


def states(dev: ZswapDevice, pages) -> list[str]:
    return [pt.STATE_NAMES[dev.table.state(i)] for i in pages]


# -- placement ------------------------------------------------------------------------------

def test_each_kind_of_page_lands_in_one_place(dev):
    dev.write(0, bytes(P))
    dev.write(P, b"\xab" * P)
    dev.write(2 * P, text_page(2))
    dev.write(3 * P, random_page(3))
    assert states(dev, range(5)) == ["empty", "same", "compressed", "backing", "empty"]
    assert dev.counters.reject_compress_poor == 1
    assert dev.backing_pages == 1 and dev.same_pages == 1 and dev.huge_pages == 0
    assert dev.read(0, 4 * P) == bytes(P) + b"\xab" * P + text_page(2) + random_page(3)
    # the random page is in the file, raw, at its own offset
    with open(dev.backing.path, "rb") as f:
        f.seek(3 * P)
        assert f.read(P) == random_page(3)
    check(dev)


def test_debugfs_names_match_the_kernel(dev):
    stats = dev.debugfs()
    assert tuple(stats) == KERNEL_DEBUGFS
    assert all(isinstance(v, int) for v in stats.values())
    dev.write(0, text_page(0) + random_page(1) + b"\x01" * P)
    stats = dev.debugfs()
    assert stats["stored_pages"] == 2  # the compressed and the same-filled page
    assert stats["reject_compress_poor"] == 1
    assert stats["pool_total_size"] == dev.used_bytes > 0
    assert stats["stored_incompressible_pages"] == 0
    assert stats["written_back_pages"] == 0


def test_incompressible_pages_go_to_backing(dev):
    data = b"".join(random_page(i) for i in range(16))
    dev.write(32 * P, data)
    assert states(dev, range(32, 48)) == ["backing"] * 16
    assert dev.counters.reject_compress_poor == 16
    assert dev.used_bytes == 0
    assert dev.backing.allocated_bytes() == 16 * P
    assert dev.read(32 * P, 16 * P) == data
    check(dev)


def test_partial_write_into_backing_page(dev):
    dev.write(5 * P, random_page(5))
    assert states(dev, [5]) == ["backing"]
    dev.write(5 * P + 100, b"hello")
    want = bytearray(random_page(5))
    want[100:105] = b"hello"
    assert dev.read(5 * P, P) == bytes(want)
    assert states(dev, [5]) == ["backing"]
    check(dev)


# -- the limit and its hysteresis -----------------------------------------------------------

def test_pool_never_above_limit_and_overflow_goes_to_backing(tmp_path):
    dev = make(tmp_path, pages=512, pool_pages=64, max_pool=50, accept=80)
    try:
        assert dev.pool_limit == 32 * P
        pages = [half_page(i) for i in range(200)]
        for i, page in enumerate(pages):
            dev.write(i * P, page)
            assert dev.used_bytes <= dev.pool_limit
        assert dev.counters.pool_limit_hit >= 1
        assert dev.limit_reached
        assert dev.backing_pages > 0
        assert dev.counters.reject_compress_poor == 0  # they went there for lack of room
        for i, page in enumerate(pages):
            assert dev.read(i * P, P) == page, i
        check(dev)
    finally:
        dev.close()


def test_pool_limit_holds_for_every_size_class(tmp_path):
    """A store may need a new block of up to 8 frames; the limit must still hold."""
    dev = make(tmp_path, pages=256, pool_pages=256, max_pool=10, accept=90)
    try:
        rng = random.Random(1)
        for i in range(256):
            n = rng.randrange(200, 3000)
            dev.write(i * P, rng.randbytes(n) + bytes(P - n))
            assert dev.used_bytes <= dev.pool_limit, (i, dev.used_bytes, dev.pool_limit)
        check(dev)
    finally:
        dev.close()


def test_hysteresis_refuses_until_below_accept_threshold(tmp_path):
    dev = make(tmp_path, pages=512, pool_pages=64, max_pool=50, accept=50)
    try:
        limit, accept = dev.pool_limit, dev.accept_bytes
        assert accept == limit // 2
        i = 0
        while not dev.limit_reached:
            dev.write(i * P, half_page(i))
            i += 1
        hits = dev.counters.pool_limit_hit
        assert hits == 1
        assert states(dev, [i - 1]) == ["backing"]  # the store that hit the limit
        # free a little, but stay at or above the accept threshold: still refused
        pool_pages = [j for j in range(i) if dev.table.state(j) == pt.COMPRESSED]
        while dev.used_bytes >= accept + 4 * P and pool_pages:
            dev.write(pool_pages.pop() * P, bytes(P))
        assert dev.used_bytes >= accept
        dev.write(400 * P, text_page(400))
        assert states(dev, [400]) == ["backing"], "stored while above the accept threshold"
        # below the threshold the pool takes pages again
        while dev.used_bytes >= accept and pool_pages:
            dev.write(pool_pages.pop() * P, bytes(P))
        assert dev.used_bytes < accept
        dev.write(401 * P, text_page(401))
        assert states(dev, [401]) == ["compressed"]
        assert not dev.limit_reached
        assert dev.read(400 * P, 2 * P) == text_page(400) + text_page(401)
        check(dev)
    finally:
        dev.close()


def test_limit_hit_counts_each_time(tmp_path):
    dev = make(tmp_path, pages=512, pool_pages=32, max_pool=100, accept=10)
    try:
        for round_ in range(3):
            i = 0
            while not dev.limit_reached:
                dev.write(i * P, half_page(i, round_))
                i += 1
            assert dev.counters.pool_limit_hit == round_ + 1
            dev.write(0, bytes(dev.size))  # release everything
            assert dev.used_bytes == 0
            dev.write(0, text_page(0))  # below the threshold: accepted, clears the flag
            assert states(dev, [0]) == ["compressed"] and not dev.limit_reached
        check(dev)
    finally:
        dev.close()


def test_set_limits(dev):
    dev.set_limits(max_pool_percent=50)
    assert (dev.max_pool_percent, dev.accept_threshold_percent) == (50, 90)
    assert dev.pool_limit == dev.pool.capacity // 2
    dev.set_limits(accept_threshold_percent=0)
    assert dev.accept_bytes == 0
    dev.set_limits(100, 100)
    assert dev.accept_bytes == dev.pool_limit == dev.pool.capacity


@pytest.mark.parametrize("kwargs", [
    {"max_pool_percent": 0}, {"max_pool_percent": 101}, {"max_pool_percent": 50.0},
    {"max_pool_percent": True}, {"accept_threshold_percent": -1},
    {"accept_threshold_percent": 101}, {"accept_threshold_percent": "90"},
    {"max_pool_percent": 30, "accept_threshold_percent": 200},
])
def test_bad_percents_raise_and_change_nothing(dev, kwargs):
    dev.set_limits(40, 70)
    with pytest.raises(ValueError, match="percent"):
        dev.set_limits(**kwargs)
    assert (dev.max_pool_percent, dev.accept_threshold_percent) == (40, 70)


@pytest.mark.parametrize("max_pool,accept", [(0, 90), (101, 90), (20, 101), (20, -5)])
def test_bad_percents_at_construction(tmp_path, max_pool, accept):
    with pytest.raises(ValueError, match="percent"):
        make(tmp_path, max_pool=max_pool, accept=accept)
    assert not (tmp_path / "backing.img").exists()  # validated before anything is created


def test_missing_backing_directory_is_a_clear_oserror(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "backing.img"
    with pytest.raises(OSError) as info:
        ZswapDevice(DeviceConfig(size=64 * P, pool=16 * P), backing_file=missing)
    assert isinstance(info.value, FileNotFoundError)
    assert str(missing.parent) in str(info.value)
    assert "does not exist" in str(info.value)


def test_backing_file_is_created_sparse_and_truncated(tmp_path):
    path = tmp_path / "backing.img"
    path.write_bytes(b"stale" * 100_000)
    dev = make(tmp_path)
    try:
        assert path.stat().st_size == dev.size
        assert dev.backing.allocated_bytes() == 0  # truncated: nothing stale, all holes
        assert dev.read(0, P) == bytes(P)
    finally:
        dev.close()


# -- writeback (the shrinker) ---------------------------------------------------------------

def fill_pool(dev: ZswapDevice, count: int, gen: int = 0) -> list[bytes]:
    pages = [text_page(i, gen) if i % 2 else half_page(i, gen) for i in range(count)]
    dev.write(0, b"".join(pages))
    return pages


def test_writeback_second_chance(tmp_path):
    dev = make(tmp_path, pages=128, pool_pages=512, max_pool=100, accept=0)
    try:
        pages = fill_pool(dev, 32)
        assert all(s in ("compressed",) for s in states(dev, range(32)))
        # everything was just stored (referenced): the first pass only clears the bits
        assert dev.writeback(max_pages=1000, max_scan=dev.pages) == 0
        assert dev.counters.written_back_pages == 0
        # pages touched since that pass survive the next one
        hot = {3, 10, 17}
        for i in hot:
            assert dev.read(i * P, P) == pages[i]
        dev.write(20 * P, text_page(20, 1))
        pages[20] = text_page(20, 1)
        hot.add(20)
        written = dev.writeback(max_pages=1000, max_scan=dev.pages)
        assert written == 32 - len(hot)
        assert dev.counters.written_back_pages == written
        for i in range(32):
            want = "compressed" if i in hot else "backing"
            assert states(dev, [i]) == [want], i
        # and go on the pass after
        assert dev.writeback(max_pages=1000, max_scan=dev.pages) == len(hot)
        assert dev.used_bytes == 0
        assert dev.backing_pages == 32
        assert dev.read(0, 32 * P) == b"".join(pages)  # from the backing file
        check(dev)
    finally:
        dev.close()


def test_writeback_stops_at_accept_threshold_and_max_pages(tmp_path):
    # the 60 pages take ~27 of the 64 frames: above the accept threshold (30%: 19 frames)
    dev = make(tmp_path, pages=256, pool_pages=64, max_pool=100, accept=30)
    try:
        pages = fill_pool(dev, 60)
        assert dev.needs_writeback()
        dev.writeback(max_pages=1000, max_scan=dev.pages)  # clear the referenced bits
        assert dev.writeback(max_pages=3) == 3
        assert dev.counters.written_back_pages == 3
        while dev.needs_writeback():
            assert dev.writeback(max_pages=8) > 0
        assert dev.used_bytes <= dev.accept_bytes
        assert dev.writeback() == 0  # nothing to do below the threshold
        assert 0 < dev.backing_pages < 60
        assert dev.read(0, 60 * P) == b"".join(pages)
        check(dev)
    finally:
        dev.close()


def test_written_back_pages_read_from_the_backing_file(tmp_path):
    dev = make(tmp_path, pages=64, pool_pages=64, accept=0)
    try:
        pages = fill_pool(dev, 16)
        dev.writeback(max_pages=100, max_scan=dev.pages)
        dev.writeback(max_pages=100, max_scan=dev.pages)
        assert states(dev, range(16)) == ["backing"] * 16
        with open(dev.backing.path, "rb") as f:
            assert f.read(16 * P) == b"".join(pages)
        assert dev.read(0, 16 * P) == b"".join(pages)
        assert dev.debugfs()["stored_pages"] == 0
        check(dev)
    finally:
        dev.close()


def test_overwrite_and_zero_free_the_old_location(tmp_path):
    dev = make(tmp_path, pages=64, pool_pages=64, accept=0)
    try:
        fill_pool(dev, 8)
        dev.write(8 * P, b"".join(random_page(i) for i in range(8, 12)))
        dev.writeback(max_pages=100, max_scan=dev.pages)
        dev.writeback(max_pages=100, max_scan=dev.pages)
        assert dev.backing_pages == 12
        allocated = dev.backing.allocated_bytes()
        assert allocated == 12 * P
        # zero write of a backing page: punched
        dev.write(0, bytes(P))
        assert states(dev, [0]) == ["empty"]
        assert dev.backing.allocated_bytes() == allocated - P
        # same-filled overwrite of a backing page: punched
        dev.write(1 * P, b"\x07" * P)
        assert states(dev, [1]) == ["same"]
        assert dev.backing.allocated_bytes() == allocated - 2 * P
        # compressible overwrite: back in the pool, block punched
        dev.write(2 * P, text_page(2, 9))
        assert states(dev, [2]) == ["compressed"]
        assert dev.backing.allocated_bytes() == allocated - 3 * P
        # incompressible overwrite of a backing page: still one block, new contents
        dev.write(8 * P, random_page(8, 9))
        assert states(dev, [8]) == ["backing"]
        assert dev.backing.allocated_bytes() == allocated - 3 * P
        assert dev.read(8 * P, P) == random_page(8, 9)
        # incompressible overwrite of a pool page: pool slot freed
        used = dev.used_bytes
        dev.write(2 * P, random_page(2, 10))
        assert states(dev, [2]) == ["backing"]
        assert dev.used_bytes < used or dev.used_bytes == 0
        # zero write of a pool page frees the slot
        dev.write(20 * P, text_page(20))
        assert dev.used_bytes > 0
        dev.write(20 * P, bytes(P))
        assert states(dev, [20]) == ["empty"]
        assert dev.counters.notify_free == 2
        check(dev)
    finally:
        dev.close()


def test_zero_flush_interval_on_zswap(tmp_path):
    dev = make(tmp_path, pages=64, pool_pages=64, zero_flush_interval=1.0)
    try:
        fill_pool(dev, 8)
        used = dev.used_bytes
        dev.write(0, bytes(8 * P))
        assert dev.used_bytes == used and dev.releasing_bytes > 0
        check(dev)
        dev.flush_releases()
        assert dev.used_bytes == 0
        check(dev)
    finally:
        dev.close()


def test_backing_write_error_is_reported_and_changes_nothing(tmp_path, monkeypatch):
    dev = make(tmp_path)
    try:
        dev.write(0, text_page(0))
        before = dev.read(0, 4 * P)

        def full(index, page):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(dev.backing, "write", full)
        from cramfs.errors import BackingError

        with pytest.raises(BackingError):
            dev.write(0, text_page(0, 1) + random_page(1) + b"\x09" * P)
        assert dev.counters.backing_write_errors == 1
        assert dev.read(0, 4 * P) == before
        check(dev)
    finally:
        dev.close()


def test_writeback_keeps_going_when_the_backing_file_fails(tmp_path, monkeypatch):
    dev = make(tmp_path, pages=64, pool_pages=64, accept=0)
    try:
        pages = fill_pool(dev, 8)
        dev.writeback(max_pages=100, max_scan=dev.pages)

        def failing(index, page):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(dev.backing, "write", failing)
        assert dev.writeback(max_pages=100, max_scan=dev.pages) == 0
        assert dev.counters.reject_reclaim_fail > 0
        assert states(dev, range(8)) == ["compressed"] * 8
        assert dev.read(0, 8 * P) == b"".join(pages)
        check(dev)
    finally:
        dev.close()


def test_random_mixed_traffic_stays_consistent(tmp_path):
    dev = make(tmp_path, pages=256, pool_pages=32, max_pool=75, accept=60)
    rng = random.Random(5)
    model = [bytes(P)] * 256
    makers = [text_page, half_page, random_page, lambda i, g: bytes(P),
              lambda i, g: bytes([g % 251 + 1]) * P]
    try:
        for step in range(1500):
            i = rng.randrange(256)
            n = min(rng.choice([1, 1, 2, 8]), 256 - i)
            pages = [rng.choice(makers)(i + k, step) for k in range(n)]
            dev.write(i * P, b"".join(pages))
            model[i:i + n] = pages
            if rng.random() < 0.2:
                dev.writeback(max_pages=rng.randrange(1, 32))
            if rng.random() < 0.1:
                j = rng.randrange(256)
                assert dev.read(j * P, P) == model[j]
            assert dev.used_bytes <= dev.pool_limit
        check(dev)
        assert dev.read(0, 256 * P) == b"".join(model)
    finally:
        dev.close()


def test_close_releases_the_backing_fd(tmp_path):
    dev = make(tmp_path)
    fd = dev.backing._fd
    dev.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_discard_frees_pool_and_backing_pages_and_punches_the_file(dev):
    for i in range(8):
        dev.write(i * P, random_page(i) if i % 2 else text_page(i))  # odd pages to backing
    assert dev.backing_pages == 4
    dev.discard(0, 8 * P)
    assert dev.pages_stored == 0 and dev.backing_pages == 0 and dev.used_bytes == 0
    assert dev.backing.allocated_bytes() == 0
    assert dev.read(0, 8 * P) == bytes(8 * P)
    assert dev.counters.notify_free == 8
    check(dev)


def test_writeback_sweeps_a_sparse_device(tmp_path):
    """The CLOCK hand walks the stored chunks only (absent ones are jumped over without
    using ``max_scan``) and finds pool pages far apart in a device much larger than what it
    holds."""
    dev = ZswapDevice(DeviceConfig(size=64 << 30, pool=512 * P),
                      backing_file=tmp_path / "backing.img", max_pool_percent=100,
                      accept_threshold_percent=0)
    try:
        far = [5, pt.CHUNK_PAGES - 1, pt.CHUNK_PAGES, 3_000_000, dev.pages - 1]
        for i in far:
            dev.write(i * P, text_page(i))
        assert dev.writeback(max_pages=1000, max_scan=1000) == 0  # clears bits 5, 511, 512
        assert dev._hand == 1000
        # the rest of chunk 1, then straight to the two far chunks: 24 + 512 + 512 pages
        assert dev.writeback(max_pages=1000, max_scan=24 + 2 * pt.CHUNK_PAGES) == 0
        assert dev._hand == 0
        assert dev.writeback(max_pages=2, max_scan=dev.pages) == 2
        assert [dev.table.state(i) for i in far] == [pt.BACKING] * 2 + [pt.COMPRESSED] * 3
        assert dev._hand == pt.CHUNK_PAGES  # stopped right after the second page
        assert dev.writeback(max_pages=1000, max_scan=dev.pages) == 3
        assert all(dev.read(i * P, P) == text_page(i) for i in far)
        assert dev.recount()["backing_pages"] == 5 == dev.backing_pages
        assert len(dev.table.chunks) == 4
    finally:
        dev.close()


def test_write_control_stays_off_whoever_asks(tmp_path):
    """The device refuses a policy that refuses writes itself: through set_policy, the
    attribute, or the gate, and the pool limit then still sends pages to the backing file."""
    from cramfs.watermarks import Policy

    dev = make(tmp_path, pages=64, pool_pages=16, max_pool=50)
    try:
        for attempt in (lambda: dev.set_policy(Policy.REJECT),
                        lambda: setattr(dev, "policy", Policy.THROTTLE),
                        lambda: setattr(dev, "no_alloc", True)):
            with pytest.raises(ValueError, match="never refuses"):
                attempt()
        assert dev.policy is Policy.NONE and not dev.no_alloc
        pages = [random_page(i) for i in range(64)]
        dev.write(0, b"".join(pages))  # far past the pool: nothing refused
        assert dev.counters.failed_writes == 0 and dev.backing_pages > 0
        assert dev.read(0, 64 * P) == b"".join(pages)
        check(dev)
    finally:
        dev.close()
