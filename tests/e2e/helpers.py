"""Utilities for end-to-end tests: mounts, loop devices, swap, memory cgroups, the kernel log.

Everything here talks to the real machine (root). Each function that changes system state has an
inverse, and :class:`Harness` keeps a list of what a test created so teardown can undo it in a safe
order even when the test failed half-way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from daemon.config import DEFAULT_LEVEL

TESTS = Path(__file__).resolve().parent.parent
WORKLOAD = TESTS / "e2e" / "workload.py"
MiB = 1 << 20
PAGE = 4096

MM_STAT_FIELDS = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit",
                  "mem_used_max", "same_pages", "pages_compacted", "huge_pages",
                  "huge_pages_since")
IO_STAT_FIELDS = ("failed_reads", "failed_writes", "invalid_io", "notify_free")


class HarnessError(AssertionError):
    pass


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str], *, timeout: float = 60, check: bool = True,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, raise with the output on failure."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              input=None if input is None else input.decode(), check=False)
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"timed out after {timeout}s: {' '.join(cmd)}\n"
                           f"stdout: {exc.stdout}\nstderr: {exc.stderr}") from None
    if check and proc.returncode != 0:
        raise HarnessError(f"exit {proc.returncode}: {' '.join(cmd)}\n"
                           f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


# -- mounts ---------------------------------------------------------------------------------

def _unescape_mount(field_: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1:i + 4].isdigit() and len(field_[i + 1:i + 4]) == 3:
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def mounts() -> dict[str, str]:
    """Mount point -> file-system type, from /proc/self/mountinfo (never stats the mount, so a
    hung FUSE daemon cannot hang the caller)."""
    result = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if len(parts) >= 5:
                result[_unescape_mount(parts[4])] = right.split()[0] if right else ""
    return result


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return os.path.realpath(path) in mounts() or os.fspath(path) in mounts()


def unmount(path: str | os.PathLike[str], timeout: float = 30) -> None:
    """fusermount3 -u, then umount, then a lazy umount as the last resort."""
    path = os.fspath(path)
    attempts = []
    if shutil.which("fusermount3"):
        attempts.append(["fusermount3", "-u", path])
    attempts += [["umount", path], ["umount", "-l", path]]
    for cmd in attempts:
        if not is_mounted(path):
            return
        with contextlib.suppress(HarnessError):
            run(cmd, timeout=timeout, check=False)
    if is_mounted(path):
        raise HarnessError(f"{path} is still mounted")


# -- loop devices ---------------------------------------------------------------------------

def loop_devices() -> dict[str, str]:
    """Attached loop device (/dev/loopN) -> backing file path."""
    result = {}
    for entry in Path("/sys/block").glob("loop*"):
        backing = entry / "loop" / "backing_file"
        try:
            name = backing.read_text().strip()
        except OSError:
            continue
        if name.endswith(" (deleted)"):
            name = name[: -len(" (deleted)")]
        result[f"/dev/{entry.name}"] = name
    return result


def loops_under(prefix: str | os.PathLike[str]) -> list[str]:
    """Loop devices whose backing file lies under ``prefix`` (a mountpoint)."""
    prefix = os.path.realpath(prefix).rstrip("/") + "/"
    return sorted(dev for dev, back in loop_devices().items()
                  if os.path.realpath(back).startswith(prefix) or back.startswith(prefix))


def loop_for(path: str | os.PathLike[str]) -> str | None:
    real = os.path.realpath(path)
    for dev, back in loop_devices().items():
        if back in (real, os.fspath(path)):
            return dev
    return None


def attach_loop(path: str | os.PathLike[str], *, direct_io: bool = True) -> str:
    cmd = ["losetup", "--find", "--show"]
    if direct_io:
        cmd.append("--direct-io=on")
    dev = run(cmd + [os.fspath(path)], timeout=60).stdout.strip()
    if not dev.startswith("/dev/loop"):
        raise HarnessError(f"losetup printed {dev!r}")
    return dev


def detach_loop(dev: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        proc = run(["losetup", "-d", dev], timeout=timeout, check=False)
        if proc.returncode == 0 or dev not in loop_devices():
            return
        if time.monotonic() > deadline:
            raise HarnessError(f"losetup -d {dev} failed: {proc.stderr.strip()}")
        time.sleep(0.5)


def loop_direct_io(dev: str) -> bool | None:
    try:
        return Path(f"/sys/block/{Path(dev).name}/loop/dio").read_text().strip() == "1"
    except OSError:
        return None


# -- swap -----------------------------------------------------------------------------------

@dataclass
class SwapEntry:
    device: str
    size_kib: int
    used_kib: int
    priority: int


def swaps() -> dict[str, SwapEntry]:
    result = {}
    with open("/proc/swaps") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) >= 5:
                result[parts[0]] = SwapEntry(parts[0], int(parts[2]), int(parts[3]),
                                             int(parts[4]))
    return result


def swap_on(dev: str, priority: int | None = None) -> None:
    run(["mkswap", dev], timeout=120)
    cmd = ["swapon"]
    if priority is not None:
        cmd += ["--priority", str(priority)]
    run(cmd + [dev], timeout=120)


def swap_off(dev: str, timeout: float = 300) -> None:
    if dev in swaps():
        run(["swapoff", dev], timeout=timeout)


# -- memory cgroups -------------------------------------------------------------------------

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_version() -> int:
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return 2
    if (CGROUP_ROOT / "memory" / "memory.limit_in_bytes").exists():
        return 1
    raise HarnessError("no memory cgroup controller")


class MemCgroup:
    """A memory cgroup ``cramfs-<suffix>`` limited to ``limit`` bytes (swap unlimited).

    cgroup v2: ``memory.max`` (+ ``memory.swap.max=max``); v1: ``memory.limit_in_bytes``,
    ``memory.swappiness=100``.
    """

    def __init__(self, suffix: str, limit: int) -> None:
        self.name = f"cramfs-{suffix}"
        self.limit = limit
        self.version = cgroup_version()
        base = CGROUP_ROOT if self.version == 2 else CGROUP_ROOT / "memory"
        self.path = base / self.name
        if self.path.exists():  # left over by a crashed run
            remove_cgroup(self.path)
        if self.version == 2:
            ctl = CGROUP_ROOT / "cgroup.subtree_control"
            if "memory" not in ctl.read_text().split():
                ctl.write_text("+memory")
        self.path.mkdir()
        try:
            if self.version == 2:
                (self.path / "memory.max").write_text(str(limit))
                with contextlib.suppress(OSError):
                    (self.path / "memory.swap.max").write_text("max")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
                with contextlib.suppress(OSError):
                    (self.path / "memory.swappiness").write_text("100")
        except BaseException:
            remove_cgroup(self.path)
            raise

    def set_limit(self, limit: int) -> None:
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        (self.path / name).write_text(str(limit))
        self.limit = limit

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.procs_file.read_text().split()]
        except OSError:
            return []

    def command(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` wrapped so it enters this cgroup before it execs (no preexec_fn)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs_file), *cmd]

    def popen(self, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(cmd), **kwargs)

    def run(self, cmd: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run to completion inside the cgroup; on timeout kill everything in the cgroup."""
        proc = self.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = proc.communicate(timeout=60)
            raise HarnessError(f"timed out after {timeout}s in {self.name}: {' '.join(cmd)}\n"
                               f"stdout: {out[-4000:]}\nstderr: {err[-4000:]}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def stat(self) -> dict[str, int]:
        name = "memory.stat"
        result = {}
        with contextlib.suppress(OSError):
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                with contextlib.suppress(ValueError):
                    result[key] = int(value)
        return result

    def oom_kills(self) -> int:
        """OOM kills in this cgroup (v2 memory.events oom_kill; v1 memory.oom_control)."""
        for fname in ("memory.events", "memory.oom_control"):
            with contextlib.suppress(OSError):
                for line in (self.path / fname).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        return 0

    def kill(self, timeout: float = 60) -> None:
        kill_cgroup(self.path, timeout)

    def remove(self) -> None:
        remove_cgroup(self.path)


def kill_cgroup(path: Path, timeout: float = 60) -> None:
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        with contextlib.suppress(OSError):
            kill_file.write_text("1")
    deadline = time.monotonic() + timeout
    while True:
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise HarnessError(f"processes {pids} survive in {path}")
        time.sleep(0.1)


def remove_cgroup(path: Path, timeout: float = 60) -> None:
    if not path.exists():
        return
    kill_cgroup(path, timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stale_cgroups() -> list[Path]:
    found = []
    for base in (CGROUP_ROOT, CGROUP_ROOT / "memory"):
        with contextlib.suppress(OSError):
            found += [p for p in base.glob("cramfs-*") if p.is_dir()]
    return found


# -- kernel log -----------------------------------------------------------------------------

class KernelLog:
    """Lines the kernel logged after construction (best effort: dmesg may be restricted).

    Marks by timestamp, not line count: a flood of swap write errors keeps the ring buffer full,
    so the count of lines stops growing while new lines keep arriving."""

    def __init__(self) -> None:
        stamps = [self._stamp(ln) for ln in self._lines()]
        self.start = max((s for s in stamps if s is not None), default=-1.0)

    @staticmethod
    def _lines() -> list[str]:
        try:
            return subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30,
                                  check=False).stdout.splitlines()
        except (OSError, subprocess.TimeoutExpired):
            return []

    @staticmethod
    def _stamp(line: str) -> float | None:
        if line.startswith("["):
            with contextlib.suppress(ValueError):
                return float(line[1:line.index("]")])
        return None

    def new_lines(self) -> list[str]:
        return [ln for ln in self._lines() if (self._stamp(ln) or 0.0) > self.start]

    def grep(self, *needles: str) -> list[str]:
        return [ln for ln in self.new_lines() if any(n.lower() in ln.lower() for n in needles)]


# -- device attribute files -----------------------------------------------------------------

def read_attr(mountpoint: Path, device: str, name: str) -> str:
    with open(mountpoint / device / name) as f:
        return f.read().strip()


def write_attr(mountpoint: Path, device: str, name: str, value: str) -> None:
    fd = os.open(mountpoint / device / name, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def parse_fields(text: str, names: Iterable[str]) -> dict[str, int]:
    names = list(names)
    values = text.split()
    if len(values) < len(names):
        raise HarnessError(f"expected {len(names)} fields, got {text!r}")
    return {n: int(v) for n, v in zip(names, values, strict=False)}


def mm_stat(mountpoint: Path, device: str) -> dict[str, int]:
    return parse_fields(read_attr(mountpoint, device, "mm_stat"), MM_STAT_FIELDS)


def io_stat(mountpoint: Path, device: str) -> dict[str, int]:
    return parse_fields(read_attr(mountpoint, device, "io_stat"), IO_STAT_FIELDS)


class Sampler(threading.Thread):
    """Polls a device's mm_stat and /proc/swaps while a workload runs; keeps the maxima."""

    def __init__(self, mountpoint: Path, device: str, swap_dev: str | None,
                 interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.mountpoint, self.device, self.swap_dev = mountpoint, device, swap_dev
        self.interval = interval
        self.max_orig = 0
        self.max_used_total = 0
        self.max_swap_used_kib = 0
        self.samples = 0
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def sample(self) -> None:
        try:
            stat = mm_stat(self.mountpoint, self.device)
            self.max_orig = max(self.max_orig, stat["orig_data_size"])
            self.max_used_total = max(self.max_used_total, stat["mem_used_total"])
        except (OSError, HarnessError) as exc:
            self.errors.append(repr(exc))
        if self.swap_dev:
            entry = swaps().get(self.swap_dev)
            if entry:
                self.max_swap_used_kib = max(self.max_swap_used_kib, entry.used_kib)
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)
        self.sample()


def workload_command(mib: int, *, seed: int = 1, mix: str = "mixed", passes: int = 2,
                     sleep: float = 0.5, spot_check: int = 0,
                     python: str | None = None) -> list[str]:
    return [python or sys.executable, str(WORKLOAD), "--mib", str(mib), "--seed", str(seed),
            "--mix", mix, "--passes", str(passes), "--sleep", str(sleep),
            "--spot-check", str(spot_check)]


# -- the daemon -----------------------------------------------------------------------------

def swap_config(size: str, pool: str, *, name: str = "swap0",
                level: int = DEFAULT_LEVEL, policy: str = "reject") -> str:
    """The TOML of one swap device with the default watermarks (0.80/0.90, ``policy``)."""
    return f"""
[device.{name}]
kind = "swap"
size = "{size}"
pool = "{pool}"
compressor = "zstd"
level = {level}

[device.{name}.watermarks]
low = 0.80
high = 0.90
policy = "{policy}"
"""


def config_devices(config_toml: str) -> list[str]:
    return list(tomllib.loads(config_toml).get("device", {}))


class NotifySocket:
    """A $NOTIFY_SOCKET listener (sd_notify datagrams), collecting every message."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cramfs-notify-")  # short: sun_path is 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            self.messages.append(data.decode(errors="replace"))

    @property
    def ready(self) -> bool:
        return any("READY=1" in m.split("\n") for m in self.poll())

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Daemon:
    proc: subprocess.Popen
    mountpoint: Path
    config_path: Path
    stderr_path: Path
    metrics_address: str
    devices: list[str]
    notify: NotifySocket | None = None
    returncode: int | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log()[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def data(self, device: str) -> Path:
        return self.mountpoint / device / "data"

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        self.returncode = self.proc.wait(timeout=timeout)
        return self.returncode

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait for the exit code (raises TimeoutExpired if it does not stop)."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)


class Harness:
    """Tracks what a test created (daemons, cgroups, loop devices, swaps) and undoes it."""

    def __init__(self, tmp_path: Path, daemon_command: str) -> None:
        self.tmp_path = tmp_path
        self.daemon_command = daemon_command
        self.daemons: list[Daemon] = []
        self.cgroups: list[MemCgroup] = []
        self.loops: list[str] = []
        self._count = 0

    # -- creation --
    def start_daemon(self, config_toml: str, *, env: dict[str, str] | None = None,
                     extra_args: Sequence[str] = (), metrics_address: str = "",
                     log_level: str = "debug", ready_timeout: float = 30) -> Daemon:
        self._count += 1
        base = self.tmp_path / f"cramfsd{self._count}"
        base.mkdir(parents=True, exist_ok=True)
        config_path = base / "cramfs.toml"
        config_path.write_text(config_toml)
        mountpoint = base / "mnt"
        stderr_path = base / "cramfsd.stderr"
        notify = NotifySocket()
        full_env = dict(os.environ)
        full_env["NOTIFY_SOCKET"] = notify.path
        full_env.update(env or {})
        cmd = [self.daemon_command, "--config", str(config_path), "--mountpoint",
               str(mountpoint), "--metrics-address", metrics_address, "--log-level", log_level,
               *extra_args]
        log(f"starting {' '.join(cmd)}")
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    env=full_env)
        daemon = Daemon(proc, mountpoint, config_path, stderr_path, metrics_address,
                        config_devices(config_toml), notify)
        self.daemons.append(daemon)
        self.wait_ready(daemon, ready_timeout)
        return daemon

    def wait_ready(self, daemon: Daemon, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = daemon.proc.poll()
            if code is not None:
                raise HarnessError(f"cramfsd exited with {code} before it was ready:\n"
                                   f"{daemon.log_tail()}")
            # READY=1 follows the mount by a stat and the fusectl tuning: wait for it too (a
            # loaded machine showed the gap), so tests see the daemon as systemd would
            if is_mounted(daemon.mountpoint) and all(
                    daemon.data(d).exists() for d in daemon.devices) and daemon.notify.ready:
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"cramfsd not ready after {timeout}s:\n{daemon.log_tail()}")
            time.sleep(0.05)

    def cgroup(self, limit: int, suffix: str | None = None) -> MemCgroup:
        self._count += 1
        cg = MemCgroup(suffix or f"{os.getpid()}-{self._count}", limit)
        self.cgroups.append(cg)
        return cg

    def attach_loop(self, path: Path, *, direct_io: bool = True) -> str:
        dev = attach_loop(path, direct_io=direct_io)
        self.loops.append(dev)
        return dev

    # -- teardown --
    def cleanup(self) -> list[str]:
        """Undo everything; returns the problems met (teardown never stops half-way).

        Order: kill the workloads and remove their cgroups (so swapoff need not page hundreds of
        MiB back into a cgroup that cannot hold them), swapoff every swap on a loop device
        backed by one of our mounts, detach those loop devices, SIGTERM each daemon (SIGKILL
        only that pid after a timeout), unmount what is still mounted.
        """
        problems: list[str] = []

        def attempt(what: str, fn, *args) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - teardown must go on
                problems.append(f"{what}: {exc}")
                log(f"teardown: {what}: {exc}")

        for cg in self.cgroups:
            attempt(f"remove cgroup {cg.name}", cg.remove)
        loops = set(self.loops)
        for daemon in self.daemons:
            loops.update(loops_under(daemon.mountpoint))
        active = swaps()
        for dev in sorted(loops):
            if dev in active:
                attempt(f"swapoff {dev}", swap_off, dev)
        attached = loop_devices()
        for dev in sorted(loops):
            if dev in attached:
                attempt(f"detach {dev}", detach_loop, dev)
        for daemon in self.daemons:
            attempt(f"stop cramfsd pid {daemon.pid}", self._stop_daemon, daemon)
            attempt(f"unmount {daemon.mountpoint}", unmount, daemon.mountpoint)
            if daemon.notify:
                daemon.notify.close()
        return problems

    @staticmethod
    def _stop_daemon(daemon: Daemon, timeout: float = 20) -> None:
        if daemon.proc.poll() is not None:
            return
        daemon.signal(signal.SIGTERM)
        try:
            daemon.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"cramfsd pid {daemon.pid} ignored SIGTERM for {timeout}s; SIGKILL")
            daemon.proc.kill()  # only the pid we started
            daemon.proc.wait(timeout=30)
            raise HarnessError(f"cramfsd did not stop on SIGTERM within {timeout}s:\n"
                               f"{daemon.log_tail(3000)}") from None
