"""Discard on the real daemon: fallocate on the data file, blkdiscard through a loop device,
and a swap workload after which the pool empties as zram's does (swapon --discard=pages)."""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import MiB, Sampler, io_stat, mm_stat, read_attr, swap_config, swaps, workload_command
from .test_mount import cramfs_cli
from .test_swap import cli_swapoff, parse_summary

pytestmark = pytest.mark.requires("root", "fuse", "fallocate")

P = 4096


def pattern(pages: int, seed: int) -> bytes:
    """Incompressible pages, so each costs a pool frame and a release shows in the pool."""
    return random.Random(seed).randbytes(pages * P)


CLUSTER = 512 * P  # the kernel's swap cluster (SWAPFILE_CLUSTER pages)


def pinned(held: int) -> int:
    """What the device may still hold for ``held`` bytes the kernel keeps in swap: swap
    discards whole free clusters only, so each slot still in use can keep the stale pages of
    its cluster (zram hears of every freed slot; a file hears of free clusters)."""
    return -(-held // P) * CLUSTER


def punch(path, offset: int, length: int, *flags: str) -> None:
    subprocess.run(["fallocate", *flags, "--offset", str(offset), "--length", str(length),
                    str(path)], check=True, capture_output=True, timeout=60)


def test_punch_hole_in_the_middle_reads_zeros_and_keeps_its_neighbours(start_daemon):
    daemon = start_daemon(swap_config("64M", "32M"))
    data = daemon.data("swap0")
    written = pattern(64, 3)
    fd = os.open(data, os.O_RDWR)
    try:
        os.pwrite(fd, written, 0)
        before = mm_stat(daemon.mountpoint, "swap0")
        punch(data, 8 * P + 100, 16 * P, "--punch-hole", "--keep-size")
        punch(data, 40 * P, 4 * P, "--zero-range", "--keep-size")
        back = os.pread(fd, len(written), 0)
    finally:
        os.close(fd)
    expected = bytearray(written)
    expected[8 * P + 100:24 * P + 100] = bytes(16 * P)
    expected[40 * P:44 * P] = bytes(4 * P)
    assert back == bytes(expected)
    after = mm_stat(daemon.mountpoint, "swap0")
    # pages 9..23 and 40..43 left the books; 8 and 24 were zeroed in place
    assert after["orig_data_size"] == before["orig_data_size"] - 19 * P
    assert after["mem_used_total"] < before["mem_used_total"]
    assert io_stat(daemon.mountpoint, "swap0")["notify_free"] == 19
    assert read_attr(daemon.mountpoint, "swap0", "discarded_pages") == "19"
    # other modes are refused and change nothing
    done = subprocess.run(["fallocate", "--offset", "0", "--length", str(P), str(data)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not supported" in done.stderr, done
    with open(data, "rb") as f:
        assert f.read(8 * P) == written[:8 * P]


@pytest.mark.requires("losetup", "blkdiscard")
def test_blkdiscard_through_a_direct_io_loop_releases_pages(start_daemon, harness):
    daemon = start_daemon(swap_config("64M", "32M"))
    loop = harness.attach_loop(daemon.data("swap0"), direct_io=True)
    name = os.path.basename(loop)
    limit = Path(f"/sys/block/{name}/queue/discard_max_bytes").read_text()
    assert int(limit) > 0
    with open(loop, "r+b", buffering=0) as f:
        f.write(pattern(512, 5))  # 2 MiB
        os.fsync(f.fileno())
    assert mm_stat(daemon.mountpoint, "swap0")["orig_data_size"] == 2 * MiB
    subprocess.run(["blkdiscard", "--offset", str(MiB), "--length", str(MiB), loop],
                   check=True, capture_output=True, timeout=60)
    assert mm_stat(daemon.mountpoint, "swap0")["orig_data_size"] == MiB
    with open(loop, "rb", buffering=0) as f:
        back = f.read(2 * MiB)
    assert back[:MiB] == pattern(512, 5)[:MiB] and back[MiB:] == bytes(MiB)
    assert read_attr(daemon.mountpoint, "swap0", "discard_support") == "1"


@pytest.mark.swap
@pytest.mark.requires("loop", "memcg", "losetup", "mkswap", "swapon", "swapoff")
def test_pool_empties_after_a_swap_workload_exits(start_daemon, memory_cgroup):
    """320 MiB of verifiable pages in a 128 MiB memcg through `cramfs swapon` (which turns on
    --discard=pages); every page checked; then the pool gives back what the kernel freed."""
    daemon = start_daemon(swap_config("1G", "1G", policy="throttle"))
    proc = cramfs_cli("--mountpoint", str(daemon.mountpoint), "swapon", "swap0", "--priority",
                      "32767", timeout=120)  # pool >= size, policy throttle: no --force needed
    assert proc.returncode == 0 and not proc.stderr, proc.stdout + proc.stderr
    loop = proc.stdout.strip()
    assert loop in swaps()
    cg = memory_cgroup(128 * MiB)
    sampler = Sampler(daemon.mountpoint, "swap0", loop)
    sampler.start()
    try:
        result = cg.run(workload_command(320, seed=21, passes=1, sleep=0.2), timeout=600)
    finally:
        sampler.stop()
    summary = parse_summary(result.stdout)
    assert result.returncode == 0, f"workload failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    assert summary.get("bad_pages") == 0, summary
    assert sampler.max_swap_used_kib > 64 * 1024, vars(sampler)
    cg.remove()
    deadline = time.monotonic() + 20
    while True:
        stat = mm_stat(daemon.mountpoint, "swap0")
        held = swaps()[loop].used_kib * 1024
        settled = (stat["mem_used_total"] <= 0.02 * stat["mem_used_max"]
                   and stat["orig_data_size"] <= P + pinned(held))
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(f"after exit: {stat}, kernel still holds {held} B, "
          f"discarded {read_attr(daemon.mountpoint, 'swap0', 'discarded_pages')} pages")
    assert stat["mem_used_max"] > 32 * MiB, stat
    assert stat["mem_used_total"] <= 0.02 * stat["mem_used_max"], stat
    assert stat["orig_data_size"] <= P + pinned(held), (stat, held)
    assert io_stat(daemon.mountpoint, "swap0")["failed_writes"] == 0
    cli_swapoff(daemon)

