"""A driver against the node, played for real through the mount.

The driver is what the compressed-RAM discussions ask for on the kernel side: it asks the device
before placing (``safe_pages``), reacts to the watermark interrupt (``poll(2)`` on
``watermark_state``), closes the allocation gate (``no_alloc``) while it makes room, and makes
room by discarding cold pages (fallocate PUNCH_HOLE, the node's trim). The workload's
compressibility is mixed, so the node's 16:1 lie cannot hold without it. Then the interrupt line
is made to lose half its wake-ups: a driver that trusts interrupts alone suffers refused writes,
one that also reads the state does not. Last, swap on a node that refuses writes: the refusal
storm is reproduced under a time limit, diagnosed once in the log, and the way out works.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import random
import select
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .helpers import MiB, io_stat, read_attr, swaps, workload_command, write_attr
from .test_mount import cramfs_cli
from .test_swap import parse_summary

pytestmark = pytest.mark.requires("root", "fuse", "fallocate")

P = 4096
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def node_config(drop_rate: float = 0.0, seed: int = 1) -> str:
    return f"""
[device.node0]
kind = "node"
size = "256M"
pool = "16M"

[device.node0.watermarks]
low = 0.50
high = 0.75
policy = "reject"

[device.node0.interrupts]
drop_rate = {drop_rate}
seed = {seed}
"""


def page(index: int, generation: int) -> bytes:
    """Mixed compressibility: 6 in 10 text-like, 2 half random, 2 random (about 3:1 overall,
    far below the node's promised 16:1)."""
    rng = random.Random(index * 1000003 + generation)
    kind = rng.randrange(10)
    head = f"page {index} gen {generation} ".encode()
    if kind < 6:
        line = head + b"the quick brown fox jumps over the lazy dog\n"
        return (line * (P // len(line) + 1))[:P]
    if kind < 8:
        return (head + rng.randbytes(P // 2)).ljust(P, b"\0")[:P]
    return (head + rng.randbytes(P))[:P]


def discard(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class Driver:
    """Places pages on the node the way a kernel driver would, and keeps score."""

    directory: os.PathLike
    reads_state: bool = True  # False: trusts the interrupt alone
    batch: int = 64
    pages: int = 256 * MiB // P
    live: collections.deque = field(default_factory=collections.deque)  # (index, gen), cold first
    generation: dict[int, int] = field(default_factory=dict)
    next_index: int = 0
    written: int = 0
    refused: int = 0
    refused_when_safe: int = 0
    wakeups: int = 0
    rooms_made: int = 0

    def __post_init__(self) -> None:
        self.data = os.open(os.path.join(self.directory, "data"), os.O_RDWR)
        self.state_fd = os.open(os.path.join(self.directory, "watermark_state"), os.O_RDONLY)
        self.poller = select.poll()
        self.poller.register(self.state_fd, select.POLLIN | select.POLLPRI)
        self.state = self.read_state()

    def close(self) -> None:
        os.close(self.data)
        os.close(self.state_fd)

    def read_state(self) -> str:
        return os.pread(self.state_fd, 64, 0).decode().strip()

    def attr(self, name: str) -> str:
        with open(os.path.join(self.directory, name)) as f:
            return f.read().strip()

    def set_gate(self, closed: bool) -> None:
        with open(os.path.join(self.directory, "no_alloc"), "w") as f:
            f.write("1" if closed else "0")

    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.poller.poll(0):  # the interrupt: a state change was delivered
                self.wakeups += 1
                self.state = self.read_state()
            if self.reads_state:
                self.state = self.read_state()
            if self.state != "ok":
                self.make_room()
                continue
            budget = self.batch
            if self.reads_state:
                budget = min(budget, int(self.attr("safe_pages")) // 2)
                if budget == 0:
                    self.make_room()
                    continue
            self.place(budget, told_safe=self.reads_state)

    def place(self, count: int, told_safe: bool) -> None:
        for _ in range(count):
            index = self.next_index % self.pages
            self.next_index += 1
            if index in self.generation:  # the ring came round: that slot must be free
                continue
            generation = self.next_index
            try:
                os.pwrite(self.data, page(index, generation), index * P)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                self.refused += 1
                self.refused_when_safe += told_safe
                return
            self.generation[index] = generation
            self.live.append(index)
            self.written += 1

    def make_room(self) -> None:
        """Close the gate, discard the coldest quarter of what is placed, reopen."""
        self.rooms_made += 1
        self.set_gate(True)
        for _ in range(max(1, len(self.live) // 4)):
            index = self.live.popleft()
            del self.generation[index]
            discard(self.data, index * P, P)
        self.set_gate(False)
        self.state = self.read_state()

    def verify(self) -> int:
        """Every page the driver placed and kept reads back as written."""
        os.posix_fadvise(self.data, 0, 0, os.POSIX_FADV_DONTNEED)
        bad = 0
        for index, generation in self.generation.items():
            bad += os.pread(self.data, P, index * P) != page(index, generation)
        return bad


def test_a_driver_that_asks_before_placing_keeps_the_lie_for_a_minute(start_daemon):
    daemon = start_daemon(node_config())
    driver = Driver(daemon.mountpoint / "node0")
    try:
        driver.run(60)
        bad = driver.verify()
    finally:
        driver.close()
    stat = io_stat(daemon.mountpoint, "node0")
    print(f"placed {driver.written} pages ({driver.written * P // MiB} MiB) through a 16 MiB "
          f"pool in 60 s; made room {driver.rooms_made} times; {driver.wakeups} wake-ups; "
          f"refused {driver.refused}; trims {read_attr(daemon.mountpoint, 'node0', 'trim_count')}")
    assert driver.written * P > 64 * MiB  # far more than the pool could ever hold raw
    assert driver.rooms_made > 0
    assert driver.refused_when_safe == 0 and stat["failed_writes"] == 0
    assert bad == 0


def test_lost_interrupts_hurt_a_driver_that_trusts_them_alone(start_daemon):
    outcomes = {}
    for reads_state in (False, True):
        # seed 1: the first wake-up (ok -> pressure) is the one the line loses
        daemon = start_daemon(node_config(drop_rate=0.5, seed=1))
        driver = Driver(daemon.mountpoint / "node0", reads_state=reads_state)
        try:
            driver.run(15)
            bad = driver.verify()
        finally:
            driver.close()
        delivered, delayed, dropped = map(int, read_attr(daemon.mountpoint, "node0",
                                                         "interrupt_stat").split())
        outcomes[reads_state] = (driver.written, driver.refused, dropped, bad)
        assert bad == 0
        daemon.stop()
    print(f"interrupts alone: written, refused, dropped, bad = {outcomes[False]}; "
          f"also reading the state: {outcomes[True]}")
    assert outcomes[False][2] > 0  # the line lost the interrupt...
    assert outcomes[False][1] > 0  # ...and the driver kept writing into a device in pressure
    assert outcomes[True][1] == 0  # reading the state, it never had a write refused


@pytest.mark.swap
@pytest.mark.requires("memcg", "loop", "losetup", "mkswap", "swapon", "swapoff")
def test_swap_on_a_refusing_node_storm_is_diagnosed_and_the_way_out_works(start_daemon,
                                                                         memory_cgroup):
    daemon = start_daemon(node_config().replace('size = "256M"', 'size = "512M"'))
    refused = cramfs_cli("--mountpoint", str(daemon.mountpoint), "swapon", "node0")
    assert refused.returncode == 1 and "can wedge the host" in refused.stderr, refused
    proc = cramfs_cli("--mountpoint", str(daemon.mountpoint), "swapon", "node0", "--priority",
                      "32767", "--force", timeout=120)
    assert proc.returncode == 0, proc.stderr
    loop = proc.stdout.strip()
    cg = memory_cgroup(64 * MiB)
    # incompressible pages, twice the memcg: the 16 MiB pool passes high within seconds
    stress = cg.popen(workload_command(128, mix="random", passes=1, sleep=0),
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "refusal storm" not in daemon.log():
            time.sleep(0.5)
        assert "refusal storm" in daemon.log(), daemon.log_tail()
        # while it lasts, each refusal costs little CPU
        cpu0, refusals0, t0 = cpu_seconds(daemon.pid), failed_writes(daemon), time.monotonic()
        time.sleep(3)
        cpu = (cpu_seconds(daemon.pid) - cpu0) / (time.monotonic() - t0)
        rate = (failed_writes(daemon) - refusals0) / (time.monotonic() - t0)
        print(f"in the storm: {rate:.0f} refusals/s, daemon CPU {cpu:.2f} cores")
        assert cpu < 0.5, cpu
        # the way out the diagnosis names: room for the workload, then swapoff
        cg.set_limit(1024 * MiB)
        out, _ = stress.communicate(timeout=120)
    finally:
        if stress.poll() is None:
            cg.set_limit(1024 * MiB)
            cg.kill()
            stress.communicate(timeout=60)
    assert stress.returncode == 0, out[-3000:]  # every page verified
    assert parse_summary(out).get("bad_pages") == 0, out[-3000:]
    message = next(line for line in daemon.log().splitlines() if "refusal storm" in line)
    assert "cramfs swapoff node0" in message and "larger pool" in message
    assert daemon.log().count("refusal storm:") == 1
    assert int(read_attr(daemon.mountpoint, "node0", "refusal_storms")) == 1
    cg.remove()
    done = cramfs_cli("--mountpoint", str(daemon.mountpoint), "swapoff", "node0", timeout=300)
    assert done.returncode == 0, done.stderr
    assert loop not in swaps()
    write_attr(daemon.mountpoint, "node0", "compact", "1")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def failed_writes(daemon) -> int:
    return io_stat(daemon.mountpoint, "node0")["failed_writes"]
