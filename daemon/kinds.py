"""Device kinds as types: one registry from a kind's name to everything that differs by kind.

A kind is a device class, its own config keys (parsed into a typed settings object that also
builds the device and re-tunes it on reload), the attribute files it adds to the common ones
(daemon.attributes), and the background work the daemon runs for it. Adding a kind is one
more ``Kind`` in ``REGISTRY``; nothing else in the daemon compares kind names or device
classes. Metrics are the same families for every kind (the README's reference table), so a
kind adds none.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import trio

from cramfs.device import CompressedDevice, DeviceConfig
from cramfs.stats import ZSWAP_DEBUGFS_FIELDS
from cramfs.zswap import (
    DEFAULT_ACCEPT_THRESHOLD_PERCENT,
    DEFAULT_MAX_POOL_PERCENT,
    ZswapDevice,
    validate_percents,
)
from daemon import recording
from daemon.attributes import Attribute, Reader, setting
from daemon.devices import DeviceEntry

Background = Callable[[DeviceEntry], Awaitable[None]]


class SettingError(ValueError):
    """A kind's own key is wrong; ``key`` names it (the caller adds ``device.NAME.``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


# -- settings: a kind's own config keys ----------------------------------------------------
@dataclass
class Settings:
    """The keys a kind adds to ``[device.NAME]``; the plain kinds add none."""

    KEYS: ClassVar[frozenset[str]] = frozenset()
    RUNTIME_KEYS: ClassVar[tuple[str, ...]] = ()  # a SIGHUP applies these at once
    RESTART_KEYS: ClassVar[tuple[str, ...]] = ()  # these need a restart

    @classmethod
    def parse(cls, table: Mapping[str, Any]) -> Self:
        """The kind's keys of a device table (unknown keys are refused before this)."""
        return cls()

    def build(self, config: DeviceConfig) -> CompressedDevice:
        """The device this kind emulates. SettingError names a key the machine refused."""
        return CompressedDevice(config)

    def apply(self, device: CompressedDevice, key: str) -> object:
        """Put runtime ``key`` into effect on a running device; returns the value set."""
        raise KeyError(key)


@dataclass
class ZswapSettings(Settings):
    """zswap's backing file and its pool limit with hysteresis. The percent ranges are the
    device's own (cramfs.zswap.validate_percents)."""

    KEYS = frozenset({"backing_file", "max_pool_percent", "accept_threshold_percent"})
    RUNTIME_KEYS = ("max_pool_percent", "accept_threshold_percent")
    RESTART_KEYS = ("backing_file",)

    backing_file: Path
    max_pool_percent: int = DEFAULT_MAX_POOL_PERCENT
    accept_threshold_percent: int = DEFAULT_ACCEPT_THRESHOLD_PERCENT

    @classmethod
    def parse(cls, table: Mapping[str, Any]) -> Self:
        backing = table.get("backing_file")
        if not isinstance(backing, str) or not backing:
            raise SettingError("backing_file", "required for zswap devices (a path on disk)")
        max_pool = table.get("max_pool_percent", DEFAULT_MAX_POOL_PERCENT)
        accept = table.get("accept_threshold_percent", DEFAULT_ACCEPT_THRESHOLD_PERCENT)
        # each against the other's default, so the message names the key that is wrong
        for key, pair in (("max_pool_percent", (max_pool, DEFAULT_ACCEPT_THRESHOLD_PERCENT)),
                          ("accept_threshold_percent", (DEFAULT_MAX_POOL_PERCENT, accept))):
            try:
                validate_percents(*pair)
            except ValueError as exc:
                raise SettingError(key, str(exc)) from None
        return cls(Path(backing), max_pool, accept)

    def build(self, config: DeviceConfig) -> CompressedDevice:
        try:
            return ZswapDevice(config, self.backing_file, self.max_pool_percent,
                               self.accept_threshold_percent)
        except OSError as exc:
            raise SettingError("backing_file",
                               f"{self.backing_file}: {exc.strerror}") from None

    def apply(self, device: CompressedDevice, key: str) -> object:
        if key not in self.RUNTIME_KEYS:
            raise KeyError(key)
        zswap_of(device).set_limits(self.max_pool_percent, self.accept_threshold_percent)
        return getattr(self, key)


def zswap_of(device: CompressedDevice) -> ZswapDevice:
    """The zswap device behind a zswap kind's file or task (the registry gives those to no
    other kind, so this never fails in the daemon)."""
    if not isinstance(device, ZswapDevice):
        raise TypeError(f"{type(device).__name__} is not a zswap device")
    return device


# -- the files each kind adds --------------------------------------------------------------
def _set_no_alloc(entry: DeviceEntry, text: str) -> None:
    if text not in ("0", "1"):
        raise ValueError("write 1 to close the allocation gate, 0 to open it")
    entry.device.set_no_alloc(text == "1")


# The allocation gate: on swap and node devices (zswap never refuses a write).
GATE_FILES: tuple[Attribute, ...] = (
    Attribute("no_alloc", lambda e: f"{int(e.device.no_alloc)}\n", _set_no_alloc,
              doc="1: every write that needs new pool space fails ENOSPC (reason gate)",
              event=setting("no_alloc", lambda e: e.device.no_alloc)),
)

NODE_FILES: tuple[Attribute, ...] = (
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

# zswap's debugfs counters, one file each: the device's own table of their names.
ZSWAP_COUNTERS = ZSWAP_DEBUGFS_FIELDS


def _zswap(entry: DeviceEntry) -> ZswapDevice:
    return zswap_of(entry.device)


def _zswap_counter(name: str) -> Reader:
    return lambda entry: f"{_zswap(entry).debugfs()[name]}\n"


def _percent(text: str) -> int:
    """A whole percent as text; its range is the device's to check (set_limits)."""
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


ZSWAP_FILES: tuple[Attribute, ...] = tuple(
    Attribute(name, _zswap_counter(name), doc="as zswap's debugfs file of the same name")
    for name in ZSWAP_COUNTERS) + (
    Attribute("max_pool_percent", lambda e: f"{_zswap(e).max_pool_percent}\n", _set_max_pool,
              doc="share of the pool zswap may fill",
              event=setting("max_pool_percent", lambda e: _zswap(e).max_pool_percent)),
    Attribute("accept_threshold_percent", lambda e: f"{_zswap(e).accept_threshold_percent}\n",
              _set_accept, doc="after the limit is hit, refuse until usage is below this "
              "share of the limit",
              event=setting("accept_threshold_percent",
                            lambda e: _zswap(e).accept_threshold_percent)),
    Attribute("backing_pages", lambda e: f"{e.device.backing_pages}\n",
              doc="pages living in the backing file"),
    Attribute("backing_allocated", _backing_allocated,
              doc="bytes the backing file really occupies on disk"),
)


# -- background work -----------------------------------------------------------------------
SHRINKER_IDLE = 0.02  # seconds between checks of a zswap pool
SHRINK_BATCH = 64  # pages a shrinker pass writes back at most, so FUSE requests interleave


async def shrink(entry: DeviceEntry) -> None:
    """zswap's shrink worker: write cold pages back while the pool is above the accept
    threshold, a batch at a time so FUSE requests interleave."""
    device = _zswap(entry)
    while True:
        if device.needs_writeback():
            written = device.writeback(max_pages=SHRINK_BATCH)
            # even a batch that wrote nothing aged the referenced bits: replay needs it
            recording.event(entry, "writeback", max_pages=SHRINK_BATCH, written=written)
            if written == 0:
                await trio.sleep(SHRINKER_IDLE)  # nothing cold yet: let bits age
            else:
                await trio.sleep(0)
        else:
            await trio.sleep(SHRINKER_IDLE)


# -- the registry --------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    name: str
    doc: str
    device_class: type[CompressedDevice]
    settings: type[Settings] = Settings
    files: tuple[Attribute, ...] = ()  # beyond daemon.attributes.ATTRIBUTES
    background: Background | None = None  # run beside FUSE for each device of the kind


REGISTRY: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("swap", "a zram-like device for loop-swap", CompressedDevice, files=GATE_FILES),
    Kind("zswap", "a compressed cache in front of a backing file", ZswapDevice,
         ZswapSettings, ZSWAP_FILES, background=shrink),
    Kind("node", "a compressed-RAM node with a driver interface", CompressedDevice,
         files=GATE_FILES + NODE_FILES),
)}
NAMES = tuple(REGISTRY)


def kind_named(name: str) -> Kind:
    """The registered kind; KeyError for a name the config would have refused."""
    return REGISTRY[name]
