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
from daemon import recording
from daemon.capabilities import discard_supported
from daemon.devices import DeviceEntry

Reader = Callable[[DeviceEntry], str]
Writer = Callable[[DeviceEntry, str], None]
# What a successful write records in a trace (daemon.recording): an event kind and its fields.
Event = Callable[[DeviceEntry], tuple[str, dict[str, object]]]


def setting(key: str, value: Callable[[DeviceEntry], object]) -> Event:
    """A trace event recording that ``key`` was set to what ``value`` reads now."""
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
    """A watermark as text; its range is the device's to check (set_watermarks)."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def _set_low(entry: DeviceEntry, text: str) -> None:
    entry.device.set_watermarks(low=_fraction(text))


def _set_high(entry: DeviceEntry, text: str) -> None:
    entry.device.set_watermarks(high=_fraction(text))


def _set_policy(entry: DeviceEntry, text: str) -> None:
    entry.device.set_policy(Policy(text))


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
              event=setting("low", lambda e: e.device.watermarks.low)),
    Attribute("watermark_high", lambda e: f"{e.device.watermarks.high}\n", _set_high,
              doc="fraction of the pool; pressure rises above it",
              event=setting("high", lambda e: e.device.watermarks.high)),
    Attribute("write_policy", lambda e: e.device.policy.value + "\n", _set_policy,
              doc="reject, throttle or none",
              event=setting("policy", lambda e: e.device.policy.value)),
    Attribute("failure_mode", lambda e: e.device.failure_mode.value + "\n", _set_failure_mode,
              doc="drop or poison (policy none, past the real capacity)",
              event=setting("failure_mode", lambda e: e.device.failure_mode.value)),
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


def attributes_for(kind: str) -> tuple[Attribute, ...]:
    """Every file of a device of ``kind``: the common ones, then the kind's own (its entry in
    the registry, daemon.kinds, which imports this module for Attribute: hence the late
    import)."""
    from daemon.kinds import kind_named

    return ATTRIBUTES + kind_named(kind).files
