"""Recording a live device and replaying it (cramfs trace, cramfs replay) on the real daemon.

The fidelity promise: replaying a trace under the configuration it was recorded with gives the
live device's final mm_stat, io_stat and write-control counters exactly, refused writes,
discards, zero writes, tunable changes, compaction, the zero flush and zswap's writeback
included. Then variants change what the live run could not: the pool, the compressor.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import io_stat, mm_stat, read_attr, write_attr
from .test_mount import cramfs_cli

pytestmark = pytest.mark.requires("root", "fuse", "fallocate")

P = 4096
MiB = 1 << 20


def config(kind: str = "swap", extra: str = "", policy: str = "reject") -> str:
    return f"""
[device.dev0]
kind = "{kind}"
size = "128M"
pool = "16M"
{extra}
[device.dev0.watermarks]
low = 0.5
high = 0.75
policy = "{policy}"
"""


def traffic(data: Path, seed: int, requests: int = 1500) -> int:
    """Writes of 4 KiB and 1 MiB (text, random, zeros), reads and punched holes all over a
    128 MiB device with a 16 MiB pool: many are refused. Returns how many."""
    rng = random.Random(seed)
    fd = os.open(data, os.O_RDWR)
    refused = 0
    try:
        for _ in range(requests):
            size = P if rng.random() < 0.7 else MiB
            offset = rng.randrange(0, (128 * MiB - size) // P) * P
            kind = rng.random()
            if kind < 0.45:
                line = f"{offset} the quick brown fox\n".encode()
                payload = (line * (size // len(line) + 1))[:size]
            elif kind < 0.65:
                payload = rng.randbytes(size)
            elif kind < 0.75:
                payload = bytes(size)
            elif kind < 0.9:
                os.pread(fd, size, offset)
                continue
            else:
                punch(data, offset, size)
                continue
            try:
                os.pwrite(fd, payload, offset)
            except OSError:
                refused += 1
    finally:
        os.close(fd)
    return refused


def punch(path: Path, offset: int, length: int) -> None:
    subprocess.run(["fallocate", "--punch-hole", "--keep-size", "--offset", str(offset),
                    "--length", str(length), str(path)], check=True, capture_output=True,
                   timeout=60)


def cli(daemon, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return cramfs_cli("--mountpoint", str(daemon.mountpoint), *args, timeout=timeout)


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "replay", *args],
                          capture_output=True, text=True, timeout=600)


def live_books(daemon) -> tuple[dict[str, int], dict[str, int]]:
    return mm_stat(daemon.mountpoint, "dev0"), io_stat(daemon.mountpoint, "dev0")


def test_replay_of_a_live_recording_reproduces_the_device(start_daemon, tmp_path):
    daemon = start_daemon(config(extra="zero_flush_interval = 0.5"), log_level="info")
    data = daemon.data("dev0")
    traffic(data, 1, 300)  # the device holds data before the trace: a snapshot starts it
    trace = tmp_path / "live.trace"
    started = cli(daemon, "trace", "start", "dev0", str(trace))
    assert started.returncode == 0 and started.stdout.startswith("recording"), started
    assert cli(daemon, "trace", "start", "dev0", str(trace)).returncode == 1  # already on
    refused = traffic(data, 2)
    write_attr(daemon.mountpoint, "dev0", "watermark_high", "0.8")
    write_attr(daemon.mountpoint, "dev0", "compact", "1")
    refused += traffic(data, 3)
    time.sleep(1.2)  # a zero flush or two, recorded as events
    stopped = cli(daemon, "trace", "stop", "dev0")
    assert stopped.returncode == 0 and stopped.stdout.strip() == "off", stopped
    live_mm, live_io = live_books(daemon)
    assert refused > 0 and live_io["failed_writes"] > 0

    done = replay(str(trace), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    recorded = result["variants"][0]
    # the snapshot start makes counters relative: compare the state, and the counters as
    # differences over the traced span
    assert recorded["mm_stat"]["orig_data_size"] == live_mm["orig_data_size"]
    assert recorded["mm_stat"]["compr_data_size"] == live_mm["compr_data_size"]
    assert recorded["mm_stat"]["same_pages"] == live_mm["same_pages"]
    assert recorded["mm_stat"]["huge_pages"] == live_mm["huge_pages"]
    assert recorded["outcomes_changed"] == 0


def test_a_trace_from_start_replays_exactly_swap_and_zswap(start_daemon, tmp_path):
    for kind in ("swap", "zswap"):
        trace = tmp_path / f"{kind}.trace"
        extra = f'trace = "{trace}"\n'
        if kind == "zswap":
            extra += f'backing_file = "{tmp_path / "backing.img"}"\nmax_pool_percent = 50\n'
        daemon = start_daemon(config(kind, extra, policy="reject" if kind == "swap"
                                     else "none"), log_level="info")
        assert read_attr(daemon.mountpoint, "dev0", "trace") == f"recording {trace}"
        traffic(daemon.data("dev0"), 7)
        write_attr(daemon.mountpoint, "dev0", "watermark_low", "0.4")
        time.sleep(0.5)  # zswap: let the shrinker write back
        assert cli(daemon, "trace", "stop", "dev0").returncode == 0
        live_mm, live_io = live_books(daemon)
        daemon.stop()
        done = replay(str(trace), "--json")
        assert done.returncode == 0, done.stderr
        recorded = json.loads(done.stdout)["variants"][0]
        assert list(recorded["mm_stat"].values()) == list(live_mm.values()), kind
        assert recorded["io_stat"] == live_io, kind
        assert recorded["relative_counters"] is False


def test_variants_and_the_plot(start_daemon, tmp_path):
    trace = tmp_path / "t.trace"
    daemon = start_daemon(config(extra=f'trace = "{trace}"\n'), log_level="info")
    traffic(daemon.data("dev0"), 11, 800)
    daemon.stop()  # closes the trace
    plot = tmp_path / "pool.png"
    done = replay(str(trace), "--set", "pool=8M", "--set", "pool=64M,compressor=lz4",
                  "--json", "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    variants = json.loads(done.stdout)["variants"]
    assert [v["settings"] for v in variants] == [{}, {"pool": 8 * MiB},
                                                 {"pool": 64 * MiB, "compressor": "lz4"}]
    for key in ("mm_stat", "rejected_writes", "lost_pages", "watermark_events",
                "time_in_state", "peak_pool_bytes", "final_pool_bytes", "effective_ratio",
                "compression_ratio", "throttle_seconds", "written_back_pages",
                "cpu_seconds_per_gib"):
        assert all(key in v for v in variants), key
    rejected = [sum(v["rejected_writes"].values()) for v in variants]
    assert rejected[1] > rejected[0] > rejected[2] == 0  # smaller pool, larger pool
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    table = replay(str(trace), "--set", "pool=8M")
    assert table.returncode == 0 and "pool=8M" in table.stdout.replace("8388608", "8M")


def test_bad_trace_files_get_one_line(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"not a trace at all" * 100)
    for path, args in ((foreign, ()), (tmp_path / "missing", ()),
                       (foreign, ("--set", "nonsense=1"))):
        done = replay(str(path), *args)
        assert done.returncode in (1, 2), done
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("cramfs: "), done.stderr
        assert "Traceback" not in done.stderr
