"""cramfsd: serve the configured devices over FUSE (and metrics over HTTP) until stopped.

Stopping is safe for swap: on SIGTERM/SIGINT the daemon exits only once no data file is open.
While a loop device holds one (swap may be active on it), it logs which device is in use and
keeps serving; `cramfs swapoff NAME` releases it and the daemon then unmounts and exits.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyfuse3
import trio

from cramfs.device import CompressedDevice
from cramfs.errors import PoolUnavailable
from cramfs.timing import Timing
from daemon import config as configuration
from daemon import kinds, recording, system
from daemon.capabilities import DISCARD_UNAVAILABLE, discard_supported
from daemon.devices import DeviceEntry
from daemon.fs import CramOperations

if TYPE_CHECKING:
    from daemon.metrics import Metrics

log = logging.getLogger("cramfs")
MAX_BACKGROUND = 64
FUSE_WORKERS = 64
FUSE_MIN_TASKS = 4


class UsageError(Exception):
    """Bad command line or configuration: exit 2 with one line."""


@dataclass
class Options:
    """The command line. Paths are absolute, made so at start: the daemon changes to / before
    it mounts, and a SIGHUP reload must find the same file a relative --config named."""

    config: Path | None = None
    mountpoint: Path | None = None
    metrics_address: str | None = None
    log_level: str = "info"


def _absolute(text: str) -> Path:
    return Path(text).absolute()


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="cramfsd", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=_absolute, help="TOML file (default "
                        "/etc/cramfs/cramfs.toml if present, else the embedded default)")
    parser.add_argument("--mountpoint", type=_absolute, help="overrides the config's mountpoint")
    parser.add_argument("--metrics-address", help='HOST:PORT (an empty host: every IPv4 '
                        'interface; port 0: any free port), or "" to turn metrics off')
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    return Options(args.config, args.mountpoint, args.metrics_address, args.log_level)


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps lines itself; elsewhere add a timestamp.
    under_systemd = "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s" if under_systemd else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def build(args: Options) -> configuration.Config:
    """The configuration file with the command line's overrides applied (they win)."""
    try:
        config = configuration.load(args.config)
        if args.mountpoint is not None:
            config.mountpoint = args.mountpoint
            config.mountpoint_key = "--mountpoint"
        if args.metrics_address is not None:
            if args.metrics_address:
                configuration.check_address(args.metrics_address, "--metrics-address")
            config.metrics_address = args.metrics_address
            config.metrics_key = "--metrics-address"
    except configuration.ConfigError as exc:
        raise UsageError(str(exc)) from None
    return config


def prepare_mountpoint(path: Path, key: str) -> None:
    """Check the mountpoint and create it if missing, before anything is mounted.

    Refused, naming ``key``: a path under a regular file (``/etc/passwd/x``), one that exists
    and is not a directory, one on a pseudo file system (procfs, sysfs, cgroup, ...: a FUSE
    mount has no business there and mkdir fails anyway), and any error creating it. Must not
    run once our own mount is up: a stat of it from the serving thread would wait on itself.
    """
    where = f"{key}: {path}"
    if not path.is_absolute():
        raise UsageError(f"{where}: must be an absolute path")
    existing = path
    while True:
        try:
            info = existing.stat()
        except (FileNotFoundError, NotADirectoryError):  # missing, or below a non-directory
            existing = existing.parent
            continue
        except OSError as exc:
            raise UsageError(f"{where}: {existing}: {exc.strerror}") from None
        break
    if not stat.S_ISDIR(info.st_mode):
        what = "is not a directory" if existing == path else f"{existing} is not a directory"
        raise UsageError(f"{where}: {what}")
    fstype = system.pseudo_filesystem(existing)
    if fstype is not None:
        raise UsageError(f"{where}: {existing} is on a {fstype} file system, not a place "
                         "to mount")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EEXIST:
            reason = "exists and is not a directory"
        raise UsageError(f"{where}: {reason}") from None


def make_device(spec: configuration.DeviceSpec) -> CompressedDevice:
    """The device of the spec's kind (daemon.kinds); exit 2 naming a key the machine refused
    (a backing file that cannot be created, a pool it cannot map)."""
    try:
        return spec.settings.build(spec.device)
    except kinds.SettingError as exc:
        raise UsageError(f"device.{spec.name}.{exc.key}: {exc}") from None
    except PoolUnavailable as exc:
        raise UsageError(f"device.{spec.name}.pool: {exc}") from None


# What a SIGHUP applies at once and what needs a restart, of the DeviceConfig fields every
# kind has; a kind's own keys say the same in its Settings (RUNTIME_KEYS, RESTART_KEYS).
RUNTIME_KEYS = ("low", "high", "policy", "failure_mode", "throttle_max_delay", "timing",
                "interrupts", "no_alloc_on_full")
RESTART_KEYS = ("size", "pool", "compressor", "level", "huge_threshold", "zero_flush_interval")


def reload_plan(old: configuration.Config, new: configuration.Config
                ) -> tuple[list[tuple[str, str, object]], list[str]]:
    """What a SIGHUP may change now, as (device, key, new value), and what it may not (the
    keys that need a restart)."""
    changes: list[tuple[str, str, object]] = []
    restart: list[str] = []
    if new.mountpoint != old.mountpoint:
        restart.append("mountpoint")
    if new.metrics_address != old.metrics_address:
        restart.append("metrics_address")
    before = {spec.name: spec for spec in old.devices}
    after = {spec.name: spec for spec in new.devices}
    restart += [f"device.{name} (added)" for name in after.keys() - before.keys()]
    restart += [f"device.{name} (removed)" for name in before.keys() - after.keys()]
    for name in before.keys() & after.keys():
        a, b = before[name], after[name]
        if a.kind != b.kind:
            restart.append(f"device.{name}.kind")
            continue
        for key in RESTART_KEYS:
            if getattr(a.device, key) != getattr(b.device, key):
                restart.append(f"device.{name}.{key}")
        for key in a.settings.RESTART_KEYS:
            if getattr(a.settings, key) != getattr(b.settings, key):
                restart.append(f"device.{name}.{key}")
        if a.trace != b.trace:
            restart.append(f"device.{name}.trace (use cramfs trace start/stop)")
        for key in RUNTIME_KEYS:
            if getattr(a.device, key) != getattr(b.device, key):
                changes.append((name, key, getattr(b.device, key)))
        for key in a.settings.RUNTIME_KEYS:
            if getattr(a.settings, key) != getattr(b.settings, key):
                changes.append((name, key, getattr(b.settings, key)))
    return changes, restart


class Daemon:
    def __init__(self, config: configuration.Config, args: Options | None = None) -> None:
        self.config = config
        self.args = args  # re-applied on reload: command-line overrides win over the file
        self.metrics: Metrics | None = None
        self.entries = [DeviceEntry(spec.name, spec.kind, make_device(spec),
                                    mountpoint=config.mountpoint)
                        for spec in config.devices]
        for spec, entry in zip(config.devices, self.entries, strict=True):
            if spec.trace is not None:
                try:
                    recording.start(entry, spec.trace)
                except ValueError as exc:
                    self.close()
                    raise UsageError(f"device.{spec.name}.trace: {exc}") from None
        self.ops = CramOperations(self.entries)
        self.stop_requested = False
        self.ops.on_idle = self._idle

    def start_metrics(self) -> None:
        if not self.config.metrics_address:
            return
        from daemon.metrics import Metrics, MetricsAddressError

        metrics = Metrics(lambda: self.entries)
        try:
            metrics.start(self.config.metrics_address, self.config.metrics_key)
        except MetricsAddressError as exc:
            raise UsageError(str(exc)) from None
        self.metrics = metrics
        self.ops.observe = metrics.observe
        log.info("metrics on http://%s/metrics", metrics.address)

    def _idle(self) -> None:
        if self.stop_requested:
            log.info("last device file released; stopping")
            pyfuse3.terminate()

    def request_stop(self, signum: int) -> None:
        busy = self.ops.busy_devices()
        if not busy:
            log.info("%s: stopping", signal.Signals(signum).name)
            self.stop_requested = True
            pyfuse3.terminate()
            return
        self.stop_requested = True
        for name in busy:
            log.warning("%s: not stopping: %s/data is in use (a loop device or swap may hold it);"
                        " release it with `cramfs swapoff %s`; the daemon stops once it is "
                        "released", signal.Signals(signum).name, name, name)

    def prepare(self) -> None:
        """Check and create the mountpoint (exit 2 naming the key on a bad one)."""
        prepare_mountpoint(self.config.mountpoint, self.config.mountpoint_key)

    async def run(self) -> None:
        mountpoint = self.config.mountpoint
        os.chdir("/")  # hold no directory busy (and let "cramfs" name the mount, not ./cramfs)
        options = set(pyfuse3.default_options)
        options.update({"fsname=cramfs", "subtype=cramfs", "allow_other"})
        options.discard("default_permissions")
        if not discard_supported():
            log.warning("%s", DISCARD_UNAVAILABLE)
        try:
            pyfuse3.init(self.ops, str(mountpoint), options)
        except (OSError, RuntimeError) as exc:  # libfuse has printed its own reason above
            raise UsageError(f"{self.config.mountpoint_key}: {mountpoint}: cannot mount "
                             f"({exc})") from None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery)
                nursery.start_soon(self._ready)
                for entry in self.entries:
                    if entry.device.zero_flush_interval:
                        nursery.start_soon(self._zero_flusher, entry)
                    background = kinds.kind_named(entry.kind).background
                    if background is not None:
                        nursery.start_soon(background, entry)
                await pyfuse3.main(min_tasks=FUSE_MIN_TASKS, max_tasks=FUSE_WORKERS)
                nursery.cancel_scope.cancel()
        finally:
            system.sd_notify("STOPPING=1")
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mountpoint)

    async def _ready(self) -> None:
        mountpoint = self.config.mountpoint
        # A stat through the mount proves the loop is serving before we announce it.
        first = self.entries[0].name
        info = await trio.to_thread.run_sync(os.stat, mountpoint / first / "data")
        await trio.to_thread.run_sync(system.tune_fuse_connection, info.st_dev, MAX_BACKGROUND)
        system.sd_notify("READY=1\nSTATUS=serving " + ", ".join(e.name for e in self.entries))
        log.info("mounted %s with %s", mountpoint,
                 ", ".join(f"{e.name} ({e.kind})" for e in self.entries))

    async def _zero_flusher(self, entry: DeviceEntry) -> None:
        """Emulate the device's batched media zeroing of released pages."""
        while True:
            await trio.sleep(entry.device.zero_flush_interval)
            freed = entry.device.flush_releases()
            if freed:
                recording.event(entry, "flush")
                log.debug("%s: zero flush returned %d pages", entry.name, freed)

    async def _signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    system.sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
                    self.reload()
                    system.sd_notify("READY=1")
                else:
                    self.request_stop(signum)

    def reload(self) -> bool:
        """Re-read the config; apply what can change at runtime, log what needs a restart.
        A bad file changes nothing."""
        try:
            new = build(self.args or Options())
        except UsageError as exc:
            log.error("reload: %s; nothing changed", exc)
            return False
        changes, restart = reload_plan(self.config, new)
        for key in restart:
            log.warning("reload: %s changed and needs a restart; keeping the running value", key)
        fresh_specs = {spec.name: spec for spec in new.devices}
        entries = {entry.name: entry for entry in self.entries}
        for name in sorted({name for name, _, _ in changes}):
            keys = [key for device_name, key, _ in changes if device_name == name]
            self._apply(entries[name], fresh_specs[name], keys)
        # Remember the applied values; keep the running ones for what needs a restart.
        for spec in self.config.devices:
            fresh = fresh_specs.get(spec.name)
            if fresh is None or fresh.kind != spec.kind:
                continue
            for key in RUNTIME_KEYS:
                setattr(spec.device, key, getattr(fresh.device, key))
            for key in spec.settings.RUNTIME_KEYS:
                setattr(spec.settings, key, getattr(fresh.settings, key))
        log.info("reload: %d change(s) applied, %d need a restart", len(changes), len(restart))
        return True

    @staticmethod
    def _apply(entry: DeviceEntry, spec: configuration.DeviceSpec, keys: list[str]) -> None:
        """Put the runtime ``keys`` of a re-read device ``spec`` into effect on its device."""
        device, fresh = entry.device, spec.device
        if "low" in keys or "high" in keys:
            device.set_watermarks(low=fresh.low, high=fresh.high)
            recording.event(entry, "set", low=fresh.low, high=fresh.high)
            log.info("reload: %s watermarks low=%s high=%s", entry.name, fresh.low, fresh.high)
        for key in keys:
            if key in ("low", "high"):
                continue
            shown: object
            if key == "policy":
                try:
                    device.set_policy(fresh.policy)  # a kind that never refuses says no
                except ValueError as exc:
                    log.warning("reload: %s.policy = %s ignored: %s", entry.name,
                                fresh.policy.value, exc)
                    continue
                shown = fresh.policy.value
            elif key == "failure_mode":
                device.failure_mode = fresh.failure_mode
                shown = fresh.failure_mode.value
            elif key == "throttle_max_delay":
                device.throttle_max_delay = shown = fresh.throttle_max_delay
            elif key == "no_alloc_on_full":
                device.no_alloc_on_full = shown = fresh.no_alloc_on_full
            elif key == "timing":
                device.timing = Timing(fresh.timing)
                shown = fresh.timing
            elif key == "interrupts":
                device.interrupts.configure(fresh.interrupts)
                shown = fresh.interrupts
            elif key in spec.settings.RUNTIME_KEYS:
                shown = spec.settings.apply(device, key)
            else:
                continue
            if key not in ("timing", "interrupts"):  # replay ignores these two
                recording.event(entry, "set", **{key: shown})
            log.info("reload: %s.%s = %s", entry.name, key, shown)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        for entry in self.entries:
            recording.stop(entry)
            entry.device.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = build(args)
        daemon = Daemon(config, args)
    except UsageError as exc:
        print(f"cramfsd: {exc}", file=sys.stderr)
        return 2
    try:
        daemon.prepare()
        system.tune_allocator()  # before the first thread (the metrics server) mallocs
        daemon.start_metrics()
    except UsageError as exc:
        daemon.close()
        print(f"cramfsd: {exc}", file=sys.stderr)
        return 2
    log.info("configuration: %s", config.source)
    system.set_io_flusher()
    system.lock_memory()
    try:
        trio.run(daemon.run)
    except UsageError as exc:
        print(f"cramfsd: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        daemon.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
