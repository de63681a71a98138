"""cramfs: the admin tool. Reads the attribute files under the mountpoint; drives losetup,
mkswap and swapon/swapoff for loop-swap on a device file."""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from cramfs.sizes import format_size_approx
from daemon import config as configuration
from daemon import estimate_cli, replay_cli

COLUMNS = ("NAME", "KIND", "ALGORITHM", "DISKSIZE", "POOL", "DATA", "COMPR", "USED", "RATIO",
           "STATE", "PRESSURE", "LOOP")
LEFT = {"NAME", "KIND", "ALGORITHM", "STATE", "LOOP"}  # text columns; the rest are numbers


class CliError(Exception):
    pass


def _run(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise CliError(f"{command[0]} not found: install util-linux") from None
    if done.returncode != 0:
        raise CliError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def default_mountpoint() -> Path:
    try:
        return configuration.load(None).mountpoint
    except configuration.ConfigError:
        return Path("/run/cramfs")


def devices(mountpoint: Path) -> list[Path]:
    if not os.path.ismount(mountpoint):
        raise CliError(f"{mountpoint} is not mounted: is cramfsd running?")
    return sorted(p for p in mountpoint.iterdir() if (p / "data").exists())


def device_dir(mountpoint: Path, name: str) -> Path:
    path = mountpoint / name
    if not os.path.ismount(mountpoint):
        raise CliError(f"{mountpoint} is not mounted: is cramfsd running?")
    if not (path / "data").exists():
        names = ", ".join(p.name for p in devices(mountpoint)) or "none"
        raise CliError(f"no device {name!r} under {mountpoint} (have: {names})")
    return path


def loops_of(data: Path) -> list[str]:
    """Loop devices backed by ``data`` (losetup -j)."""
    out = _run("losetup", "-j", str(data))
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def status(mountpoint: Path) -> str:
    rows = [COLUMNS]
    for path in devices(mountpoint):
        def attr(name: str, path: Path = path) -> str:
            return (path / name).read_text().strip()
        mm = [int(x) for x in attr("mm_stat").split()]
        orig, compr, used = mm[0], mm[1], mm[2]
        ratio = f"{orig / used:.2f}" if used else "-"
        loops = ",".join(loops_of(path / "data")) or "-"
        rows.append((path.name, attr("kind"), _read(path / "algorithm") or "-",
                     format_size_approx(int(attr("disksize"))),
                     format_size_approx(int(attr("pool_capacity"))), format_size_approx(orig),
                     format_size_approx(compr), format_size_approx(used), ratio,
                     attr("watermark_state"), attr("pressure"), loops))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
    left = [name in LEFT for name in COLUMNS]
    return "\n".join(" ".join(str(v).ljust(w) if is_left else str(v).rjust(w)
                              for v, w, is_left in zip(row, widths, left, strict=True))
                     .rstrip() for row in rows) + "\n"


def loop_discards(loop: str) -> bool:
    """Does the loop device pass discards on (the kernel sets this up when the file system
    under the data file answers statfs and has fallocate)?"""
    queue = Path("/sys/block") / Path(loop).name / "queue" / "discard_max_bytes"
    try:
        return int(queue.read_text()) > 0
    except (OSError, ValueError):
        return False


def swap_hazard(path: Path) -> str | None:
    """Why swap on this device can wedge the host, or None when it cannot: the kernel
    retries a refused swap-out forever, and a page the device loses comes back as SIGBUS."""
    policy = _read(path / "write_policy")
    try:
        size, pool = int(_read(path / "disksize")), int(_read(path / "pool_capacity"))
    except ValueError:
        size = pool = 0
    reasons = []
    if policy == "reject":
        reasons.append("its write policy 'reject' refuses writes once the pool is past its "
                       "high watermark")
    if pool < size:
        reasons.append(f"its pool ({format_size_approx(pool)}) is smaller than its size "
                       f"({format_size_approx(size)}), so the lie fails when data does not "
                       f"compress" + (" and pages are lost" if policy == "none" else ""))
    if not reasons:
        return None
    return (f"swap on {path.name} can wedge the host: {'; and '.join(reasons)}. The kernel "
            "retries a refused swap-out forever, and the processes waiting for that memory "
            "cannot be killed until room is made (raise their memory limit, then cramfs "
            "swapoff). Use --force to swap on it anyway, or a device whose pool is at least "
            "its size and whose policy is throttle or none")


def swapon(mountpoint: Path, name: str, priority: int | None, discard: bool = True,
           notes: list[str] | None = None, force: bool = False) -> str:
    """losetup --direct-io=on, mkswap, swapon; with ``discard`` (the default) and a daemon
    that serves fallocate, ``swapon --discard=pages`` so that every slot the kernel frees
    leaves the pool, as it leaves zram. Why discard was not used goes to ``notes``."""
    notes = [] if notes is None else notes
    path = device_dir(mountpoint, name)
    data = path / "data"
    hazard = swap_hazard(path)
    if hazard and not force:
        raise CliError(hazard)
    if loops_of(data):
        raise CliError(f"{name} is already attached to {', '.join(loops_of(data))}")
    if discard and _read(path / "discard_support") != "1":
        notes.append(f"{name}: discard unavailable: the daemon's pyfuse3 has no fallocate "
                     "(install with ./install.sh); freed swap slots will stay in the pool")
        discard = False
    loop = _run("losetup", "--find", "--show", "--direct-io=on", str(data)).strip()
    try:
        if discard and not loop_discards(loop):
            notes.append(f"{name}: {loop} does not advertise discard; freed swap slots will "
                         "stay in the pool")
            discard = False
        _run("mkswap", "-L", f"cramfs-{name}", loop)
        command = ["swapon"] + (["-p", str(priority)] if priority is not None else [])
        command += (["--discard=pages"] if discard else []) + [loop]
        _run(*command)
    except CliError:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60)
        raise
    return loop


def trace(mountpoint: Path, name: str, action: str, file: Path | None) -> str:
    """Start or stop recording through the device's ``trace`` file; returns its new state."""
    control = device_dir(mountpoint, name) / "trace"
    if not control.exists():
        raise CliError(f"{name}: this daemon cannot record traces (no {control.name} file)")
    if action == "start":
        assert file is not None
        file = file.absolute()
        if not file.parent.is_dir():
            raise CliError(f"{file.parent} is not a directory")
        if _read(control).startswith("recording"):
            raise CliError(f"{name} is already {_read(control)}; cramfs trace stop {name} first")
        command = f"start {file}"
    else:
        command = "stop"
    try:
        control.write_text(command)
    except OSError as exc:
        raise CliError(f"{name}: the daemon refused {command!r} ({exc.strerror}); its log "
                       "says why") from None
    return _read(control)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def swapoff(mountpoint: Path, name: str) -> list[str]:
    data = device_dir(mountpoint, name) / "data"
    loops = loops_of(data)
    if not loops:
        raise CliError(f"{name} is not attached to a loop device")
    active = Path("/proc/swaps").read_text().split()
    for loop in loops:
        if loop in active:
            _run("swapoff", loop)
        _run("losetup", "-d", loop)
    return loops


UNITS = ("cramfs.service", "cramfs-swap@.service")
DEFAULT_BINDIR = Path("/usr/local/bin")


def _unit_sources() -> Path:
    """systemd/ of this checkout (the units ship with the source tree, not in the wheel)."""
    here = Path(__file__).resolve().parent.parent / "systemd"
    if not (here / "cramfs.service").exists():
        raise CliError(f"unit files not found in {here}: run from a cramfs checkout")
    return here


def install_units(root: Path, bindir: Path, link_binaries: bool) -> list[Path]:
    """Place the units, the example config and the binaries; returns what was written.

    ``bindir`` is where the units expect cramfsd and cramfs; with ``link_binaries`` they are
    symlinked there from this installation. An existing /etc/cramfs/cramfs.toml is kept.
    """
    source = _unit_sources()
    written: list[Path] = []
    unitdir = root / "etc/systemd/system"
    unitdir.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        text = (source / unit).read_text().replace(str(DEFAULT_BINDIR) + "/", f"{bindir}/")
        (unitdir / unit).write_text(text)
        written.append(unitdir / unit)
    config = root / "etc/cramfs/cramfs.toml"
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text((source / "cramfs.toml").read_text())
        written.append(config)
    if link_binaries:
        target_dir = root / str(bindir).lstrip("/")
        target_dir.mkdir(parents=True, exist_ok=True)
        here = Path(sys.argv[0]).resolve().parent
        for name in ("cramfsd", "cramfs"):
            source_bin = here / name
            if not source_bin.exists():
                raise CliError(f"{source_bin} not found: run the installed `cramfs`")
            link = target_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(source_bin)
            written.append(link)
    if root == Path("/") and Path("/run/systemd/system").is_dir():
        _run("systemctl", "daemon-reload")
    return written


def uninstall_units(root: Path, bindir: Path) -> list[Path]:
    """Remove what install_units placed (the config only if unchanged from the example)."""
    removed: list[Path] = []
    candidates = [root / "etc/systemd/system" / unit for unit in UNITS]
    candidates += [root / str(bindir).lstrip("/") / name for name in ("cramfsd", "cramfs")]
    for path in candidates:
        if path.is_symlink() or path.exists():
            if path.parent.name == bindir.name and not path.is_symlink():
                continue  # a real binary we did not place
            path.unlink()
            removed.append(path)
    config = root / "etc/cramfs/cramfs.toml"
    try:
        example = (_unit_sources() / "cramfs.toml").read_text()
    except CliError:
        example = None
    if config.exists() and config.read_text() == example:
        config.unlink()
        removed.append(config)
    if root == Path("/") and Path("/run/systemd/system").is_dir():
        _run("systemctl", "daemon-reload")
    return removed


def watch(mountpoint: Path, name: str, count: int | None) -> None:
    """Print each watermark state change as the device raises it (poll(2) on the file)."""
    path = device_dir(mountpoint, name) / "watermark_state"
    fd = os.open(path, os.O_RDONLY)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        seen = 0
        while count is None or seen < count:
            state = os.pread(fd, 64, 0).decode().strip()
            pressure = (path.parent / "pressure").read_text().strip()
            print(f"{time.strftime('%H:%M:%S')} {name} {state} pressure={pressure}", flush=True)
            seen += 1
            if count is not None and seen >= count:
                break
            poller.poll()
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cramfs", description=__doc__.splitlines()[0])
    parser.add_argument("--mountpoint", type=Path, help="default: the config's mountpoint")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="a table of devices, like zramctl")
    on = commands.add_parser("swapon", help="losetup --direct-io=on, mkswap, swapon "
                             "--discard=pages")
    on.add_argument("name")
    on.add_argument("--priority", "-p", type=int)
    on.add_argument("--no-discard", dest="discard", action="store_false",
                    help="do not pass --discard=pages to swapon (freed slots then stay in the "
                    "pool until overwritten)")
    on.add_argument("--force", action="store_true",
                    help="swap on a device that can refuse or lose writes (see the message)")
    off = commands.add_parser("swapoff", help="swapoff and detach the loop device")
    off.add_argument("name")
    watcher = commands.add_parser("watch", help="print watermark state changes as they happen")
    watcher.add_argument("name")
    watcher.add_argument("--count", type=int, help="stop after this many lines")
    for command in ("install-units", "uninstall-units"):
        units = commands.add_parser(command, help=f"{command.split('-')[0]} the systemd units, "
                                    "the example config and binary links")
        units.add_argument("--root", type=Path, default=Path("/"),
                           help="install under this directory (packaging, tests)")
        units.add_argument("--bindir", type=Path, default=DEFAULT_BINDIR,
                           help="where the units expect cramfsd and cramfs")
        if command == "install-units":
            units.add_argument("--no-link", action="store_true",
                               help="do not symlink the binaries into --bindir")
    tracer = commands.add_parser("trace", help="record a device's traffic for cramfs replay")
    actions = tracer.add_subparsers(dest="action", required=True)
    begin = actions.add_parser("start", help="start recording NAME into FILE")
    begin.add_argument("name")
    begin.add_argument("file", type=Path)
    end = actions.add_parser("stop", help="stop recording NAME (the trace is then complete)")
    end.add_argument("name")
    estimate_cli.add_parser(commands)
    replay_cli.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "estimate":
        return estimate_cli.run(args)
    if args.command == "replay":
        return replay_cli.run(args)
    try:
        if args.command == "install-units":
            for path in install_units(args.root, args.bindir, not args.no_link):
                print(path)
            return 0
        if args.command == "uninstall-units":
            for path in uninstall_units(args.root, args.bindir):
                print(f"removed {path}")
            return 0
    except (CliError, OSError) as exc:
        print(f"cramfs: {exc}", file=sys.stderr)
        return 1
    mountpoint = args.mountpoint or default_mountpoint()
    try:
        if args.command == "status":
            sys.stdout.write(status(mountpoint))
        elif args.command == "swapon":
            notes: list[str] = []
            loop = swapon(mountpoint, args.name, args.priority, args.discard, notes,
                          args.force)
            for note in notes:
                print(f"cramfs: {note}", file=sys.stderr)
            print(loop)
        elif args.command == "swapoff":
            print(" ".join(swapoff(mountpoint, args.name)))
        elif args.command == "watch":
            watch(mountpoint, args.name, args.count)
        elif args.command == "trace":
            print(trace(mountpoint, args.name, args.action, args.file
                        if args.action == "start" else None))
    except CliError as exc:
        print(f"cramfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
