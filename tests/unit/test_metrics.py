"""daemon.metrics: the exposition read live off the devices, latency, the endpoint, the docs."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cramfs import PAGE_SIZE
from cramfs.device import CompressedDevice, DeviceConfig
from cramfs.errors import OutOfRange, PoisonedPage, WriteRejected
from cramfs.watermarks import FailureMode, Policy
from daemon import config as configuration
from daemon.addresses import parse_address
from daemon.devices import DeviceEntry
from daemon.metrics import (
    LATENCY_BUCKETS,
    OBJECT_BUCKETS,
    Metrics,
    MetricsAddressError,
)

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
REQUIRE = os.environ.get("CRAMFS_REQUIRE_E2E") == "1"

# family name (as the parser reports it) -> (type, label names besides "le")
EXPECTED = {
    "cramfs_device_info": ("gauge", {"device", "kind", "compressor", "level"}),
    "cramfs_device_size_bytes": ("gauge", {"device"}),
    "cramfs_pool_capacity_bytes": ("gauge", {"device"}),
    "cramfs_pool_used_bytes": ("gauge", {"device"}),
    "cramfs_pool_used_max_bytes": ("gauge", {"device"}),
    "cramfs_stored_pages": ("gauge", {"device"}),
    "cramfs_same_pages": ("gauge", {"device"}),
    "cramfs_huge_pages": ("gauge", {"device"}),
    "cramfs_compressed_bytes": ("gauge", {"device"}),
    "cramfs_original_bytes": ("gauge", {"device"}),
    "cramfs_compression_ratio": ("gauge", {"device"}),
    "cramfs_effective_ratio": ("gauge", {"device"}),
    "cramfs_allocator_efficiency": ("gauge", {"device"}),
    "cramfs_pressure": ("gauge", {"device"}),
    "cramfs_headroom_bytes": ("gauge", {"device"}),
    "cramfs_watermark_low_ratio": ("gauge", {"device"}),
    "cramfs_watermark_high_ratio": ("gauge", {"device"}),
    "cramfs_watermark_state": ("gauge", {"device", "state"}),
    "cramfs_watermark_last_change_timestamp_seconds": ("gauge", {"device"}),
    "cramfs_poisoned_pages": ("gauge", {"device"}),
    "cramfs_io_requests": ("counter", {"device", "op"}),
    "cramfs_io_bytes": ("counter", {"device", "op"}),
    "cramfs_failed_io": ("counter", {"device", "op"}),
    "cramfs_invalid_io": ("counter", {"device"}),
    "cramfs_released_pages": ("counter", {"device"}),
    "cramfs_discarded_pages": ("counter", {"device"}),
    "cramfs_discard_requests": ("counter", {"device"}),
    "cramfs_rejected_writes": ("counter", {"device", "reason"}),
    "cramfs_lost_pages": ("counter", {"device", "mode"}),
    "cramfs_throttled_writes": ("counter", {"device"}),
    "cramfs_throttle_seconds": ("counter", {"device"}),
    "cramfs_watermark_events": ("counter", {"device", "event"}),
    "cramfs_pages_compacted": ("counter", {"device"}),
    "cramfs_huge_pages_stored": ("counter", {"device"}),
    "cramfs_reject_compress_poor": ("counter", {"device"}),
    "cramfs_pool_limit_hit": ("counter", {"device"}),
    "cramfs_written_back_pages": ("counter", {"device"}),
    "cramfs_backing_pages": ("gauge", {"device"}),
    "cramfs_pool_resident_bytes": ("gauge", {"device"}),
    "cramfs_zero_pending_bytes": ("gauge", {"device"}),
    "cramfs_injected_errors": ("counter", {"device", "op"}),
    "cramfs_safe_pages": ("gauge", {"device"}),
    "cramfs_zratio": ("gauge", {"device"}),
    "cramfs_balloon_pages": ("gauge", {"device"}),
    "cramfs_no_alloc": ("gauge", {"device"}),
    "cramfs_interrupts": ("counter", {"device", "fate"}),
    "cramfs_refusal_storms": ("counter", {"device"}),
    "cramfs_refusal_storm": ("gauge", {"device"}),
    "cramfs_stored_object_bytes": ("histogram", {"device"}),  # a gauge histogram
    "cramfs_stored_object_bytes_gcount": ("gauge", {"device"}),
    "cramfs_stored_object_bytes_gsum": ("gauge", {"device"}),
    "cramfs_request_duration_seconds": ("histogram", {"device", "op"}),
}


# -- helpers ------------------------------------------------------------------------------
def make_device(size: int = 16 * MiB, pool: int = 4 * MiB, **kw) -> CompressedDevice:
    return CompressedDevice(DeviceConfig(size=size, pool=pool, threads=1, **kw))


def counter_pages(count: int, start: int = 0) -> bytes:
    """Pages that compress to a few dozen bytes and are not same-filled (a counter + zeros)."""
    buf = bytearray(count * PAGE_SIZE)
    for i in range(count):
        struct.pack_into("<Q", buf, i * PAGE_SIZE, start + i + 1)
    return bytes(buf)


def text_pages(count: int) -> bytes:
    line = b"the quick brown fox jumps over the lazy dog %d\n"
    out = b"".join(line % i for i in range(count * PAGE_SIZE // len(line) + 1))
    return out[:count * PAGE_SIZE]


def scrape(metrics: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def value(families: dict, sample: str, **labels) -> float:
    """The one sample called ``sample`` whose labels include ``labels``."""
    found = [s.value for f in families.values() for s in f.samples
             if s.name == sample and labels.items() <= s.labels.items()]
    assert len(found) == 1, (sample, labels, found)
    return found[0]


@pytest.fixture
def dev():
    device = make_device()
    yield device
    device.close()


@pytest.fixture
def metrics(dev):
    return Metrics(lambda: [DeviceEntry("swap0", "swap", dev)])


# -- families -----------------------------------------------------------------------------
def test_every_family_has_its_type_and_labels(dev, metrics):
    dev.write(0, text_pages(8))
    metrics.observe("swap0", "write", 0.0002)
    families = scrape(metrics)
    assert set(families) == set(EXPECTED)
    for name, (mtype, labels) in EXPECTED.items():
        family = families[name]
        assert family.type == mtype, name
        assert family.samples, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
            assert sample.labels["device"] == "swap0"
        assert family.documentation, name


def test_kind_label_only_on_device_info(dev):
    other = make_device()
    try:
        m = Metrics(lambda: [DeviceEntry("swap0", "swap", dev), DeviceEntry("n0", "node", other)])
        families = scrape(m)
        kinds = {s.labels["device"]: s.labels["kind"]
                 for s in families["cramfs_device_info"].samples}
        assert kinds == {"swap0": "swap", "n0": "node"}
        assert all(s.value == 1 for s in families["cramfs_device_info"].samples)
        for name, family in families.items():
            if name != "cramfs_device_info":
                assert all("kind" not in s.labels for s in family.samples), name
        # every per-device family has a series for each device
        assert {s.labels["device"] for s in families["cramfs_stored_pages"].samples} == {
            "swap0", "n0"}
    finally:
        other.close()


def test_no_devices_renders_empty_families():
    m = Metrics(lambda: [])
    families = scrape(m)
    assert all(not f.samples for f in families.values())


# -- values follow the device -------------------------------------------------------------
def test_io_counters_move_by_exactly_the_bytes(dev, metrics):
    before = scrape(metrics)
    assert value(before, "cramfs_io_bytes_total", op="write") == 0
    writes = [(0, text_pages(3)), (5 * PAGE_SIZE, b"x" * 1000), (MiB, counter_pages(16))]
    for offset, data in writes:
        dev.write(offset, data)
    reads = [(0, 4096), (100, 5000), (MiB, 16 * PAGE_SIZE)]
    for offset, length in reads:
        assert len(dev.read(offset, length)) == length
    after = scrape(metrics)
    assert value(after, "cramfs_io_bytes_total", op="write") == sum(len(d) for _, d in writes)
    assert value(after, "cramfs_io_bytes_total", op="read") == sum(n for _, n in reads)
    assert value(after, "cramfs_io_requests_total", op="write") == len(writes)
    assert value(after, "cramfs_io_requests_total", op="read") == len(reads)
    assert value(after, "cramfs_failed_io_total", op="write") == 0

    mm = dev.mm_stat()
    orig, compr, used, limit, used_max, same, compacted, huge, huge_since = mm
    assert value(after, "cramfs_original_bytes") == orig
    assert value(after, "cramfs_stored_pages") == orig // PAGE_SIZE == 3 + 1 + 16
    assert value(after, "cramfs_compressed_bytes") == compr
    assert value(after, "cramfs_pool_used_bytes") == used
    assert value(after, "cramfs_pool_capacity_bytes") == limit == 4 * MiB
    assert value(after, "cramfs_pool_used_max_bytes") == used_max
    assert value(after, "cramfs_same_pages") == same
    assert value(after, "cramfs_pages_compacted_total") == compacted
    assert value(after, "cramfs_huge_pages") == huge
    assert value(after, "cramfs_huge_pages_stored_total") == huge_since
    assert value(after, "cramfs_device_size_bytes") == 16 * MiB
    assert value(after, "cramfs_compression_ratio") == pytest.approx(
        compr / (orig - same * PAGE_SIZE))
    assert 0 < value(after, "cramfs_compression_ratio") < 1
    assert value(after, "cramfs_allocator_efficiency") == pytest.approx(compr / used)
    assert value(after, "cramfs_effective_ratio") == pytest.approx(orig / used)
    assert value(after, "cramfs_headroom_bytes") == dev.headroom()


def test_failed_invalid_and_released(dev, metrics):
    dev.write(0, text_pages(2))
    with pytest.raises(OutOfRange):
        dev.read(dev.size, 4096)
    dev.write(0, bytes(PAGE_SIZE))  # a zero write releases the page
    families = scrape(metrics)
    assert value(families, "cramfs_invalid_io_total") == 1
    assert value(families, "cramfs_released_pages_total") == 1
    assert value(families, "cramfs_stored_pages") == 1
    dev.discard(0, 4 * PAGE_SIZE)  # zram counts every discarded page in notify_free
    families = scrape(metrics)
    assert value(families, "cramfs_released_pages_total") == 5
    assert value(families, "cramfs_discarded_pages_total") == 4
    assert value(families, "cramfs_discard_requests_total") == 1
    assert value(families, "cramfs_stored_pages") == 0


def fill_until(device: CompressedDevice, predicate, start: int = 0) -> int:
    """Write incompressible pages one at a time until ``predicate()``; returns the next page."""
    page = start
    while not predicate():
        device.write(page * PAGE_SIZE, os.urandom(PAGE_SIZE))
        page += 1
    return page


def state_series(families: dict) -> dict[str, float]:
    return {s.labels["state"]: s.value for s in families["cramfs_watermark_state"].samples}


def test_watermark_state_is_one_hot_and_follows_the_device():
    dev = make_device(pool=256 * 1024, low=0.5, high=0.75, policy=Policy.THROTTLE,
                      throttle_max_delay=0.001)
    try:
        m = Metrics(lambda: [DeviceEntry("n0", "node", dev)])
        families = scrape(m)
        assert state_series(families) == {"ok": 1, "pressure": 0, "full": 0}
        assert value(families, "cramfs_pressure") == 0
        assert value(families, "cramfs_watermark_low_ratio") == 0.5
        assert value(families, "cramfs_watermark_high_ratio") == 0.75

        pages = fill_until(dev, lambda: dev.watermarks.state.value == "pressure")
        families = scrape(m)
        assert state_series(families) == {"ok": 0, "pressure": 1, "full": 0}
        assert value(families, "cramfs_watermark_events_total", event="high") == 1
        assert value(families, "cramfs_pressure") == dev.pressure() == 1000
        assert value(families, "cramfs_headroom_bytes") == 0
        # throttle: writes needing space are delayed and counted
        dev.write(pages * PAGE_SIZE, os.urandom(PAGE_SIZE))
        families = scrape(m)
        assert value(families, "cramfs_throttled_writes_total") == dev.counters.throttled_writes
        assert dev.counters.throttled_writes >= 1
        assert value(families, "cramfs_throttle_seconds_total") == pytest.approx(
            dev.counters.throttle_seconds)

        # release pages with zero writes until usage falls under low
        dev.write(0, bytes(pages * PAGE_SIZE))
        dev.compact()
        families = scrape(m)
        assert dev.watermarks.state.value == "ok"
        assert state_series(families) == {"ok": 1, "pressure": 0, "full": 0}
        assert value(families, "cramfs_watermark_events_total", event="low") == 1
        assert value(families, "cramfs_released_pages_total") == pages

        dev.set_watermarks(low=0.2, high=0.3)
        families = scrape(m)
        assert value(families, "cramfs_watermark_high_ratio") == 0.3
    finally:
        dev.close()


def test_rejected_writes_follow_forced_rejects():
    dev = make_device(pool=64 * 1024, policy=Policy.REJECT)
    try:
        m = Metrics(lambda: [DeviceEntry("swap0", "swap", dev)])
        # 32 incompressible pages cannot fit 16 frames at all: refused whole, state full
        with pytest.raises(WriteRejected) as info:
            dev.write(0, os.urandom(32 * PAGE_SIZE))
        assert info.value.reason == "full"
        families = scrape(m)
        assert value(families, "cramfs_rejected_writes_total", reason="full") == 1
        assert value(families, "cramfs_rejected_writes_total", reason="watermark") == 0
        assert value(families, "cramfs_failed_io_total", op="write") == 1
        assert value(families, "cramfs_pool_limit_hit_total") == 1
        assert value(families, "cramfs_watermark_events_total", event="full") == 1
        assert state_series(families) == {"ok": 0, "pressure": 0, "full": 1}
        assert value(families, "cramfs_pressure") == 1000
        assert value(families, "cramfs_stored_pages") == 0

        # back to ok once usage is below low, then fill into pressure and get refused
        dev.compact()  # re-evaluates the watermarks
        assert dev.watermarks.state.value == "ok"
        page = fill_until(dev, lambda: dev.watermarks.state.value == "pressure")
        with pytest.raises(WriteRejected) as info:
            dev.write(page * PAGE_SIZE, os.urandom(PAGE_SIZE))
        assert info.value.reason == "watermark"
        families = scrape(m)
        assert value(families, "cramfs_rejected_writes_total", reason="watermark") == 1
        assert value(families, "cramfs_rejected_writes_total", reason="full") == 1
        assert value(families, "cramfs_failed_io_total", op="write") == 2
        assert state_series(families) == {"ok": 0, "pressure": 1, "full": 0}
        assert value(families, "cramfs_reject_compress_poor_total") == page
        assert value(families, "cramfs_huge_pages") == page
    finally:
        dev.close()


@pytest.mark.parametrize("mode", [FailureMode.DROP, FailureMode.POISON])
def test_lost_pages_by_mode(mode):
    dev = make_device(pool=64 * 1024, policy=Policy.NONE, failure_mode=mode)
    try:
        m = Metrics(lambda: [DeviceEntry("n0", "node", dev)])
        result = dev.write(0, os.urandom(32 * PAGE_SIZE))
        assert result.lost_pages > 0
        families = scrape(m)
        other = "poison" if mode is FailureMode.DROP else "drop"
        assert value(families, "cramfs_lost_pages_total", mode=mode.value) == result.lost_pages
        assert value(families, "cramfs_lost_pages_total", mode=other) == 0
        poisoned = result.lost_pages if mode is FailureMode.POISON else 0
        assert value(families, "cramfs_poisoned_pages") == poisoned
        if poisoned:
            with pytest.raises(PoisonedPage):
                dev.read(0, 32 * PAGE_SIZE)
            assert value(scrape(m), "cramfs_failed_io_total", op="read") == 1
    finally:
        dev.close()


def test_written_back_pages_read_from_the_counters_when_present(dev, metrics):
    assert value(scrape(metrics), "cramfs_written_back_pages_total") == 0
    dev.counters.written_back_pages = 7  # what a zswap device will keep
    assert value(scrape(metrics), "cramfs_written_back_pages_total") == 7


def test_stored_object_histogram_matches_the_page_table(dev, metrics):
    dev.write(0, text_pages(40))
    dev.write(64 * PAGE_SIZE, counter_pages(10))
    dev.write(128 * PAGE_SIZE, os.urandom(5 * PAGE_SIZE))
    dev.write(192 * PAGE_SIZE, b"\x07" * (3 * PAGE_SIZE))  # same-filled: not in the pool
    # the independent truth: every stored object's length, from the table (slow walk)
    lengths = [dev.table.length(i) for i in range(dev.pages) if dev.table.state(i) in (2, 3)]
    bounds = (*OBJECT_BUCKETS, float("inf"))
    expected = [sum(1 for n in lengths if n <= b) for b in bounds]
    families = scrape(metrics)
    buckets = [s for s in families["cramfs_stored_object_bytes"].samples
               if s.name.endswith("_bucket")]
    assert [float(s.labels["le"]) for s in buckets] == list(bounds)
    assert [s.value for s in buckets] == expected
    assert value(families, "cramfs_stored_object_bytes_gcount") == len(lengths)
    assert value(families, "cramfs_stored_object_bytes_gsum") == sum(lengths)
    assert len(lengths) == dev.pages_stored - dev.same_pages == 55


# -- latency ------------------------------------------------------------------------------
def test_observe_fills_the_latency_histogram(metrics):
    samples = [0.000005, 0.00001, 0.00003, 0.001, 0.02, 2.0]
    for s in samples:
        metrics.observe("swap0", "read", s)
    metrics.observe("swap0", "write", 0.0004)
    families = scrape(metrics)
    family = families["cramfs_request_duration_seconds"]
    read = {s.labels["le"]: s.value for s in family.samples
            if s.name.endswith("_bucket") and s.labels["op"] == "read"}
    assert [float(le) for le in read] == [*LATENCY_BUCKETS, float("inf")]
    assert read["1e-05"] == 2  # a value on a bound counts into it
    assert read["5e-05"] == 3
    assert read["0.001"] == 4
    assert read["0.025"] == 5
    assert read["1.0"] == 5
    assert read["+Inf"] == 6
    assert value(families, "cramfs_request_duration_seconds_count", op="read") == 6
    assert value(families, "cramfs_request_duration_seconds_sum", op="read") == pytest.approx(
        sum(samples))
    assert value(families, "cramfs_request_duration_seconds_count", op="write") == 1
    assert LATENCY_BUCKETS[0] == 0.00001 and LATENCY_BUCKETS[-1] == 1.0


def test_latency_series_exist_before_any_request_and_ops_are_checked(metrics):
    families = scrape(metrics)
    counts = {s.labels["op"]: s.value for s in families["cramfs_request_duration_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {"read": 0, "write": 0}
    with pytest.raises(ValueError):
        metrics.observe("swap0", "flush", 0.1)


# -- the exposition is clean --------------------------------------------------------------
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if REQUIRE:
            pytest.fail("promtool is required (CRAMFS_REQUIRE_E2E=1) but not installed")
        pytest.skip("promtool not installed")
    return path


def test_promtool_check_metrics_prints_nothing(dev):
    other = make_device(policy=Policy.NONE, failure_mode=FailureMode.DROP)
    try:
        dev.write(0, text_pages(20) + os.urandom(2 * PAGE_SIZE))
        m = Metrics(lambda: [DeviceEntry("swap0", "swap", dev), DeviceEntry("n0", "node", other)])
        m.observe("swap0", "read", 0.001)
        result = subprocess.run([promtool(), "check", "metrics"], input=m.render(),
                                capture_output=True, timeout=60)
        assert result.returncode == 0, result
        assert result.stdout == b"" and result.stderr == b"", result
    finally:
        other.close()


# -- the scrape stays cheap ---------------------------------------------------------------
class Tripwire:
    """Stands in for the page table and the pool's blocks: touching it fails the test."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name):
        raise AssertionError(f"a scrape touched {self._what}.{name}")

    def __iter__(self):
        raise AssertionError(f"a scrape iterated {self._what}")

    def __len__(self):
        raise AssertionError(f"a scrape sized {self._what}")

    def __getitem__(self, key):
        raise AssertionError(f"a scrape indexed {self._what}")


def count_calls(fn) -> int:
    calls = 0

    def profiler(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_scrape_of_a_big_device_does_not_walk_pages():
    big = make_device(size=1 << 30, pool=64 * MiB)
    small = make_device(size=1 << 30, pool=64 * MiB)
    try:
        batch = 256
        for first in range(0, 100_000, batch):
            count = min(batch, 100_000 - first)
            big.write(first * PAGE_SIZE, counter_pages(count, first))
        small.write(0, counter_pages(batch))
        assert big.pages_stored == 100_000
        big_m = Metrics(lambda: [DeviceEntry("big", "swap", big)])
        small_m = Metrics(lambda: [DeviceEntry("big", "swap", small)])

        saved = big.table, big.pool._blocks, big.recount, big.pool.live_objects
        big.table = Tripwire("device.table")
        big.pool._blocks = Tripwire("pool._blocks")
        big.recount = big.pool.live_objects = Tripwire("a recount")
        try:
            text = big_m.render()
            # Python-level work per scrape does not grow with the pages stored
            big_calls = count_calls(lambda: list(big_m.registry.collect()))
        finally:
            big.table, big.pool._blocks, big.recount, big.pool.live_objects = saved
        small_calls = count_calls(lambda: list(small_m.registry.collect()))
        # A page walk would add ~100k calls; a few stray ones (a GC callback, a thread's
        # bookkeeping) are noise, not scaling.
        assert abs(big_calls - small_calls) <= 50, (big_calls, small_calls)
        assert big_calls < 2000
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        assert value(families, "cramfs_stored_pages") == 100_000
        assert value(families, "cramfs_stored_object_bytes_gcount") == 100_000
    finally:
        big.close()
        small.close()


# -- the HTTP endpoint --------------------------------------------------------------------
def test_start_serves_the_registry_and_close_stops_it(dev, metrics):
    dev.write(0, text_pages(2))
    metrics.start("127.0.0.1:0")
    try:
        host, port = parse_address(metrics.address, "bound")
        assert host == "127.0.0.1" and port > 0
        with urllib.request.urlopen(f"http://{metrics.address}/metrics", timeout=10) as reply:
            body = reply.read().decode()
        assert 'cramfs_stored_pages{device="swap0"} 2.0' in body
    finally:
        metrics.close()
    assert metrics.address is None
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=2):
        pass
    metrics.close()  # idempotent


def test_empty_address_serves_nothing(metrics):
    metrics.start("")
    assert metrics.address is None
    metrics.close()


def test_port_in_use_raises_metrics_address_error(metrics):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(MetricsAddressError) as info:
            metrics.start(address)
    message = str(info.value)
    assert address in message and "\n" not in message
    assert message.startswith("metrics_address: ")  # the key, as the config names it
    assert isinstance(info.value, ValueError)
    assert metrics.address is None


@pytest.mark.parametrize("address", ["9469", "localhost", "127.0.0.1:", "127.0.0.1:http",
                                     "127.0.0.1:70000", "::1:9469", "[nothost]:9469",
                                     "no-such-host.invalid:9469"])
def test_bad_addresses_raise_metrics_address_error(metrics, address):
    with pytest.raises(MetricsAddressError) as info:
        metrics.start(address)
    assert address in str(info.value) and "\n" not in str(info.value)
    metrics.close()


def test_parse_address_forms():
    assert parse_address("127.0.0.1:9469", "k") == ("127.0.0.1", 9469)
    assert parse_address("[::1]:9469", "k") == ("::1", 9469)
    assert parse_address(":9469", "k") == ("0.0.0.0", 9469)  # empty host: every IPv4 interface
    assert parse_address("localhost:0", "k") == ("localhost", 0)


@pytest.mark.parametrize("address", [":0", "127.0.0.1:0", "localhost:0", "[::1]:0",
                                     "nonsense", "::1:0", "[nothost]:0", "127.0.0.1:70000",
                                     "127.0.0.1:", ":", "host:port"])
def test_the_config_and_the_endpoint_read_an_address_alike(address):
    """One parser: what the config accepts the endpoint binds, what it refuses the endpoint
    refuses with the same message."""
    try:
        expected = configuration.check_address(address, "metrics_address")
        refused = None
    except configuration.ConfigError as exc:
        expected, refused = None, str(exc)
    m = Metrics(lambda: [])
    try:
        m.start(address)
    except MetricsAddressError as exc:
        if refused is None:  # well-formed but not bindable here (no IPv6 loopback, say)
            assert "cannot serve metrics" in str(exc)
            pytest.skip(str(exc))
        assert str(exc) == refused
        return
    try:
        assert refused is None, refused
        assert expected is not None
        host, port = parse_address(m.address, "bound")
        assert host == expected[0] or (expected[0] == "localhost" and host == "127.0.0.1")
        assert port > 0
    finally:
        m.close()


# -- the dashboard and the reference table agree with the exposition ------------------------
def exposed_names(dev) -> tuple[set[str], set[str]]:
    """(family names as exposed in the text format, every sample name)."""
    m = Metrics(lambda: [DeviceEntry("swap0", "swap", dev)])
    text = m.render().decode()
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    return families, samples


def test_dashboard_is_valid_and_queries_only_exposed_metrics(dev):
    dashboard = json.loads((ROOT / "dashboards" / "cramfs.json").read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    device = variables["device"]
    query = device["query"]["query"] if isinstance(device["query"], dict) else device["query"]
    assert query == "label_values(cramfs_device_info, device)"
    _, samples = exposed_names(dev)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            expr = target["expr"]
            assert '$device' in expr or "cramfs_device_info" in expr, (panel["title"], expr)
            names = set(re.findall(r"\bcramfs_[a-z_]+", expr))
            assert names and names <= samples, (panel["title"], names - samples)
            used |= names
    titles = " ".join(p["title"].lower() for p in panels)
    for word in ("compression ratio", "capacity", "watermark", "reject", "throughput",
                 "latency", "pressure"):
        assert word in titles, word
    for name in ("cramfs_compression_ratio", "cramfs_watermark_high_ratio",
                 "cramfs_watermark_low_ratio", "cramfs_pool_used_bytes",
                 "cramfs_rejected_writes_total", "cramfs_io_bytes_total",
                 "cramfs_request_duration_seconds_bucket", "cramfs_pressure",
                 "cramfs_watermark_events_total", "cramfs_device_size_bytes"):
        assert name in used, name


def test_reference_table_lists_exactly_the_exposed_families(dev):
    text = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(cramfs_[a-z_]+)`", text, re.M))
    families, _ = exposed_names(dev)
    # the gauge histogram's _gcount/_gsum are documented with it, not as rows of their own
    families -= {"cramfs_stored_object_bytes_gcount", "cramfs_stored_object_bytes_gsum"}
    assert documented == families


def test_reference_table_gives_each_family_its_exposed_type_and_labels(dev):
    """The README's Type and Labels columns, against the exposition itself."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(cramfs_[a-z_]+)` \| ([a-z ]+) \| ([^|]+) \|", text, re.M)
    documented = {name: (kind.strip(), set(re.findall(r"`([a-z]+)`", labels)))
                  for name, kind, labels in rows}
    dev.write(0, text_pages(4))
    m = Metrics(lambda: [DeviceEntry("swap0", "swap", dev)])
    exposition = m.render().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))
    labels: dict[str, set[str]] = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            sample = line.split("{")[0].split(" ")[0]
            family = next(f for f in sorted(types, key=len, reverse=True)
                          if sample == f or sample.startswith(f + "_"))
            labels.setdefault(family, set()).update(re.findall(r'(\w+)="', line))
    assert documented.keys() == types.keys() - {"cramfs_stored_object_bytes_gcount",
                                               "cramfs_stored_object_bytes_gsum"}
    for name, (kind, documented_labels) in documented.items():
        exposed = types[name]
        # a gauge histogram is a histogram in text format 0.0.4, with _gcount and _gsum
        assert exposed == ("histogram" if kind == "gauge histogram" else kind), name
        assert labels[name] == documented_labels, name


def test_the_table_holds_every_per_device_family_once():
    """FAMILIES is the whole exposition but request latency (which the devices do not keep)."""
    from daemon.metrics import FAMILIES

    names = [family.name for family in FAMILIES]
    assert len(names) == len(set(names))
    exposed = {"cramfs_device_info" if name == "cramfs_device" else name for name in names}
    assert exposed | {"cramfs_request_duration_seconds"} == set(EXPECTED) - {
        "cramfs_stored_object_bytes_gcount", "cramfs_stored_object_bytes_gsum"}
