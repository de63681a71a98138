"""The sysfs-like attribute files of a device directory.

Each attribute renders the live state as text when read and, if writable, validates a new
value before changing anything (ValueError -> EINVAL at the file system, value unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cramfs.compressors import NAMES, format_spec
from cramfs.watermarks import FailureMode, Policy
from cramfs.zswap import ZswapDevice
from daemon import recording
from daemon.capabilities import discard_supported
from daemon.devices import DeviceEntry

Reader = Callable[[DeviceEntry], str]
Writer = Callable[[DeviceEntry, str], None]
# What a successful write records in a trace (daemon.recording): an event kind and its fields.
Event = Callable[[DeviceEntry], tuple[str, dict[str, object]]]


def _setting(key: str, value: Callable[[DeviceEntry], object]) -> Event:
    return lambda entry: ("set", {key: value(entry)})


@dataclass(frozen=True)
class Attribute:
    name: str
    read: Reader | None
    write: Writer | None = None
    pollable: bool = False
    doc: str = ""
    event: Event | None = None


def _fields(values: tuple[int, ...]) -> str:
    return " ".join(f"{v:>8}" for v in values) + "\n"


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be within 0..1: {text!r}")
    return value


def _set_low(entry: DeviceEntry, text: str) -> None:
    entry.device.set_watermarks(low=_fraction(text))


def _set_high(entry: DeviceEntry, text: str) -> None:
    entry.device.set_watermarks(high=_fraction(text))


def _set_policy(entry: DeviceEntry, text: str) -> None:
    entry.device.set_policy(Policy(text))


def _set_no_alloc(entry: DeviceEntry, text: str) -> None:
    if text not in ("0", "1"):
        raise ValueError("write 1 to close the allocation gate, 0 to open it")
    entry.device.set_no_alloc(text == "1")


def _set_failure_mode(entry: DeviceEntry, text: str) -> None:
    entry.device.failure_mode = FailureMode(text)


def _compact(entry: DeviceEntry, text: str) -> None:
    if text not in ("1", ""):
        raise ValueError("write 1 to compact")
    entry.device.compact()


def _reset_max(entry: DeviceEntry, text: str) -> None:
    if text != "0":
        raise ValueError("write 0 to reset mem_used_max")
    entry.device.reset_max()


def _trace_state(entry: DeviceEntry) -> str:
    return "off\n" if entry.trace is None else f"recording {entry.trace.path}\n"


def _set_trace(entry: DeviceEntry, text: str) -> None:
    command, _, path = text.partition(" ")
    if command == "stop" and not path:
        recording.stop(entry)
    elif command == "start" and path.strip():
        recording.start(entry, Path(path.strip()))
    else:
        raise ValueError("write 'start /absolute/path' or 'stop'")


def _lost_pages(entry: DeviceEntry) -> str:
    device = entry.device
    lines = [f"{page} poisoned" for page in sorted(device.poisoned)]
    lines += [f"{page} dropped" for page in sorted(device.lost)]
    return "".join(line + "\n" for line in lines)


def _comp_algorithm(entry: DeviceEntry) -> str:
    """As zram's comp_algorithm: the algorithms offered, the device's in brackets."""
    current = entry.device.codec.compressor
    return " ".join(f"[{name}]" if name == current else name for name in NAMES) + "\n"


def _algorithm(entry: DeviceEntry) -> str:
    codec = entry.device.codec
    return format_spec(codec.compressor, codec.level) + "\n"


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("kind", lambda e: e.kind + "\n", doc="swap, zswap or node"),
    Attribute("comp_algorithm", _comp_algorithm,
              doc="as zram's: the compressors offered, the device's in brackets"),
    Attribute("algorithm", _algorithm, doc="the device's compressor and level, NAME[:LEVEL]"),
    Attribute("disksize", lambda e: f"{e.device.size}\n", doc="advertised capacity, bytes"),
    Attribute("pool_capacity", lambda e: f"{e.device.pool.capacity}\n",
              doc="real capacity of the pool, bytes"),
    Attribute("pool_used", lambda e: f"{e.device.used_bytes}\n",
              doc="pool bytes in use (mem_used_total)"),
    Attribute("mm_stat", lambda e: _fields(e.device.mm_stat()), doc="as zram's mm_stat"),
    Attribute("io_stat", lambda e: _fields(e.device.io_stat()), doc="as zram's io_stat"),
    Attribute("compression_ratio", lambda e: f"{e.device.compression_ratio():.4f}\n",
              doc="compressed bytes / original bytes of pool-stored pages"),
    Attribute("effective_ratio", lambda e: f"{e.device.effective_ratio():.4f}\n",
              doc="original bytes / pool bytes in use: the ratio the capacity lie needs"),
    Attribute("watermark_state", lambda e: e.device.watermarks.state.value + "\n",
              pollable=True, doc="ok, pressure or full; poll(2) wakes on change"),
    Attribute("pressure", lambda e: f"{e.device.pressure()}\n", doc="0 (at low) .. 1000"),
    Attribute("headroom", lambda e: f"{e.device.headroom()}\n",
              doc="pool bytes that can still be placed before high"),
    Attribute("watermark_low", lambda e: f"{e.device.watermarks.low}\n", _set_low,
              doc="fraction of the pool; pressure clears below it",
              event=_setting("low", lambda e: e.device.watermarks.low)),
    Attribute("watermark_high", lambda e: f"{e.device.watermarks.high}\n", _set_high,
              doc="fraction of the pool; pressure rises above it",
              event=_setting("high", lambda e: e.device.watermarks.high)),
    Attribute("write_policy", lambda e: e.device.policy.value + "\n", _set_policy,
              doc="reject, throttle or none",
              event=_setting("policy", lambda e: e.device.policy.value)),
    Attribute("failure_mode", lambda e: e.device.failure_mode.value + "\n", _set_failure_mode,
              doc="drop or poison (policy none, past the real capacity)",
              event=_setting("failure_mode", lambda e: e.device.failure_mode.value)),
    Attribute("zero_pending", lambda e: f"{e.device.releasing_bytes}\n",
              doc="pool bytes of released pages waiting for the zero flush"),
    Attribute("pool_resident", lambda e: f"{e.device.pool.resident_bytes()}\n",
              doc="arena bytes the kernel really holds for the pool (memfd blocks)"),
    Attribute("lost_pages", _lost_pages, doc="page index and fate of each lost page"),
    Attribute("discard_support", lambda e: f"{int(discard_supported())}\n",
              doc="1 if discards (fallocate PUNCH_HOLE, ZERO_RANGE) reach the device"),
    Attribute("discarded_pages", lambda e: f"{e.device.counters.discarded_pages}\n",
              doc="whole pages released by discards (also in io_stat's notify_free)"),
    Attribute("compact", None, _compact, doc="write 1: compact the pool now",
              event=lambda e: ("compact", {})),
    Attribute("mem_used_max", lambda e: f"{e.device.pool.max_used_bytes}\n", _reset_max,
              doc="peak pool use; write 0 to reset, as zram's mem_used_max",
              event=lambda e: ("reset_max", {})),
    Attribute("trace", _trace_state, _set_trace,
              doc="off, or recording PATH; write 'start /abs/path' or 'stop' (cramfs trace)"),
    Attribute("interrupt_stat", lambda e: _fields(e.device.interrupts.stat()),
              doc="watermark wake-ups: delivered delayed dropped"),
    Attribute("refusal_storms", lambda e: f"{e.storm.storms}\n",
              doc="refusal storms recognised: the same refused writes retried again and again"),
)

# The allocation gate: on swap and node devices (zswap never refuses a write).
GATE_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("no_alloc", lambda e: f"{int(e.device.no_alloc)}\n", _set_no_alloc,
              doc="1: every write that needs new pool space fails ENOSPC (reason gate)",
              event=_setting("no_alloc", lambda e: e.device.no_alloc)),
)


ZSWAP_COUNTERS = ("pool_limit_hit", "reject_reclaim_fail", "reject_alloc_fail",
                  "reject_kmemcache_fail", "reject_compress_fail", "reject_compress_poor",
                  "decompress_fail", "written_back_pages", "pool_total_size", "stored_pages",
                  "stored_incompressible_pages")


def _zswap(entry: DeviceEntry) -> ZswapDevice:
    """The zswap device behind a zswap-only file (the registry gives these files to no other
    kind)."""
    device = entry.device
    assert isinstance(device, ZswapDevice), f"{entry.name} is not a zswap device"
    return device


def _zswap_counter(name: str) -> Reader:
    return lambda entry: f"{_zswap(entry).debugfs()[name]}\n"


def _percent(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"not a whole percent: {text!r}")
    return int(text)


def _set_max_pool(entry: DeviceEntry, text: str) -> None:
    _zswap(entry).set_limits(max_pool_percent=_percent(text))


def _set_accept(entry: DeviceEntry, text: str) -> None:
    _zswap(entry).set_limits(accept_threshold_percent=_percent(text))


def _backing_allocated(entry: DeviceEntry) -> str:
    backing = _zswap(entry).backing
    return f"{backing.allocated_bytes() if backing is not None else 0}\n"


ZSWAP_ATTRIBUTES: tuple[Attribute, ...] = tuple(
    Attribute(name, _zswap_counter(name), doc="as zswap's debugfs file of the same name")
    for name in ZSWAP_COUNTERS) + (
    Attribute("max_pool_percent", lambda e: f"{_zswap(e).max_pool_percent}\n", _set_max_pool,
              doc="share of the pool zswap may fill",
              event=_setting("max_pool_percent", lambda e: _zswap(e).max_pool_percent)),
    Attribute("accept_threshold_percent", lambda e: f"{_zswap(e).accept_threshold_percent}\n",
              _set_accept, doc="after the limit is hit, refuse until usage is below this "
              "share of the limit",
              event=_setting("accept_threshold_percent",
                             lambda e: _zswap(e).accept_threshold_percent)),
    Attribute("backing_pages", lambda e: f"{e.device.backing_pages}\n",
              doc="pages living in the backing file"),
    Attribute("backing_allocated", _backing_allocated,
              doc="bytes the backing file really occupies on disk"),
)


NODE_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("safe_pages", lambda e: f"{e.device.safe_pages()}\n",
              doc="pages of the present compressibility that fit before high: ask before "
              "placing"),
    Attribute("zratio", lambda e: f"{e.device.zratio():.4f}\n",
              doc="the ratio the device promises: size / pool"),
    Attribute("balloon_pages", lambda e: f"{e.device.balloon_pages()}\n",
              doc="advertised pages to withhold so the rest is backed at the achieved ratio"),
    Attribute("trim_count", lambda e: f"{e.device.counters.discarded_pages}\n",
              doc="pages the host released by discard: the device's media zero (trim)"),
)


def attributes_for(kind: str) -> tuple[Attribute, ...]:
    if kind == "zswap":
        return ATTRIBUTES + ZSWAP_ATTRIBUTES
    if kind == "node":
        return ATTRIBUTES + GATE_ATTRIBUTES + NODE_ATTRIBUTES
    return ATTRIBUTES + GATE_ATTRIBUTES
