#!/usr/bin/env python3
"""A capacity-lying node's metadata follows what it stores, not what it advertises.

    sudo flock /tmp/cramfs-e2e.lock .venv/bin/python tests/bench/sparse_bench.py \
        [--size 15T] [--pool 1G] [--mib 256] [--regions 4] [--pages FILE]

Starts cramfsd with one node of ``--size`` over a ``--pool`` pool and reports:

- the time from exec to mounted and ready (READY=1 to $NOTIFY_SOCKET);
- the daemon's idle memory: VmRSS (/proc/PID/status), Rss and Pss_Anon (smaps_rollup);
- after writing ``--mib`` of real pages (tests/bench/pages.py; synthetic pages top up a
  quiet machine) in 1 MiB writes spread over ``--regions`` regions across the whole
  advertised size: the growth of RSS beyond the pool per stored page (everything the daemon
  added, not only the table: request buffers, pymalloc arenas);

and the same writes on a device in this process, for what the table alone costs:
``table.metadata_bytes`` per stored page, and ``pagetable.fixed_bytes`` for the size. The
page table before it followed the stored pages cost 10 B per advertised page up front (40 GB
for 15 TiB: OOM-killed at start; 2.65 GB RSS idle for 1 TiB).

Measured here (2-CPU host, load 1.4-1.9, 256 MiB of real pages, 59513 stored, 128 chunks):

    in process   15T over 1G: built in 1.7 ms; empty table 5.5 KB (fixed_bytes 6.2 KB);
                 11.55 B of table per stored page (10.4 B per page slot; zero pages take none)
    cramfsd      ready in 0.31 s; idle VmRSS 34.4 MB (Pss_Anon 21.7 MB); after the writes
                 161.9 MB with 122.2 MB of pool: RSS beyond the pool grew 88.6 B per page

Same run of the daemon rows with ``--size 64G`` (alternating, 09:21 UTC): this tree grew
89.6-89.9 B per stored page beyond the pool, the tree before the device's split 89.8-92.6 B.

Needs root and /dev/fuse; the daemon it starts is stopped in ``finally`` (the e2e Harness).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from e2e.helpers import Harness, mm_stat, read_attr  # noqa: E402
from rss_bench import proc_status, smaps_rollup  # noqa: E402
from seq_path import load_pages  # noqa: E402

from cramfs import pagetable as pt  # noqa: E402
from cramfs.device import CompressedDevice, DeviceConfig  # noqa: E402
from cramfs.sizes import parse_size  # noqa: E402

MiB = 1 << 20
MB = 1e6
PAGE = 4096


def node_config(size: str, pool: str) -> str:
    return f"""
[device.node0]
kind = "node"
size = "{size}"
pool = "{pool}"
compressor = "zstd"
level = -1

[device.node0.watermarks]
low = 0.80
high = 0.90
policy = "none"
"""


def offsets(size: int, nbytes: int, regions: int) -> list[int]:
    """1 MiB write offsets: ``regions`` runs of equal length spread over the whole size."""
    per = nbytes // regions // MiB
    step = (size - per * MiB) // max(regions - 1, 1) // MiB * MiB
    return [r * step + i * MiB for r in range(regions) for i in range(per)]


def memory(pid: int) -> dict[str, int]:
    rollup = smaps_rollup(pid)
    return {"vmrss": proc_status(pid)["VmRSS"], "rss": rollup["Rss"],
            "pss_anon": rollup["Pss_Anon"]}


def through_daemon(args: argparse.Namespace, data: bytes) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="cramfs-sparse-"))
    cramfsd = str(Path(sys.executable).parent / "cramfsd")
    harness = Harness(tmp, cramfsd)
    try:
        started = time.perf_counter()
        daemon = harness.start_daemon(node_config(args.size, args.pool), log_level="info",
                                      ready_timeout=120)
        ready = time.perf_counter() - started
        time.sleep(1.0)  # let start-up allocations settle
        idle = memory(daemon.pid)
        idle_pool = int(read_attr(daemon.mountpoint, "node0", "pool_resident"))
        fd = os.open(daemon.data("node0"), os.O_WRONLY)
        try:
            for i, offset in enumerate(offsets(parse_size(args.size), len(data), args.regions)):
                os.pwrite(fd, data[i * MiB:(i + 1) * MiB], offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        time.sleep(1.0)
        after = memory(daemon.pid)
        pool = int(read_attr(daemon.mountpoint, "node0", "pool_resident"))
        stored = mm_stat(daemon.mountpoint, "node0")["orig_data_size"] // PAGE
        grown = (after["vmrss"] - pool) - (idle["vmrss"] - idle_pool)
        return {"ready_s": ready, "idle_vmrss": idle["vmrss"], "idle_rss": idle["rss"],
                "idle_pss_anon": idle["pss_anon"], "stored_pages": stored,
                "after_vmrss": after["vmrss"], "pool_resident": pool,
                "beyond_pool_growth_per_page": grown / stored if stored else 0.0}
    finally:
        problems = harness.cleanup()
        if problems:
            print("teardown problems: " + "; ".join(problems), file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


def in_process(args: argparse.Namespace, data: bytes) -> dict[str, float]:
    size = parse_size(args.size)
    started = time.perf_counter()
    dev = CompressedDevice(DeviceConfig(size=size, pool=parse_size(args.pool), threads=1))
    built = time.perf_counter() - started
    try:
        empty = dev.table.metadata_bytes
        for i, offset in enumerate(offsets(size, len(data), args.regions)):
            dev.write(offset, data[i * MiB:(i + 1) * MiB])
        stored = dev.pages_stored
        grown = dev.table.metadata_bytes - empty
        return {"build_s": built, "empty_metadata": empty, "stored_pages": stored,
                "chunks": len(getattr(dev.table, "chunks", ())),  # 0: a flat table
                "metadata_per_stored_page": grown / stored if stored else 0.0,
                "fixed_bytes": pt.fixed_bytes(dev.pages),
                "fixed_bytes_per_tib": pt.fixed_bytes(dev.pages) / (size / (1 << 40))}
    finally:
        dev.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="15T")
    parser.add_argument("--pool", default="1G")
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--regions", type=int, default=4)
    parser.add_argument("--pages", type=Path, default=None,
                        help="reuse (or first save) the gathered real pages")
    parser.add_argument("--no-daemon", action="store_true", help="only the in-process row")
    args = parser.parse_args(argv)
    data = load_pages(args.mib, args.pages)
    with open("/proc/loadavg") as f:
        print(f"load average: {' '.join(f.read().split()[:3])}")
    row = in_process(args, data)
    print(f"in process: {args.size} over {args.pool}: built in {row['build_s'] * 1000:.1f} ms,"
          f" empty table {row['empty_metadata']} B (fixed_bytes {row['fixed_bytes']} B,"
          f" {row['fixed_bytes_per_tib']:.0f} B per advertised TiB); {row['stored_pages']}"
          f" pages stored in {row['chunks']} chunks: {row['metadata_per_stored_page']:.2f} B"
          " of table per stored page")
    if args.no_daemon:
        return 0
    d = through_daemon(args, data)
    print(f"cramfsd: {args.size} node over {args.pool}: ready in {d['ready_s']:.2f} s;"
          f" idle VmRSS {d['idle_vmrss'] / MB:.1f} MB, Rss {d['idle_rss'] / MB:.1f} MB,"
          f" Pss_Anon {d['idle_pss_anon'] / MB:.1f} MB; after {args.mib} MiB"
          f" ({d['stored_pages']} pages): VmRSS {d['after_vmrss'] / MB:.1f} MB with"
          f" {d['pool_resident'] / MB:.1f} MB of pool, RSS beyond the pool grew"
          f" {d['beyond_pool_growth_per_page']:.1f} B per stored page")
    return 0


if __name__ == "__main__":
    sys.exit(main())
