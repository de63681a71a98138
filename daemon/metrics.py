"""Prometheus telemetry: live device counters at scrape time, plus request latency.

There is no second set of books. A custom collector reads each device's own gauges and counters
when Prometheus scrapes, so a scrape costs O(devices + size classes) and never walks pages. The
one thing the devices do not keep is latency, recorded here by ``Metrics.observe`` from the FUSE
handlers (a bisect and a counter bump under a lock).

The collector runs on the HTTP server's thread while the Trio thread changes the devices. Every
value is one attribute read, so a scrape taken mid-request may mix values from just before and
just after it; nothing can break, and the next scrape is consistent again.

The reference table is in README.md ("Metrics reference"); a unit test keeps it exact.
"""

from __future__ import annotations

import errno
import ipaddress
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

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
from cramfs.device import REJECT_REASONS
from cramfs.watermarks import EVENT_NAMES, State
from daemon.devices import DeviceEntry

OPS = ("read", "write")
STATES = tuple(state.value for state in State)  # ok, pressure, full
LOSS_MODES = ("drop", "poison")
FATES = ("delivered", "delayed", "dropped")  # InterruptLine.stat()'s order

# Request latency, 10 µs .. 1 s (a page from the pool is tens of µs; a throttled write up to
# the throttle delay; anything past a second is a stall worth seeing in +Inf).
LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                   0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# Stored object sizes; pool size classes are 16-byte multiples, so an object of n bytes sits in
# a class of size s with n <= s <= n + 15, and counting classes by size is exact for these bounds.
OBJECT_BUCKETS = (256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096)


class MetricsAddressError(ValueError):
    """The metrics endpoint cannot be served at the given address (bad form, or bind failed)."""


def parse_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6; an empty host means all interfaces)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise MetricsAddressError(
            f"metrics address {address!r} is not HOST:PORT with a port in 0..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise MetricsAddressError(
                f"metrics address {address!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise MetricsAddressError(
            f"metrics address {address!r}: write an IPv6 host in brackets, like [::1]:9469")
    return host or "0.0.0.0", int(port_text)


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
        self._server = None
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
        entries = list(self._entries())
        names = [entry.name for entry in entries]

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["device", *labels])

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["device", *labels])

        info = InfoMetricFamily("cramfs_device", "A configured device: its kind, compressor "
                                "and level (always 1).",
                                labels=["device", "kind", "compressor", "level"])
        size = gauge("cramfs_device_size_bytes",
                     "Advertised capacity: the size of <dev>/data (what the device claims).")
        capacity = gauge("cramfs_pool_capacity_bytes",
                         "Real capacity of the device's compressed pool (zram mem_limit).")
        used = gauge("cramfs_pool_used_bytes",
                     "Pool memory in use, whole frames (zram mem_used_total).")
        used_max = gauge("cramfs_pool_used_max_bytes",
                         "Peak pool memory in use since start or the last reset (mem_used_max).")
        stored = gauge("cramfs_stored_pages", "Pages holding data (same-filled ones included).")
        same = gauge("cramfs_same_pages",
                     "Stored pages filled with one repeated non-zero word (no pool space).")
        huge = gauge("cramfs_huge_pages",
                     "Stored pages kept uncompressed because they did not compress enough.")
        compressed = gauge("cramfs_compressed_bytes",
                           "Bytes of the objects in the pool (zram compr_data_size).")
        original = gauge("cramfs_original_bytes",
                         "Uncompressed bytes of the stored pages (zram orig_data_size).")
        ratio = gauge("cramfs_compression_ratio",
                      "Compressed bytes per original byte of the pages held in the pool "
                      "(0..1, lower is better; same-filled pages excluded; 0 when none).")
        effective = gauge("cramfs_effective_ratio",
                          "Original bytes per pool byte in use: the ratio the capacity lie "
                          "depends on (0 when the pool is empty).")
        efficiency = gauge("cramfs_allocator_efficiency",
                           "Compressed bytes per pool byte in use (0..1; 1 when empty).")
        pressure = gauge("cramfs_pressure",
                         "Device pressure 0..1000: 0 at or below the low watermark, 1000 at or "
                         "above the high one or when full, linear between.")
        headroom = gauge("cramfs_headroom_bytes",
                         "Pool bytes that can still be used before crossing the high watermark.")
        low = gauge("cramfs_watermark_low_ratio",
                    "Low watermark as a fraction of pool capacity (pressure clears below it).")
        high = gauge("cramfs_watermark_high_ratio",
                     "High watermark as a fraction of pool capacity (pressure raised above it).")
        state = gauge("cramfs_watermark_state",
                      "Watermark state, one series per state: 1 for the current one, 0 others.",
                      ("state",))
        changed = gauge("cramfs_watermark_last_change_timestamp_seconds",
                        "Unix time of the last watermark state change (or device start).")
        poisoned = gauge("cramfs_poisoned_pages",
                         "Pages that currently read back EIO (poisoned until rewritten).")
        requests = counter("cramfs_io_requests", "Completed read and write requests.", ("op",))
        io_bytes = counter("cramfs_io_bytes", "Bytes read and written by completed requests.",
                           ("op",))
        failed = counter("cramfs_failed_io", "Failed requests (zram failed_reads/failed_writes).",
                         ("op",))
        invalid = counter("cramfs_invalid_io", "Requests outside the device (zram invalid_io).")
        released = counter("cramfs_released_pages",
                           "Pages released by a zero write or a discard (zram notify_free).")
        discarded = counter("cramfs_discarded_pages",
                            "Whole pages released by discards (fallocate PUNCH_HOLE or "
                            "ZERO_RANGE; the node's trim count).")
        discards = counter("cramfs_discard_requests", "Discard requests served.")
        rejected = counter("cramfs_rejected_writes",
                           "Writes refused with ENOSPC by write control: reason=watermark (in "
                           "pressure) or full (the pool could not fit them).", ("reason",))
        lost = counter("cramfs_lost_pages",
                       "Pages whose write the emulated hardware failed under policy none: "
                       "mode=drop (silently lost) or poison (read EIO until rewritten).", ("mode",))
        throttled = counter("cramfs_throttled_writes", "Writes delayed by the throttle policy.")
        throttle_s = counter("cramfs_throttle_seconds",
                             "Total delay imposed on writes by the throttle policy.")
        events = counter("cramfs_watermark_events",
                         "Watermark interrupts: high (ok to pressure), low (back to ok), "
                         "full (an allocation failed).", ("event",))
        compacted = counter("cramfs_pages_compacted",
                            "Pool frames freed by compaction (zram pages_compacted).")
        huge_since = counter("cramfs_huge_pages_stored",
                             "Pages ever stored uncompressed (zram huge_pages_since).")
        poor = counter("cramfs_reject_compress_poor",
                       "Pages zstd could not shrink at all (zswap reject_compress_poor).")
        limit_hit = counter("cramfs_pool_limit_hit",
                            "Allocations that did not fit the pool (zswap pool_limit_hit).")
        written_back = counter("cramfs_written_back_pages",
                               "Pages written back from the pool to the backing file (zswap).")
        backing = gauge("cramfs_backing_pages",
                        "Pages living in the backing file (zswap devices; 0 elsewhere).")
        resident = gauge("cramfs_pool_resident_bytes",
                         "Arena bytes the kernel really holds for the pool (the memfd's "
                         "allocated blocks); should track cramfs_pool_used_bytes.")
        zero_pending = gauge("cramfs_zero_pending_bytes",
                             "Pool bytes of released pages waiting for the batched zero flush.")
        safe = gauge("cramfs_safe_pages",
                     "Pages of the present compressibility that still fit before the high "
                     "watermark (0 while the allocation gate is closed).")
        zratio = gauge("cramfs_zratio", "The ratio the device promises: size / pool capacity.")
        balloon = gauge("cramfs_balloon_pages",
                        "Advertised pages to withhold so the rest is backed at the achieved "
                        "ratio.")
        gate = gauge("cramfs_no_alloc", "1 while the allocation gate is closed.")
        interrupts = counter("cramfs_interrupts",
                             "Watermark wake-ups by fate: delivered (on time or late), delayed "
                             "(delivered late), dropped (never delivered).", ("fate",))
        storms = counter("cramfs_refusal_storms",
                         "Refusal storms recognised: the same refused writes retried again "
                         "and again.")
        in_storm = gauge("cramfs_refusal_storm", "1 while a refusal storm is on.")
        injected = counter("cramfs_injected_errors",
                           "Requests failed on purpose by the configured error rate.", ("op",))
        objects = GaugeHistogramMetricFamily(
            "cramfs_stored_object_bytes",
            "Sizes of the objects stored in the pool now (huge pages count as 4096).",
            labels=["device"])

        now = time.monotonic()
        for entry in entries:
            dev, name = entry.device, entry.name
            pool, wm, c = dev.pool, dev.watermarks, dev.counters
            d = [name]
            info.add_metric([name, entry.kind, dev.codec.compressor, str(dev.codec.level)], {})
            size.add_metric(d, dev.size)
            capacity.add_metric(d, pool.capacity)
            used.add_metric(d, pool.used_bytes)
            used_max.add_metric(d, pool.max_used_bytes)
            stored.add_metric(d, dev.pages_stored)
            same.add_metric(d, dev.same_pages)
            huge.add_metric(d, dev.huge_pages)
            compressed.add_metric(d, dev.compr_data_size)
            original.add_metric(d, dev.pages_stored << PAGE_SHIFT)
            ratio.add_metric(d, dev.compression_ratio())
            effective.add_metric(d, dev.effective_ratio())
            efficiency.add_metric(d, dev.allocator_efficiency())
            pressure.add_metric(d, dev.pressure())
            headroom.add_metric(d, dev.headroom())
            low.add_metric(d, wm.low)
            high.add_metric(d, wm.high)
            current = wm.state.value
            for value in STATES:
                state.add_metric([name, value], 1 if value == current else 0)
            changed.add_metric(d, wm.last_change)
            poisoned.add_metric(d, len(dev.poisoned))
            requests.add_metric([name, "read"], c.read_requests)
            requests.add_metric([name, "write"], c.write_requests)
            io_bytes.add_metric([name, "read"], c.read_bytes)
            io_bytes.add_metric([name, "write"], c.written_bytes)
            failed.add_metric([name, "read"], c.failed_reads)
            failed.add_metric([name, "write"], c.failed_writes)
            invalid.add_metric(d, c.invalid_io)
            released.add_metric(d, c.notify_free)
            discarded.add_metric(d, c.discarded_pages)
            discards.add_metric(d, c.discard_requests)
            for reason in REJECT_REASONS:
                rejected.add_metric([name, reason], c.rejected.get(reason, 0))
            lost.add_metric([name, "drop"], c.lost_writes)
            lost.add_metric([name, "poison"], c.poisoned_writes)
            throttled.add_metric(d, c.throttled_writes)
            throttle_s.add_metric(d, c.throttle_seconds)
            for event in EVENT_NAMES:
                events.add_metric([name, event], wm.events.get(event, 0))
            compacted.add_metric(d, pool.pages_compacted)
            huge_since.add_metric(d, c.huge_pages_since)
            poor.add_metric(d, c.reject_compress_poor)
            limit_hit.add_metric(d, c.pool_limit_hit)
            written_back.add_metric(d, getattr(c, "written_back_pages", 0))
            objects.add_metric(d, _object_buckets(pool.classes), dev.compr_data_size)
            backing.add_metric(d, dev.backing_pages)
            resident.add_metric(d, pool.resident_bytes())
            zero_pending.add_metric(d, dev.releasing_bytes)
            for op in OPS:
                injected.add_metric([name, op], c.injected_errors.get(op, 0))
            safe.add_metric(d, dev.safe_pages())
            zratio.add_metric(d, dev.zratio())
            balloon.add_metric(d, dev.balloon_pages())
            gate.add_metric(d, int(dev.no_alloc))
            for fate, count in zip(FATES, dev.interrupts.stat(), strict=True):
                interrupts.add_metric([name, fate], count)
            storms.add_metric(d, entry.storm.storms)
            in_storm.add_metric(d, int(entry.storm.active(now)))

        yield from (info, size, capacity, used, used_max, stored, same, huge, compressed,
                    original, ratio, effective, efficiency, pressure, headroom, low, high, state,
                    changed, poisoned, requests, io_bytes, failed, invalid, released, discarded,
                    discards, rejected,
                    lost, throttled, throttle_s, events, compacted, huge_since, poor, limit_hit,
                    written_back, objects, backing, resident, zero_pending, injected, safe,
                    zratio, balloon, gate, interrupts, storms, in_storm)
        yield self._latency_family(names)

    def _latency_family(self, names: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "cramfs_request_duration_seconds",
            "Time to serve a read or write request, from the FUSE handler's start to its reply.",
            labels=["device", "op"])
        keys = [(name, op) for name in names for op in OPS]
        with self._lock:
            seen = set(keys)
            keys += [key for key in self._latency if key not in seen]
            snapshot = [(key, self._latency.get(key)) for key in keys]
            snapshot = [(key, (list(h.counts), h.total) if h else None) for key, h in snapshot]
        empty = [0] * (len(LATENCY_BUCKETS) + 1)
        for (name, op), data in snapshot:
            counts, total = data if data else (empty, 0.0)
            buckets, running = [], 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                running += count
                buckets.append((_bound(bound), running))
            family.add_metric([name, op], buckets, total)
        return family

    # -- HTTP endpoint --------------------------------------------------------------------
    def start(self, address: str) -> None:
        """Serve /metrics at ``HOST:PORT`` on a daemon thread ("" means no endpoint).

        Raises MetricsAddressError (a ValueError) when the address is malformed or cannot be
        bound; the message is one line naming the address.
        """
        if not address:
            return
        if self._server is not None:
            raise RuntimeError(f"metrics endpoint already serving on {self.address}")
        host, port = parse_address(address)
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                reason = "address already in use"
            raise MetricsAddressError(
                f"cannot serve metrics on {address}: {reason}") from None
        self._server, self._thread = server, thread
        bound_host, bound_port = server.server_address[:2]
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


def _bound(value: float) -> str:
    return floatToGoString(value)


def _object_buckets(classes: Iterable) -> list[tuple[str, int]]:
    """Cumulative (le, count) pairs of the pool's live objects, from per-class slot counts."""
    counts = [0] * (len(OBJECT_BUCKETS) + 1)
    last = len(OBJECT_BUCKETS)
    for cls in classes:
        used = cls.used_slots
        if used:
            counts[min(bisect_left(OBJECT_BUCKETS, cls.size), last)] += used
    buckets, running = [], 0
    for bound, count in zip((*OBJECT_BUCKETS, float("inf")), counts, strict=True):
        running += count
        buckets.append((_bound(bound), running))
    return buckets
