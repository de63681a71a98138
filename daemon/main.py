"""cramfsd: serve the configured devices over FUSE (and metrics over HTTP) until stopped.

Stopping is safe for swap: on SIGTERM/SIGINT the daemon exits only once no data file is open.
While a loop device holds one (swap may be active on it), it logs which device is in use and
keeps serving; `cramfs swapoff NAME` releases it and the daemon then unmounts and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pyfuse3
import trio

from cramfs.device import CompressedDevice
from cramfs.timing import Timing
from cramfs.zswap import ZswapDevice
from daemon import config as configuration
from daemon import recording, system
from daemon.capabilities import DISCARD_UNAVAILABLE, discard_supported
from daemon.devices import DeviceEntry
from daemon.fs import CramOperations

log = logging.getLogger("cramfs")
MAX_BACKGROUND = 64
FUSE_WORKERS = 64
FUSE_MIN_TASKS = 4
SHRINKER_IDLE = 0.02  # seconds between checks of a zswap pool
SHRINK_BATCH = 64  # pages a shrinker pass writes back at most, so FUSE requests interleave


class UsageError(Exception):
    """Bad command line or configuration: exit 2 with one line."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cramfsd", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="TOML file (default /etc/cramfs/cramfs.toml "
                        "if present, else the embedded default)")
    parser.add_argument("--mountpoint", type=Path, help="overrides the config's mountpoint")
    parser.add_argument("--metrics-address", help='HOST:PORT, or "" to turn metrics off')
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps lines itself; elsewhere add a timestamp.
    under_systemd = "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s" if under_systemd else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def build(args: argparse.Namespace) -> configuration.Config:
    try:
        config = configuration.load(args.config)
        if args.mountpoint is not None:
            config.mountpoint = args.mountpoint
        if args.metrics_address is not None:
            if args.metrics_address:
                configuration.check_address(args.metrics_address, "--metrics-address")
            config.metrics_address = args.metrics_address
    except configuration.ConfigError as exc:
        raise UsageError(str(exc)) from None
    return config


def make_device(spec: configuration.DeviceSpec) -> CompressedDevice:
    if spec.kind != "zswap":
        return CompressedDevice(spec.device)
    try:
        return ZswapDevice(spec.device, **spec.zswap)
    except OSError as exc:
        raise UsageError(f"device.{spec.name}.backing_file: {spec.zswap['backing_file']}: "
                         f"{exc.strerror}") from None


RUNTIME_KEYS = ("low", "high", "policy", "failure_mode", "throttle_max_delay", "timing",
                "interrupts", "no_alloc_on_full")
RESTART_KEYS = ("size", "pool", "compressor", "level", "huge_threshold", "zero_flush_interval")


def reload_plan(old: configuration.Config, new: configuration.Config
                ) -> tuple[list[tuple[str, str, object]], list[str]]:
    """What a SIGHUP may change now, and what it may not (needs a restart)."""
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
        if a.zswap.get("backing_file") != b.zswap.get("backing_file"):
            restart.append(f"device.{name}.backing_file")
        if a.trace != b.trace:
            restart.append(f"device.{name}.trace (use cramfs trace start/stop)")
        for key in RUNTIME_KEYS:
            if getattr(a.device, key) != getattr(b.device, key):
                changes.append((name, key, getattr(b.device, key)))
        for key in ("max_pool_percent", "accept_threshold_percent"):
            if a.zswap.get(key) != b.zswap.get(key):
                changes.append((name, key, b.zswap[key]))
    return changes, restart


class Daemon:
    def __init__(self, config: configuration.Config,
                 args: argparse.Namespace | None = None) -> None:
        self.config = config
        self.args = args  # re-applied on reload: command-line overrides win over the file
        self.metrics = None
        self.entries = [DeviceEntry(spec.name, spec.kind, make_device(spec))
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
            metrics.start(self.config.metrics_address)
        except MetricsAddressError as exc:
            raise UsageError(str(exc)) from None
        self.metrics = metrics
        self.ops.observe = metrics.observe
        log.info("metrics on http://%s/metrics", self.config.metrics_address)

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

    async def run(self) -> None:
        mountpoint = self.config.mountpoint.absolute()
        self.config.mountpoint = mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        os.chdir("/")  # hold no directory busy (and let "cramfs" name the mount, not ./cramfs)
        options = set(pyfuse3.default_options)
        options.update({"fsname=cramfs", "subtype=cramfs", "allow_other"})
        options.discard("default_permissions")
        if not discard_supported():
            log.warning("%s", DISCARD_UNAVAILABLE)
        pyfuse3.init(self.ops, str(mountpoint), options)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery)
                nursery.start_soon(self._ready)
                for entry in self.entries:
                    if entry.device.zero_flush_interval:
                        nursery.start_soon(self._zero_flusher, entry)
                    if isinstance(entry.device, ZswapDevice):
                        nursery.start_soon(self._shrinker, entry)
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

    async def _shrinker(self, entry: DeviceEntry) -> None:
        """zswap's shrink worker: write cold pages back while the pool is above the accept
        threshold, a batch at a time so FUSE requests interleave."""
        device = entry.device
        assert isinstance(device, ZswapDevice)
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
            new = build(self.args or parse_args([]))
        except UsageError as exc:
            log.error("reload: %s; nothing changed", exc)
            return False
        changes, restart = reload_plan(self.config, new)
        for key in restart:
            log.warning("reload: %s changed and needs a restart; keeping the running value", key)
        devices = {entry.name: entry.device for entry in self.entries}
        specs = {spec.name: spec for spec in new.devices}
        entries = {entry.name: entry for entry in self.entries}
        for name, key, value in changes:
            device = devices[name]
            if key in ("low", "high"):
                spec = specs[name].device
                device.set_watermarks(low=spec.low, high=spec.high)
                recording.event(entries[name], "set", low=spec.low, high=spec.high)
            elif key == "policy":
                if not isinstance(device, ZswapDevice):
                    device.set_policy(value)
            elif key == "failure_mode":
                device.failure_mode = value
            elif key == "throttle_max_delay":
                device.throttle_max_delay = value
            elif key == "timing":
                device.timing = Timing(value)
            elif key == "interrupts":
                device.interrupts.configure(value)
            elif key == "no_alloc_on_full":
                device.no_alloc_on_full = value
            elif isinstance(device, ZswapDevice):
                device.set_limits(**{key: value})
            if key not in ("low", "high", "timing", "interrupts"):  # replay ignores the last two
                recording.event(entries[name], "set", **{key: getattr(value, "value", value)})
            log.info("reload: %s.%s = %s", name, key, getattr(value, "value", value))
        # Remember the applied values; keep the running ones for what needs a restart.
        for spec in self.config.devices:
            fresh = specs.get(spec.name)
            if fresh is None or fresh.kind != spec.kind:
                continue
            for key in RUNTIME_KEYS:
                setattr(spec.device, key, getattr(fresh.device, key))
            for key in ("max_pool_percent", "accept_threshold_percent"):
                if key in fresh.zswap:
                    spec.zswap[key] = fresh.zswap[key]
        log.info("reload: %d change(s) applied, %d need a restart", len(changes), len(restart))
        return True

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
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        daemon.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
