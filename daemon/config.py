"""The TOML configuration: parsed with tomllib, validated whole before anything starts.

Every error names the key it is about, so `cramfsd` can exit 2 with one line that tells the
user what to fix.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from cramfs import PAGE_SHIFT, PAGE_SIZE, compressors, pagetable
from cramfs.device import DeviceConfig
from cramfs.interrupts import InterruptConfig
from cramfs.sizes import format_size_approx, parse_size
from cramfs.timing import TimingConfig
from cramfs.watermarks import FailureMode, Policy, validate_marks
from daemon import kinds
from daemon.addresses import AddressError, parse_address
from daemon.kinds import Settings

DEFAULT_PATH = Path("/etc/cramfs/cramfs.toml")
COMPRESSORS = compressors.NAMES
# zstd level when a device does not name one, chosen by measurement (tests/bench/levels.py and
# compare.py --level, 64 MiB of real process pages, best of 3; the table in the README's
# Benchmarks): -1 ("fast 1") compresses 1 MiB writes through FUSE ~18% faster than level 1
# with ~17% less CPU, and its pool holds the same pages in ~0.8x of the memory kernel zram
# (lzo-rle) needs (level 1: 0.73x). -2 was no faster beyond noise and needs 0.87x, close to
# zram's own; -3 reaches zram's 1.0x, giving up the reason to compress harder than zram.
DEFAULT_LEVEL = -1
# A file (a loop device's backing, a FUSE file) is addressed with signed 64-bit offsets.
MAX_FILE_BYTES = 2**63 - 1
# A device's page table may take at most this share (1/N) of the machine's memory before
# anything is stored: beyond it the daemon is OOM-killed at start or starves the host.
MEMORY_SHARE = 4
_TOP_KEYS = {"mountpoint", "metrics_address", "device"}
_DEVICE_KEYS = {"kind", "size", "pool", "compressor", "level", "watermarks", "huge_threshold",
                "zero_flush_interval", "timing", "interrupts", "trace"}
_TIMING_KEYS = {"read_latency", "write_latency", "read_bandwidth", "write_bandwidth",
                "read_error_rate", "write_error_rate", "seed"}
_WATERMARK_KEYS = {"low", "high", "policy", "failure_mode", "throttle_max_delay",
                   "no_alloc_on_full"}
_INTERRUPT_KEYS = {"delay", "drop_rate", "seed"}


_E = TypeVar("_E", bound=Enum)


class ConfigError(ValueError):
    """A bad configuration; the message names the key."""


@dataclass
class DeviceSpec:
    name: str
    kind: str
    device: DeviceConfig
    compressor: str = "zstd"
    settings: Settings = field(default_factory=Settings)  # the kind's own keys (daemon.kinds)
    trace: Path | None = None  # record the device's traffic from start (cramfs replay)


@dataclass
class Config:
    mountpoint: Path
    metrics_address: str
    devices: list[DeviceSpec]
    source: str  # where it came from, for the log
    # the setting each value came from, for messages: the file's key or the command line's
    mountpoint_key: str = "mountpoint"
    metrics_key: str = "metrics_address"


def default_text() -> str:
    return resources.files("daemon").joinpath("default.toml").read_text()


def load(path: Path | None) -> Config:
    """Read ``path``; without one, /etc/cramfs/cramfs.toml if present, else the default."""
    if path is None:
        if DEFAULT_PATH.exists():
            path = DEFAULT_PATH
        else:
            return parse(default_text(), "embedded default")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return parse(text, str(path))


def parse(text: str, source: str = "<string>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    _no_unknown(raw, _TOP_KEYS, "")
    mountpoint = raw.get("mountpoint", "/run/cramfs")
    if not isinstance(mountpoint, str) or not mountpoint:
        raise ConfigError("mountpoint: must be a non-empty path")
    if not mountpoint.startswith("/"):
        # cramfsd changes to / before mounting, so a relative path would mean one thing at
        # start and another on reload
        raise ConfigError(f"mountpoint: must be an absolute path, got {mountpoint!r}")
    address = raw.get("metrics_address", "127.0.0.1:9469")
    if not isinstance(address, str):
        raise ConfigError("metrics_address: must be a string (\"\" turns the endpoint off)")
    if address:
        check_address(address, "metrics_address")
    devices_raw = raw.get("device", {})
    if not isinstance(devices_raw, dict) or not devices_raw:
        raise ConfigError("device: at least one [device.NAME] table is required")
    devices = [_device(name, body) for name, body in devices_raw.items()]
    return Config(Path(mountpoint), address, devices, source)


def check_address(address: str, key: str) -> tuple[str, int]:
    """``HOST:PORT`` read by daemon.addresses (the parser the metrics endpoint binds with);
    an empty host means every IPv4 interface."""
    try:
        return parse_address(address, key)
    except AddressError as exc:
        raise ConfigError(str(exc)) from None


def _no_unknown(table: dict[str, Any], allowed: set[str], prefix: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}: unknown key")


def _device(name: str, body: Any) -> DeviceSpec:
    where = f"device.{name}"
    if not name.isidentifier() or not name.isascii():
        raise ConfigError(f"{where}: device names must be letters, digits and _")
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: must be a table")
    kind_name = body.get("kind")
    if not isinstance(kind_name, str) or kind_name not in kinds.REGISTRY:
        raise ConfigError(f"{where}.kind: must be one of {', '.join(kinds.NAMES)}, "
                          f"got {kind_name!r}")
    kind = kinds.kind_named(kind_name)
    _no_unknown(body, _DEVICE_KEYS | kind.settings.KEYS, f"{where}.")
    for key in ("size", "pool"):
        if key not in body:
            raise ConfigError(f"{where}.{key}: required")
    size = _size(body["size"], f"{where}.size")
    pool = _size(body["pool"], f"{where}.pool")
    compressor = body.get("compressor", "zstd")
    if compressor not in COMPRESSORS:
        raise ConfigError(f"{where}.compressor: must be one of {', '.join(COMPRESSORS)}, "
                          f"got {compressor!r}")
    try:
        compressors.make(compressor, None)  # its binding is installed
    except compressors.CompressorUnavailable as exc:
        raise ConfigError(f"{where}.compressor: {exc}") from None
    level = body.get("level", DEFAULT_LEVEL if compressor == "zstd" else None)
    try:
        level = compressors.validate(compressor, level)
    except ValueError as exc:
        raise ConfigError(f"{where}.level: {exc}") from None
    values: dict[str, Any] = {"size": size, "pool": pool, "level": level,
                              "compressor": compressor}
    if "huge_threshold" in body:
        values["huge_threshold"] = _integer(body["huge_threshold"], f"{where}.huge_threshold")
    if "zero_flush_interval" in body:
        values["zero_flush_interval"] = _number(body["zero_flush_interval"],
                                                f"{where}.zero_flush_interval")
    values.update(_watermarks(body.get("watermarks", {}), f"{where}.watermarks"))
    values["timing"] = _timing(body.get("timing", {}), f"{where}.timing")
    values["interrupts"] = _interrupts(body.get("interrupts", {}), f"{where}.interrupts")
    config = _checked(DeviceConfig, values, where, _DEVICE_KEY_OF,
                      base={"size": PAGE_SIZE, "pool": PAGE_SIZE})
    _describable(size, body["size"], f"{where}.size")
    try:
        settings = kind.settings.parse(body)
    except kinds.SettingError as exc:
        raise ConfigError(f"{where}.{exc.key}: {exc}") from None
    trace = body.get("trace")
    if trace is not None and (not isinstance(trace, str) or not trace.startswith("/")):
        raise ConfigError(f"{where}.trace: must be an absolute path, got {trace!r}")
    return DeviceSpec(name, kind.name, config, compressor, settings,
                      Path(trace) if trace is not None else None)


def _watermarks(marks: Any, where: str) -> dict[str, Any]:
    """The DeviceConfig fields of ``[device.NAME.watermarks]``."""
    if not isinstance(marks, dict):
        raise ConfigError(f"{where}: must be a table")
    _no_unknown(marks, _WATERMARK_KEYS, f"{where}.")
    low, high = marks.get("low", 0.80), marks.get("high", 0.90)
    try:
        validate_marks(low, high)  # the Watermarks' own check
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    delay = _number(marks.get("throttle_max_delay", 0.05), f"{where}.throttle_max_delay")
    gate = marks.get("no_alloc_on_full", False)
    if not isinstance(gate, bool):
        raise ConfigError(f"{where}.no_alloc_on_full: must be true or false, got {gate!r}")
    return {"low": float(low), "high": float(high),
            "policy": _enum(Policy, marks.get("policy", "reject"), f"{where}.policy"),
            "failure_mode": _enum(FailureMode, marks.get("failure_mode", "poison"),
                                  f"{where}.failure_mode"),
            "throttle_max_delay": delay, "no_alloc_on_full": gate}


def _interrupts(table: Any, where: str) -> InterruptConfig:
    """How unreliable the watermark interrupt line is (delay, drop_rate, seed)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    _no_unknown(table, _INTERRUPT_KEYS, f"{where}.")
    values: dict[str, Any] = {key: table[key] for key in ("delay", "drop_rate") if key in table}
    if "seed" in table:
        values["seed"] = _integer(table["seed"], f"{where}.seed")
    return _checked(InterruptConfig, values, where)


def _timing(table: Any, where: str) -> TimingConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    _no_unknown(table, _TIMING_KEYS, f"{where}.")
    values: dict[str, Any] = {}
    for op in ("read", "write"):
        for key in (f"{op}_latency", f"{op}_error_rate"):
            if key in table:
                values[key] = _number(table[key], f"{where}.{key}")
        if f"{op}_bandwidth" in table:
            try:
                values[f"{op}_bandwidth"] = parse_size(table[f"{op}_bandwidth"])
            except ValueError as exc:
                raise ConfigError(f"{where}.{op}_bandwidth: {exc} (bytes per second)") from exc
    if "seed" in table:
        values["seed"] = _integer(table["seed"], f"{where}.seed")
    return _checked(TimingConfig, values, where)


_T = TypeVar("_T")
# DeviceConfig fields read from the watermarks table, by their key there
_DEVICE_KEY_OF = {key: f"watermarks.{key}" for key in
                  ("low", "high", "policy", "failure_mode", "throttle_max_delay",
                   "no_alloc_on_full")}


def _checked(make: Callable[..., _T], values: dict[str, Any], where: str,
             key_of: dict[str, str] | None = None, base: dict[str, Any] | None = None) -> _T:
    """``make(**values)``, the object that owns the ranges checking them. A refusal names
    the key: each value is tried alone (over ``base``, what ``make`` needs besides) to find
    the one refused; a refusal of no single value names the table ``where``."""
    try:
        return make(**values)
    except ValueError as exc:
        message = str(exc)
    for field_name, value in values.items():
        try:
            make(**{**(base or {}), field_name: value})
        except ValueError as exc:
            key = (key_of or {}).get(field_name, field_name)
            raise ConfigError(f"{where}.{key}: {_without_name(str(exc), field_name)}") from None
    raise ConfigError(f"{where}: {message}")


def _without_name(message: str, name: str) -> str:
    """"read_latency must be 0..60" -> "must be 0..60": the key leads the line already."""
    first, _, rest = message.partition(" ")
    return rest if rest and (first == name or first.endswith("." + name)) else message


def _number(value: Any, key: str) -> float:
    """A number (its range is checked by the object it configures)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    return float(value)


def machine_memory() -> int | None:
    """The machine's memory (MemTotal), bytes; None where /proc/meminfo cannot tell."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _describable(size: int, text: Any, key: str) -> None:
    """Refuse a size whose page table alone (pagetable.fixed_bytes: what an empty device of
    that many pages costs) would take more than MEMORY_SHARE of the machine's memory: it
    would be OOM-killed at start or starve the host before storing a page."""
    total = machine_memory()
    if total is None:
        return
    fixed = pagetable.fixed_bytes(size >> PAGE_SHIFT)
    if fixed * MEMORY_SHARE > total:
        raise ConfigError(
            f"{key}: {text!r} needs {format_size_approx(fixed)} of page-table metadata before "
            f"storing anything, more than 1/{MEMORY_SHARE} of this machine's "
            f"{format_size_approx(total)} of memory")


def _size(value: Any, key: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    if size > MAX_FILE_BYTES:
        # loop devices and FUSE address a file with signed 64-bit offsets
        raise ConfigError(f"{key}: {value!r} is beyond what a file can address "
                          f"({MAX_FILE_BYTES} bytes)")
    return size  # its multiple of 4K and its upper bound are DeviceConfig's to check


def _integer(value: Any, key: str) -> int:
    """An integer, not a bool (its range is checked by the object it configures)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: must be an integer, got {value!r}")
    return value


def _enum(kind: type[_E], value: Any, key: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        names = ", ".join(member.value for member in kind)
        raise ConfigError(f"{key}: must be one of {names}, got {value!r}") from None
