"""End to end: a mounted zswap device (compressed cache + backing file + shrinker)."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading

import pytest

from .helpers import MiB, mm_stat, read_attr, swap_on, swaps, workload_command
from .workload import MIXES, page_contents

pytestmark = pytest.mark.requires("root", "fuse")
PAGE = 4096
ZSWAP_COUNTERS = ("pool_limit_hit", "reject_reclaim_fail", "reject_alloc_fail",
                  "reject_kmemcache_fail", "reject_compress_fail", "reject_compress_poor",
                  "decompress_fail", "written_back_pages", "pool_total_size", "stored_pages",
                  "stored_incompressible_pages")


def zswap_config(backing, size="256M", pool="16M", max_pool=50, accept=80) -> str:
    return f"""
[device.zswap0]
kind = "zswap"
size = "{size}"
pool = "{pool}"
backing_file = "{backing}"
max_pool_percent = {max_pool}
accept_threshold_percent = {accept}
"""


def attr(daemon, name: str) -> str:
    return read_attr(daemon.mountpoint, "zswap0", name)


def memory_pages(first: int, count: int, seed: int = 7) -> bytes:
    """Pages like a process's memory (the workload's mix: zero, same-filled, text, half
    random, random), each distinct and derived from its index."""
    mix = MIXES["mixed"]
    return b"".join(page_contents(mix, seed, i, 0) for i in range(first, first + count))


class PoolSampler(threading.Thread):
    def __init__(self, daemon) -> None:
        super().__init__(daemon=True)
        self.d = daemon
        self.samples: list[int] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.02):
            self.samples.append(int(attr(self.d, "pool_total_size")))


def test_attribute_files(start_daemon, tmp_path):
    daemon = start_daemon(zswap_config(tmp_path / "backing.img"))
    for name in ZSWAP_COUNTERS:
        assert attr(daemon, name).isdigit(), name
    assert attr(daemon, "kind") == "zswap"
    assert attr(daemon, "max_pool_percent") == "50"
    assert attr(daemon, "accept_threshold_percent") == "80"
    path = daemon.mountpoint / "zswap0" / "max_pool_percent"
    with open(path, "w") as f:
        f.write("60")
    assert attr(daemon, "max_pool_percent") == "60"
    for bad in ("0", "101", "x", "-5", "50.5"):
        with pytest.raises(OSError) as info, open(path, "w") as f:
            f.write(bad)
        assert info.value.errno == 22, bad
        assert attr(daemon, "max_pool_percent") == "60"


def test_128mib_of_memory_pages_through_a_16mib_pool(start_daemon, tmp_path):
    backing = tmp_path / "backing.img"
    daemon = start_daemon(zswap_config(backing))
    limit = 16 * MiB * 50 // 100
    total = 128 * MiB
    sampler = PoolSampler(daemon)
    sampler.start()
    digest = hashlib.sha256()
    fd = os.open(daemon.data("zswap0"), os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, MiB)
    try:
        for off in range(0, total, MiB):
            chunk = memory_pages(off // PAGE, MiB // PAGE)
            digest.update(chunk)
            buf[:] = chunk
            assert os.pwritev(fd, [buf], off) == MiB
        sampler.stop_event.set()
        sampler.join(timeout=10)
        # read back through O_DIRECT: every byte from the device (pool or backing file)
        back = hashlib.sha256()
        for off in range(0, total, MiB):
            assert os.preadv(fd, [buf], off) == MiB
            back.update(buf)
        assert back.hexdigest() == digest.hexdigest()
    finally:
        sampler.stop_event.set()
        os.close(fd)
        buf.close()
    stats = {name: int(attr(daemon, name)) for name in ZSWAP_COUNTERS}
    backing_pages = int(attr(daemon, "backing_pages"))
    allocated = int(attr(daemon, "backing_allocated"))
    print(f"pool samples {len(sampler.samples)}, max {max(sampler.samples) / MiB:.2f} MiB "
          f"(limit {limit / MiB:.1f} MiB); {stats}; backing_pages {backing_pages}, "
          f"allocated {allocated / MiB:.1f} MiB")
    assert len(sampler.samples) > 10
    assert max(sampler.samples) <= limit
    assert stats["pool_total_size"] <= limit
    assert stats["written_back_pages"] > 0
    assert stats["reject_compress_poor"] > 0  # the random pages went straight to the file
    # (pool_limit_hit may stay 0: the shrinker can keep the pool under the limit alone)
    # the backing file holds the overflow, exactly the pages that live there
    assert backing_pages > 0
    assert allocated == backing_pages * PAGE == os.stat(backing).st_blocks * 512
    stat = mm_stat(daemon.mountpoint, "zswap0")
    nonzero = stat["orig_data_size"] // PAGE
    assert stats["stored_pages"] + backing_pages == nonzero
    assert backing_pages * PAGE > total // 4  # well over the pool's 8 MiB

    # releasing the range empties the pool and punches the file
    fd = os.open(daemon.data("zswap0"), os.O_WRONLY)
    try:
        for off in range(0, total, MiB):
            os.pwrite(fd, bytes(MiB), off)
    finally:
        os.close(fd)
    assert int(attr(daemon, "backing_allocated")) == 0
    assert int(attr(daemon, "pool_total_size")) == 0
    assert int(attr(daemon, "stored_pages")) == 0


def test_missing_backing_directory_exits_2(harness, tmp_path):
    import subprocess

    config = tmp_path / "cramfs.toml"
    config.write_text(zswap_config(tmp_path / "nope" / "backing.img"))
    proc = subprocess.run([harness.daemon_command, "--config", str(config), "--mountpoint",
                           str(tmp_path / "mnt"), "--metrics-address", ""],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "backing_file" in proc.stderr and "nope" in proc.stderr


@pytest.mark.swap
@pytest.mark.requires("memcg", "loop", "losetup", "mkswap", "swapon", "swapoff")
def test_loop_swap_on_zswap(start_daemon, memory_cgroup, harness, tmp_path):
    daemon = start_daemon(zswap_config(tmp_path / "backing.img", size="512M", pool="32M",
                                       max_pool=50, accept=80))
    loop = harness.attach_loop(daemon.data("zswap0"), direct_io=True)
    swap_on(loop, priority=32767)
    others = {d: s.priority for d, s in swaps().items() if d != loop}
    if others:
        print(f"note: other swap devices active: {others}")
    cg = memory_cgroup(48 * MiB)
    result = cg.run(workload_command(160, seed=17, passes=1, sleep=0.2), timeout=85)
    summary = next((json.loads(x) for x in reversed(result.stdout.splitlines())
                    if x.startswith("{")), {})
    stats = {name: int(attr(daemon, name)) for name in ZSWAP_COUNTERS}
    print(f"rc={result.returncode} summary={summary} zswap={stats} "
          f"backing_pages={attr(daemon, 'backing_pages')}\n{result.stderr[-1500:]}")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert summary["bad_pages"] == 0, summary
    assert cg.oom_kills() == 0
    assert int(attr(daemon, "backing_pages")) > 0  # more than the pool: the file took it
    assert stats["pool_total_size"] <= 16 * MiB
    assert stats["written_back_pages"] + stats["reject_compress_poor"] > 0
    assert daemon.alive(), daemon.log_tail()
