"""The TOML configuration: parsed with tomllib, validated whole before anything starts.

Every error names the key it is about, so `cramfsd` can exit 2 with one line that tells the
user what to fix.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from cramfs import PAGE_SIZE, compressors
from cramfs.device import DeviceConfig
from cramfs.interrupts import InterruptConfig
from cramfs.sizes import parse_size
from cramfs.timing import TimingConfig
from cramfs.watermarks import FailureMode, Policy, validate_marks
from cramfs.zswap import DEFAULT_ACCEPT_THRESHOLD_PERCENT, DEFAULT_MAX_POOL_PERCENT
from daemon.addresses import AddressError, parse_address
from daemon.devices import KINDS

DEFAULT_PATH = Path("/etc/cramfs/cramfs.toml")
COMPRESSORS = compressors.NAMES
# zstd level when a device does not name one, chosen by measurement (tests/bench/levels.py and
# compare.py --level, 64 MiB of real process pages, best of 3; the table in the README's
# Benchmarks): -1 ("fast 1") compresses 1 MiB writes through FUSE ~18% faster than level 1
# with ~17% less CPU, and its pool holds the same pages in ~0.8x of the memory kernel zram
# (lzo-rle) needs (level 1: 0.73x). -2 was no faster beyond noise and needs 0.87x, close to
# zram's own; -3 reaches zram's 1.0x, giving up the reason to compress harder than zram.
DEFAULT_LEVEL = -1
_TOP_KEYS = {"mountpoint", "metrics_address", "device"}
_DEVICE_KEYS = {"kind", "size", "pool", "compressor", "level", "watermarks", "huge_threshold",
                "zero_flush_interval", "timing", "interrupts", "trace"}
_TIMING_KEYS = {"read_latency", "write_latency", "read_bandwidth", "write_bandwidth",
                "read_error_rate", "write_error_rate", "seed"}
_ZSWAP_KEYS = {"backing_file", "max_pool_percent", "accept_threshold_percent"}
_WATERMARK_KEYS = {"low", "high", "policy", "failure_mode", "throttle_max_delay",
                   "no_alloc_on_full"}
_INTERRUPT_KEYS = {"delay", "drop_rate", "seed"}


_E = TypeVar("_E", bound=Enum)


class ConfigError(ValueError):
    """A bad configuration; the message names the key."""


@dataclass
class ZswapSpec:
    """A zswap device's own keys: its backing file and its pool limit with hysteresis."""

    backing_file: Path
    max_pool_percent: int = DEFAULT_MAX_POOL_PERCENT
    accept_threshold_percent: int = DEFAULT_ACCEPT_THRESHOLD_PERCENT


@dataclass
class DeviceSpec:
    name: str
    kind: str
    device: DeviceConfig
    compressor: str = "zstd"
    zswap: ZswapSpec | None = None  # zswap devices only
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
    kind = body.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    allowed = _DEVICE_KEYS | (_ZSWAP_KEYS if kind == "zswap" else set())
    _no_unknown(body, allowed, f"{where}.")
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
    extra: dict[str, Any] = {}
    if "huge_threshold" in body:
        extra["huge_threshold"] = _int(body["huge_threshold"], f"{where}.huge_threshold",
                                       256, PAGE_SIZE)
    marks = body.get("watermarks", {})
    if not isinstance(marks, dict):
        raise ConfigError(f"{where}.watermarks: must be a table")
    _no_unknown(marks, _WATERMARK_KEYS, f"{where}.watermarks.")
    low, high = marks.get("low", 0.80), marks.get("high", 0.90)
    try:
        validate_marks(low, high)
    except ValueError as exc:
        raise ConfigError(f"{where}.watermarks: {exc}") from exc
    policy = _enum(Policy, marks.get("policy", "reject"), f"{where}.watermarks.policy")
    mode = _enum(FailureMode, marks.get("failure_mode", "poison"),
                 f"{where}.watermarks.failure_mode")
    delay = marks.get("throttle_max_delay", 0.05)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= 60:
        raise ConfigError(f"{where}.watermarks.throttle_max_delay: seconds in 0..60, "
                          f"got {delay!r}")
    if "zero_flush_interval" in body:
        extra["zero_flush_interval"] = _number(body["zero_flush_interval"],
                                               f"{where}.zero_flush_interval", 0, 3600)
    extra["timing"] = _timing(body.get("timing", {}), f"{where}.timing")
    extra["interrupts"] = _interrupts(body.get("interrupts", {}), f"{where}.interrupts")
    gate = marks.get("no_alloc_on_full", False)
    if not isinstance(gate, bool):
        raise ConfigError(f"{where}.watermarks.no_alloc_on_full: must be true or false, "
                          f"got {gate!r}")
    extra["no_alloc_on_full"] = gate
    try:
        config = DeviceConfig(size=size, pool=pool, level=level, compressor=compressor,
                              low=float(low),
                              high=float(high), policy=policy, failure_mode=mode,
                              throttle_max_delay=float(delay), **extra)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    zswap = _zswap(body, where) if kind == "zswap" else None
    trace = body.get("trace")
    if trace is not None and (not isinstance(trace, str) or not trace.startswith("/")):
        raise ConfigError(f"{where}.trace: must be an absolute path, got {trace!r}")
    return DeviceSpec(name, kind, config, compressor, zswap,
                      Path(trace) if trace is not None else None)


def _zswap(body: dict[str, Any], where: str) -> ZswapSpec:
    backing = body.get("backing_file")
    if not isinstance(backing, str) or not backing:
        raise ConfigError(f"{where}.backing_file: required for zswap devices (a path on disk)")
    max_pool = _int(body.get("max_pool_percent", DEFAULT_MAX_POOL_PERCENT),
                    f"{where}.max_pool_percent", 1, 100)
    accept = _int(body.get("accept_threshold_percent", DEFAULT_ACCEPT_THRESHOLD_PERCENT),
                  f"{where}.accept_threshold_percent", 0, 100)
    return ZswapSpec(Path(backing), max_pool, accept)


def _interrupts(table: Any, where: str) -> InterruptConfig:
    """How unreliable the watermark interrupt line is (delay, drop_rate, seed)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    _no_unknown(table, _INTERRUPT_KEYS, f"{where}.")
    values: dict[str, Any] = {}
    if "delay" in table:
        values["delay"] = _number(table["delay"], f"{where}.delay", 0, 3600)
    if "drop_rate" in table:
        values["drop_rate"] = _number(table["drop_rate"], f"{where}.drop_rate", 0, 1)
    if "seed" in table:
        values["seed"] = _int(table["seed"], f"{where}.seed", 0, 2**63)
    return InterruptConfig(**values)


def _timing(table: Any, where: str) -> TimingConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    _no_unknown(table, _TIMING_KEYS, f"{where}.")
    values: dict[str, Any] = {}
    for op in ("read", "write"):
        if f"{op}_latency" in table:
            values[f"{op}_latency"] = _number(table[f"{op}_latency"], f"{where}.{op}_latency",
                                              0, 60)
        if f"{op}_bandwidth" in table:
            try:
                values[f"{op}_bandwidth"] = parse_size(table[f"{op}_bandwidth"])
            except ValueError as exc:
                raise ConfigError(f"{where}.{op}_bandwidth: {exc} (bytes per second)") from exc
        if f"{op}_error_rate" in table:
            values[f"{op}_error_rate"] = _number(table[f"{op}_error_rate"],
                                                 f"{where}.{op}_error_rate", 0, 1)
    if "seed" in table:
        values["seed"] = _int(table["seed"], f"{where}.seed", 0, 2**63)
    return TimingConfig(**values)


def _number(value: Any, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{key}: must be a number in {low}..{high}, got {value!r}")
    return float(value)


def _size(value: Any, key: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    if size <= 0 or size % PAGE_SIZE:
        raise ConfigError(f"{key}: must be a positive multiple of 4K, got {value!r}")
    return size


def _int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key}: must be an integer in {low}..{high}, got {value!r}")
    return value


def _enum(kind: type[_E], value: Any, key: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        names = ", ".join(member.value for member in kind)
        raise ConfigError(f"{key}: must be one of {names}, got {value!r}") from None
