"""Loop-swap on a cramfs device under real memory pressure (a memory cgroup smaller than the
workload), shutdown safety while swap is active, and a pool overrun with incompressible data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from .helpers import (
    KernelLog,
    MiB,
    Sampler,
    detach_loop,
    io_stat,
    is_mounted,
    loop_devices,
    loop_direct_io,
    loop_for,
    mm_stat,
    read_attr,
    swap_config,
    swap_off,
    swap_on,
    swaps,
    workload_command,
    write_attr,
)
from .test_mount import cramfs_cli

pytestmark = [pytest.mark.swap, pytest.mark.requires("root", "fuse", "loop", "memcg", "losetup",
                                                     "mkswap", "swapon", "swapoff")]

SWAP_CONFIG = swap_config("1G", "512M")

WORKLOAD_MIB = 384
MEMCG_LIMIT = 128 * MiB


def cli_swapon(daemon, name: str = "swap0", priority: int = 32767) -> str:
    proc = cramfs_cli("--mountpoint", str(daemon.mountpoint), "swapon", name, "--priority",
                      str(priority), "--force", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loop = loop_for(daemon.data(name))
    assert loop, f"no loop device on {daemon.data(name)}: {loop_devices()}"
    assert loop in swaps(), f"{loop} not in /proc/swaps: {swaps()}"
    assert swaps()[loop].priority == priority
    return loop


def cli_swapoff(daemon, name: str = "swap0") -> None:
    loop = loop_for(daemon.data(name))
    proc = cramfs_cli("--mountpoint", str(daemon.mountpoint), "swapoff", name, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert loop not in swaps()
    assert loop_for(daemon.data(name)) is None


def parse_summary(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def test_loop_swap_python_workload(start_daemon, memory_cgroup):
    """cramfs swapon, a 384 MiB workload with verifiable pages in a 128 MiB memcg."""
    daemon = start_daemon(SWAP_CONFIG)
    loop = cli_swapon(daemon)
    assert loop_direct_io(loop) in (True, None), "losetup --direct-io=on did not take"
    cg = memory_cgroup(MEMCG_LIMIT)
    sampler = Sampler(daemon.mountpoint, "swap0", loop)
    sampler.start()
    started = time.monotonic()
    try:
        result = cg.run(workload_command(WORKLOAD_MIB, seed=11, passes=2, sleep=0.5),
                        timeout=600)
    finally:
        sampler.stop()
    elapsed = time.monotonic() - started
    summary = parse_summary(result.stdout)
    print(f"python workload {WORKLOAD_MIB} MiB in memcg {MEMCG_LIMIT // MiB} MiB on cramfs: "
          f"{elapsed:.1f}s; swap used max {sampler.max_swap_used_kib // 1024} MiB, "
          f"device orig max {sampler.max_orig // MiB} MiB; {summary.get('timings')}")
    assert result.returncode == 0, f"workload failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert summary.get("bad_pages") == 0, summary
    assert cg.oom_kills() == 0
    # the pages really went through the device
    assert sampler.max_swap_used_kib > 64 * 1024, vars(sampler)
    assert sampler.max_orig > 64 * MiB, vars(sampler)
    assert mm_stat(daemon.mountpoint, "swap0")["orig_data_size"] > 0
    assert io_stat(daemon.mountpoint, "swap0")["failed_writes"] == 0
    assert daemon.alive()
    cg.remove()
    cli_swapoff(daemon)
    assert daemon.stop(timeout=30) == 0, daemon.log_tail()
    assert not is_mounted(daemon.mountpoint)


@pytest.mark.requires("stress-ng")
def test_loop_swap_stress_ng_verify(start_daemon, memory_cgroup, harness):
    """Manual losetup --direct-io=on + mkswap + swapon; stress-ng --vm --verify in a memcg."""
    daemon = start_daemon(SWAP_CONFIG)
    loop = harness.attach_loop(daemon.data("swap0"), direct_io=True)
    swap_on(loop, priority=32767)
    cg = memory_cgroup(MEMCG_LIMIT)
    sampler = Sampler(daemon.mountpoint, "swap0", loop)
    sampler.start()
    try:
        result = cg.run(["stress-ng", "--vm", "1", "--vm-bytes", f"{WORKLOAD_MIB}M",
                         "--vm-keep", "--verify", "--timeout", "20s", "--metrics-brief"],
                        timeout=180)
    finally:
        sampler.stop()
    output = result.stdout + result.stderr
    print(output[-3000:])
    assert result.returncode == 0, output[-4000:]
    assert not re.search(r"fail(ed|ure)?:?\s+[1-9]|verif\w* fail|detected \d+ memory error",
                         output, re.I), output[-4000:]
    assert sampler.max_swap_used_kib > 32 * 1024, vars(sampler)
    assert sampler.max_orig > 32 * MiB, vars(sampler)
    assert io_stat(daemon.mountpoint, "swap0")["failed_writes"] == 0
    cg.remove()
    swap_off(loop)
    harness.loops.remove(loop)
    detach_loop(loop)
    assert daemon.stop(timeout=30) == 0, daemon.log_tail()
    assert not is_mounted(daemon.mountpoint)


def test_sigterm_while_swap_active_keeps_serving(start_daemon, memory_cgroup):
    daemon = start_daemon(SWAP_CONFIG)
    loop = cli_swapon(daemon)
    # put some pages on it so the kernel really depends on the device
    cg = memory_cgroup(64 * MiB)
    result = cg.run(workload_command(128, seed=5, passes=0, sleep=0), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cg.remove()

    daemon.signal()
    time.sleep(3)
    assert daemon.alive(), f"cramfsd exited with swap active:\n{daemon.log_tail()}"
    assert is_mounted(daemon.mountpoint)
    assert loop in swaps()
    # still serving
    assert read_attr(daemon.mountpoint, "swap0", "kind") == "swap"
    mm_stat(daemon.mountpoint, "swap0")
    log = daemon.log()
    assert "swap0" in log and "swapoff" in log, log[-3000:]
    # a second SIGTERM must not take active swap away either
    daemon.signal()
    time.sleep(2)
    assert daemon.alive() and is_mounted(daemon.mountpoint)

    cli_swapoff(daemon)
    assert daemon.wait(timeout=30) == 0, daemon.log_tail()
    assert not is_mounted(daemon.mountpoint)


POOL_CONFIG = swap_config("512M", "32M")


def test_incompressible_fill_past_pool(start_daemon, memory_cgroup, tmp_path):
    """Random pages beyond memcg limit + pool: writes get refused, the kernel logs swap write
    errors, the workload never reads a wrong page, and the device recovers.

    The kernel does not OOM here: a refused swap write leaves the page dirty in memory and
    reclaim retries it (thousands of refused writes per second) while the few writes that reuse
    a slot in place succeed. So after STALL seconds of that the test lifts the memcg limit; the
    workload then finishes and verifies every page, including the ones the pool did store.
    (An OOM kill in the meantime is also acceptable: it is the kernel's answer, not
    corruption.) The daemon logs at info here: at debug it writes a line per refused write.
    """
    stall = 30
    daemon = start_daemon(POOL_CONFIG, log_level="info")
    loop = cli_swapon(daemon, priority=32767)
    cg = memory_cgroup(64 * MiB)
    klog = KernelLog()
    sampler = Sampler(daemon.mountpoint, "swap0", loop)
    sampler.start()
    err_path = tmp_path / "workload.stderr"
    with open(err_path, "w") as err:
        proc = cg.popen(workload_command(192, seed=3, mix="random", passes=1, sleep=0.2,
                                         spot_check=64),
                        stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        try:
            out, _ = proc.communicate(timeout=stall)
        except subprocess.TimeoutExpired:
            stalled_io = io_stat(daemon.mountpoint, "swap0")
            print(f"after {stall}s under pressure: io_stat {stalled_io}; lifting the memcg limit")
            cg.set_limit(2048 * MiB)
            out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            cg.kill()
            proc.wait(timeout=60)
        sampler.stop()
    stderr = err_path.read_text()
    summary = parse_summary(out)
    errors = klog.grep("write-error on swap", "write error on swap",
                       "critical space allocation error, dev " + os.path.basename(loop))
    stat, io = mm_stat(daemon.mountpoint, "swap0"), io_stat(daemon.mountpoint, "swap0")
    print(f"rc={proc.returncode} oom_kills={cg.oom_kills()} summary={summary} "
          f"mm_stat={stat} io_stat={io} kernel errors={len(errors)} {errors[:3]}")
    # never a wrong page: exit 1 is the workload's "mismatch" status
    assert "MISMATCH" not in stderr, stderr[-4000:]
    assert proc.returncode != 1, f"{out}\n{stderr[-4000:]}"
    assert summary.get("bad_pages", 0) == 0, summary
    assert proc.returncode == 0 or cg.oom_kills() > 0, (proc.returncode, stderr[-3000:])
    assert daemon.alive(), daemon.log_tail()
    # the pool filled up and the device refused writes; the kernel saw the errors
    assert sampler.max_used_total <= 32 * MiB
    assert sampler.max_used_total >= 24 * MiB, vars(sampler)
    assert io["failed_writes"] > 0, io
    assert errors, "no swap write error in dmesg"
    # (the state may be ok again: with discard, the pool empties as the pages come back in)

    cg.remove()
    cli_swapoff(daemon)
    # recovery: the daemon answers, a zero write releases the pool (our discard), new data
    # round-trips
    mm_stat(daemon.mountpoint, "swap0")
    data = daemon.data("swap0")
    with open(data, "r+b") as f:
        zeros = bytes(MiB)
        for _ in range(512):
            f.write(zeros)
    assert int(read_attr(daemon.mountpoint, "swap0", "pool_used")) < MiB
    assert read_attr(daemon.mountpoint, "swap0", "watermark_state") == "ok"
    payload = os.urandom(8 * MiB)
    with open(data, "r+b") as f:
        f.seek(100 * MiB)
        f.write(payload)
    with open(data, "rb") as f:
        f.seek(100 * MiB)
        assert f.read(len(payload)) == payload
    write_attr(daemon.mountpoint, "swap0", "compact", "1")
    assert daemon.stop(timeout=30) == 0, daemon.log_tail()
    assert not is_mounted(daemon.mountpoint)
