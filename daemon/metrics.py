"""Prometheus telemetry: live device counters at scrape time, plus request latency.

There is no second set of books. A custom collector reads each device's own gauges and counters
when Prometheus scrapes, so a scrape costs O(devices + size classes) and never walks pages. What
it reads is one table, FAMILIES: per family its name, type, help, labels and the function that
reads a device's value; the collector walks it. The one thing the devices do not keep is
latency, recorded here by ``Metrics.observe`` from the FUSE handlers (a bisect and a counter
bump) and exposed after the table.

The collector runs on the HTTP server's thread while the Trio thread changes the devices. Every
value is one attribute read, so a scrape taken mid-request may mix values from just before and
just after it; nothing can break, and the next scrape is consistent again.

The reference table is in README.md ("Metrics reference"); a unit test keeps it exact.
"""

from __future__ import annotations

import errno
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import cast
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cramfs import PAGE_SHIFT
from cramfs.device import REJECT_REASONS, Counters
from cramfs.watermarks import EVENT_NAMES, State
from cramfs.zspool import SizeClass
from daemon.addresses import AddressError, parse_address
from daemon.devices import DeviceEntry

OPS = ("read", "write")
STATES = tuple(state.value for state in State)  # ok, pressure, full
FATES = ("delivered", "delayed", "dropped")  # InterruptLine.stat()'s order

# Request latency, 10 µs .. 1 s (a page from the pool is tens of µs; a throttled write up to
# the throttle delay; anything past a second is a stall worth seeing in +Inf).
LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                   0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

_go_float = cast(Callable[[float], str], floatToGoString)  # the exposition's number format
_LATENCY_LE = tuple(_go_float(bound) for bound in (*LATENCY_BUCKETS, float("inf")))
_NO_REQUESTS = [0] * len(_LATENCY_LE)

# Stored object sizes; pool size classes are 16-byte multiples, so an object of n bytes sits in
# a class of size s with n <= s <= n + 15, and counting classes by size is exact for these bounds.
OBJECT_BUCKETS = (256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096)
_OBJECT_LE = tuple(_go_float(bound) for bound in (*OBJECT_BUCKETS, float("inf")))


class MetricsAddressError(AddressError):
    """The metrics endpoint cannot be served at the given address (bad form, or bind failed)."""


# -- the families: one table the collector walks ----------------------------------------------
class _Family:
    """One metric family of the table: its name, help, labels beyond ``device``, and how to read
    a device's samples; ``collect`` builds the family with every device's samples."""

    labels: tuple[str, ...] = ()

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help

    def collect(self, entries: list[DeviceEntry]) -> Metric:
        raise NotImplementedError


class _Gauge(_Family):
    """A number per device."""

    family: type[GaugeMetricFamily] | type[CounterMetricFamily] = GaugeMetricFamily

    def __init__(self, name: str, help: str, value: Callable[[DeviceEntry], float]) -> None:
        super().__init__(name, help)
        self.value = value

    def collect(self, entries: list[DeviceEntry]) -> Metric:
        metric = self.family(self.name, self.help, labels=["device"])
        value, add = self.value, metric.add_metric
        for entry in entries:
            add([entry.name], value(entry))
        return metric


class _Counter(_Gauge):
    """A number per device that only grows (exposed with ``_total``)."""

    family = CounterMetricFamily


class _GaugeBy(_Family):
    """A number per device and value of one more label."""

    family: type[GaugeMetricFamily] | type[CounterMetricFamily] = GaugeMetricFamily

    def __init__(self, name: str, help: str, label: str,
                 values: Callable[[DeviceEntry], Iterable[tuple[str, float]]]) -> None:
        super().__init__(name, help)
        self.labels = (label,)
        self.values = values

    def collect(self, entries: list[DeviceEntry]) -> Metric:
        metric = self.family(self.name, self.help, labels=["device", *self.labels])
        values, add = self.values, metric.add_metric
        for entry in entries:
            name = entry.name
            for label, value in values(entry):
                add([name, label], value)
        return metric


class _CounterBy(_GaugeBy):
    family = CounterMetricFamily


class _Info(_Family):
    """Always 1, with the device's description in labels."""

    def __init__(self, name: str, help: str, labels: tuple[str, ...],
                 values: Callable[[DeviceEntry], tuple[str, ...]]) -> None:
        super().__init__(name, help)
        self.labels = labels
        self.values = values

    def collect(self, entries: list[DeviceEntry]) -> Metric:
        metric = InfoMetricFamily(self.name, self.help, labels=["device", *self.labels])
        for entry in entries:
            metric.add_metric([entry.name, *self.values(entry)], {})
        return metric


class _GaugeHistogram(_Family):
    """Cumulative buckets and their sum per device, now (not since start)."""

    def __init__(self, name: str, help: str,
                 value: Callable[[DeviceEntry], tuple[list[tuple[str, float]], float]]) -> None:
        super().__init__(name, help)
        self.value = value

    def collect(self, entries: list[DeviceEntry]) -> Metric:
        metric = GaugeHistogramMetricFamily(self.name, self.help, labels=["device"])
        for entry in entries:
            buckets, total = self.value(entry)
            metric.add_metric([entry.name], buckets, total)
        return metric


def _by_op(read: Callable[[Counters], float],
           write: Callable[[Counters], float]) -> Callable[[DeviceEntry], list[tuple[str, float]]]:
    def values(entry: DeviceEntry) -> list[tuple[str, float]]:
        c = entry.device.counters
        return [("read", read(c)), ("write", write(c))]
    return values


def _states(entry: DeviceEntry) -> list[tuple[str, float]]:
    current = entry.device.watermarks.state.value
    return [(value, 1 if value == current else 0) for value in STATES]


def _objects(entry: DeviceEntry) -> tuple[list[tuple[str, float]], float]:
    dev = entry.device
    return _object_buckets(dev.pool.classes), dev.compr_data_size


# Every per-device family, in the order of the exposition. Names, types, labels and values are
# the README's reference table (a unit test keeps the two equal); the request-duration
# histogram, which the devices do not keep, follows them.
FAMILIES: tuple[_Family, ...] = (
    _Info("cramfs_device", "A configured device: its kind, compressor and level (always 1).",
          ("kind", "compressor", "level"),
          lambda e: (e.kind, e.device.codec.compressor, str(e.device.codec.level))),
    _Gauge("cramfs_device_size_bytes",
           "Advertised capacity: the size of <dev>/data (what the device claims).",
           lambda e: e.device.size),
    _Gauge("cramfs_pool_capacity_bytes",
           "Real capacity of the device's compressed pool (zram mem_limit).",
           lambda e: e.device.pool.capacity),
    _Gauge("cramfs_pool_used_bytes", "Pool memory in use, whole frames (zram mem_used_total).",
           lambda e: e.device.pool.used_bytes),
    _Gauge("cramfs_pool_used_max_bytes",
           "Peak pool memory in use since start or the last reset (mem_used_max).",
           lambda e: e.device.pool.max_used_bytes),
    _Gauge("cramfs_stored_pages", "Pages holding data (same-filled ones included).",
           lambda e: e.device.pages_stored),
    _Gauge("cramfs_same_pages",
           "Stored pages filled with one repeated non-zero word (no pool space).",
           lambda e: e.device.same_pages),
    _Gauge("cramfs_huge_pages",
           "Stored pages kept uncompressed because they did not compress enough.",
           lambda e: e.device.huge_pages),
    _Gauge("cramfs_compressed_bytes", "Bytes of the objects in the pool (zram compr_data_size).",
           lambda e: e.device.compr_data_size),
    _Gauge("cramfs_original_bytes",
           "Uncompressed bytes of the stored pages (zram orig_data_size).",
           lambda e: e.device.pages_stored << PAGE_SHIFT),
    _Gauge("cramfs_compression_ratio",
           "Compressed bytes per original byte of the pages held in the pool "
           "(0..1, lower is better; same-filled pages excluded; 0 when none).",
           lambda e: e.device.compression_ratio()),
    _Gauge("cramfs_effective_ratio",
           "Original bytes per pool byte in use: the ratio the capacity lie depends on "
           "(0 when the pool is empty).",
           lambda e: e.device.effective_ratio()),
    _Gauge("cramfs_allocator_efficiency",
           "Compressed bytes per pool byte in use (0..1; 1 when empty).",
           lambda e: e.device.allocator_efficiency()),
    _Gauge("cramfs_pressure",
           "Device pressure 0..1000: 0 at or below the low watermark, 1000 at or above the "
           "high one or when full, linear between.",
           lambda e: e.device.pressure()),
    _Gauge("cramfs_headroom_bytes",
           "Pool bytes that can still be used before crossing the high watermark.",
           lambda e: e.device.headroom()),
    _Gauge("cramfs_watermark_low_ratio",
           "Low watermark as a fraction of pool capacity (pressure clears below it).",
           lambda e: e.device.watermarks.low),
    _Gauge("cramfs_watermark_high_ratio",
           "High watermark as a fraction of pool capacity (pressure raised above it).",
           lambda e: e.device.watermarks.high),
    _GaugeBy("cramfs_watermark_state",
             "Watermark state, one series per state: 1 for the current one, 0 others.",
             "state", _states),
    _Gauge("cramfs_watermark_last_change_timestamp_seconds",
           "Unix time of the last watermark state change (or device start).",
           lambda e: e.device.watermarks.last_change),
    _Gauge("cramfs_poisoned_pages",
           "Pages that currently read back EIO (poisoned until rewritten).",
           lambda e: len(e.device.poisoned)),
    _CounterBy("cramfs_io_requests", "Completed read and write requests.", "op",
               _by_op(lambda c: c.read_requests, lambda c: c.write_requests)),
    _CounterBy("cramfs_io_bytes", "Bytes read and written by completed requests.", "op",
               _by_op(lambda c: c.read_bytes, lambda c: c.written_bytes)),
    _CounterBy("cramfs_failed_io", "Failed requests (zram failed_reads/failed_writes).", "op",
               _by_op(lambda c: c.failed_reads, lambda c: c.failed_writes)),
    _Counter("cramfs_invalid_io", "Requests outside the device (zram invalid_io).",
             lambda e: e.device.counters.invalid_io),
    _Counter("cramfs_released_pages",
             "Pages released by a zero write or a discard (zram notify_free).",
             lambda e: e.device.counters.notify_free),
    _Counter("cramfs_discarded_pages",
             "Whole pages released by discards (fallocate PUNCH_HOLE or ZERO_RANGE; the node's "
             "trim count).",
             lambda e: e.device.counters.discarded_pages),
    _Counter("cramfs_discard_requests", "Discard requests served.",
             lambda e: e.device.counters.discard_requests),
    _CounterBy("cramfs_rejected_writes",
               "Writes refused with ENOSPC by write control: reason=watermark (in pressure) or "
               "full (the pool could not fit them).", "reason",
               lambda e: [(reason, e.device.counters.rejected.get(reason, 0))
                          for reason in REJECT_REASONS]),
    _CounterBy("cramfs_lost_pages",
               "Pages whose write the emulated hardware failed under policy none: mode=drop "
               "(silently lost) or poison (read EIO until rewritten).", "mode",
               lambda e: [("drop", e.device.counters.lost_writes),
                          ("poison", e.device.counters.poisoned_writes)]),
    _Counter("cramfs_throttled_writes", "Writes delayed by the throttle policy.",
             lambda e: e.device.counters.throttled_writes),
    _Counter("cramfs_throttle_seconds", "Total delay imposed on writes by the throttle policy.",
             lambda e: e.device.counters.throttle_seconds),
    _CounterBy("cramfs_watermark_events",
               "Watermark interrupts: high (ok to pressure), low (back to ok), full (an "
               "allocation failed).", "event",
               lambda e: [(event, e.device.watermarks.events.get(event, 0))
                          for event in EVENT_NAMES]),
    _Counter("cramfs_pages_compacted", "Pool frames freed by compaction (zram pages_compacted).",
             lambda e: e.device.pool.pages_compacted),
    _Counter("cramfs_huge_pages_stored",
             "Pages ever stored uncompressed (zram huge_pages_since).",
             lambda e: e.device.counters.huge_pages_since),
    _Counter("cramfs_reject_compress_poor",
             "Pages zstd could not shrink at all (zswap reject_compress_poor).",
             lambda e: e.device.counters.reject_compress_poor),
    _Counter("cramfs_pool_limit_hit",
             "Allocations that did not fit the pool (zswap pool_limit_hit).",
             lambda e: e.device.counters.pool_limit_hit),
    _Counter("cramfs_written_back_pages",
             "Pages written back from the pool to the backing file (zswap).",
             lambda e: getattr(e.device.counters, "written_back_pages", 0)),
    _GaugeHistogram("cramfs_stored_object_bytes",
                    "Sizes of the objects stored in the pool now (huge pages count as 4096).",
                    _objects),
    _Gauge("cramfs_backing_pages",
           "Pages living in the backing file (zswap devices; 0 elsewhere).",
           lambda e: e.device.backing_pages),
    _Gauge("cramfs_pool_resident_bytes",
           "Arena bytes the kernel really holds for the pool (the memfd's allocated blocks); "
           "should track cramfs_pool_used_bytes.",
           lambda e: e.device.pool.resident_bytes()),
    _Gauge("cramfs_zero_pending_bytes",
           "Pool bytes of released pages waiting for the batched zero flush.",
           lambda e: e.device.releasing_bytes),
    _CounterBy("cramfs_injected_errors",
               "Requests failed on purpose by the configured error rate.", "op",
               lambda e: [(op, e.device.counters.injected_errors.get(op, 0)) for op in OPS]),
    _Gauge("cramfs_safe_pages",
           "Pages of the present compressibility that still fit before the high watermark "
           "(0 while the allocation gate is closed).",
           lambda e: e.device.safe_pages()),
    _Gauge("cramfs_zratio", "The ratio the device promises: size / pool capacity.",
           lambda e: e.device.zratio()),
    _Gauge("cramfs_balloon_pages",
           "Advertised pages to withhold so the rest is backed at the achieved ratio.",
           lambda e: e.device.balloon_pages()),
    _Gauge("cramfs_no_alloc", "1 while the allocation gate is closed.",
           lambda e: int(e.device.no_alloc)),
    _CounterBy("cramfs_interrupts",
               "Watermark wake-ups by fate: delivered (on time or late), delayed (delivered "
               "late), dropped (never delivered).", "fate",
               lambda e: zip(FATES, e.device.interrupts.stat(), strict=True)),
    _Counter("cramfs_refusal_storms",
             "Refusal storms recognised: the same refused writes retried again and again.",
             lambda e: e.storm.storms),
    _Gauge("cramfs_refusal_storm", "1 while a refusal storm is on.",
           lambda e: int(e.storm.active(time.monotonic()))),
)


class _Latency:
    """One request-duration histogram (non-cumulative bucket counts; +Inf last)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics._collect()


class Metrics:
    """The daemon's Prometheus registry over its devices, and the optional HTTP endpoint."""

    def __init__(self, entries: Callable[[], Iterable[DeviceEntry]]) -> None:
        self._entries = entries
        self._latency: dict[tuple[str, str], _Latency] = {}
        self._lock = threading.Lock()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.address: str | None = None  # "host:port" actually bound, once started
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # -- latency --------------------------------------------------------------------------
    def observe(self, device_name: str, op: str, seconds: float) -> None:
        """Record one request's duration (``op`` is "read" or "write").

        Called for every request, from the one thread that serves them, so the counts are
        bumped without a lock (it cost ~5% of the request loop at 4 KiB, measured with py-spy).
        A scrape may then see a request's bucket a moment before its share of the sum, as with
        prometheus_client's own histograms, which lock sum and buckets separately. The lock
        guards only the set of histograms, which a scrape iterates."""
        hist = self._latency.get((device_name, op))
        if hist is None:
            if op not in OPS:
                raise ValueError(f"op must be one of {OPS}, got {op!r}")
            with self._lock:
                hist = self._latency.setdefault((device_name, op), _Latency())
        hist.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        hist.total += seconds

    # -- exposition -----------------------------------------------------------------------
    def render(self) -> bytes:
        """The text exposition a scrape would get (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry)

    def _collect(self) -> Iterator[Metric]:
        """Every family of the table over the devices, then request latency."""
        entries = list(self._entries())
        for family in FAMILIES:
            yield family.collect(entries)
        yield self._latency_family([entry.name for entry in entries])

    def _latency_family(self, names: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "cramfs_request_duration_seconds",
            "Time to serve a read or write request, from the FUSE handler's start to its reply.",
            labels=["device", "op"])
        keys = [(name, op) for name in names for op in OPS]
        snapshot: list[tuple[tuple[str, str], list[int], float]] = []
        with self._lock:
            seen = set(keys)
            keys += [key for key in self._latency if key not in seen]
            for key in keys:
                hist = self._latency.get(key)
                if hist is None:
                    snapshot.append((key, _NO_REQUESTS, 0.0))
                else:
                    snapshot.append((key, list(hist.counts), hist.total))
        for (name, op), counts, total in snapshot:
            buckets: list[tuple[str, float]] = []
            running = 0
            for bound, count in zip(_LATENCY_LE, counts, strict=True):
                running += count
                buckets.append((bound, running))
            family.add_metric([name, op], buckets, total)
        return family

    # -- HTTP endpoint --------------------------------------------------------------------
    def start(self, address: str, key: str = "metrics_address") -> None:
        """Serve /metrics at ``HOST:PORT`` on a daemon thread ("" means no endpoint).

        The address is read by daemon.addresses, the parser the configuration checks it
        with (an empty host is every IPv4 interface, port 0 any free port: ``address`` then
        names the one bound). Raises MetricsAddressError (a ValueError) when the address is
        malformed or cannot be bound; the message is one line naming ``key`` and the address.
        """
        if not address:
            return
        if self._server is not None:
            raise RuntimeError(f"metrics endpoint already serving on {self.address}")
        try:
            host, port = parse_address(address, key)
        except AddressError as exc:
            raise MetricsAddressError(str(exc)) from None
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                reason = "address already in use"
            raise MetricsAddressError(
                f"{key}: cannot serve metrics on {address}: {reason}") from None
        self._server, self._thread = server, thread
        bound_host, bound_port = server.socket.getsockname()[:2]
        self.address = (f"[{bound_host}]:{bound_port}" if ":" in bound_host
                        else f"{bound_host}:{bound_port}")

    def close(self) -> None:
        """Stop the HTTP endpoint, if any (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        self.address = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def _object_buckets(classes: Iterable[SizeClass]) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs of the pool's live objects, from per-class slot counts."""
    counts = [0] * (len(OBJECT_BUCKETS) + 1)
    last = len(OBJECT_BUCKETS)
    for cls in classes:
        used = cls.used_slots
        if used:
            counts[min(bisect_left(OBJECT_BUCKETS, cls.size), last)] += used
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(_OBJECT_LE, counts, strict=True):
        running += count
        buckets.append((bound, running))
    return buckets
