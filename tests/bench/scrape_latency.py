"""Does a Prometheus scrape during heavy I/O add latency to that I/O?

Mounts the daemon, attaches its data file to a direct-io loop device, and runs the same fio
4 KiB random-write job twice: quiet, then while a thread scrapes /metrics as fast as it can
(far more often than any Prometheus would). Prints fio's completion-latency percentiles side
by side. Needs root, /dev/fuse, losetup and fio.

    python tests/bench/scrape_latency.py [--seconds 10] [--iodepth 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.e2e.helpers import Harness  # noqa: E402

CONFIG = """
metrics_address = ""
[device.swap0]
kind = "swap"
size = "512M"
pool = "256M"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fio(device: str, seconds: int, iodepth: int) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--name=lat", f"--filename={device}", "--rw=randwrite", "--bs=4k",
         "--size=256M", "--direct=1", "--ioengine=libaio", f"--iodepth={iodepth}",
         f"--runtime={seconds}", "--time_based", "--buffer_compress_percentage=70",
         "--refill_buffers", "--output-format=json"],
        capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    job = json.loads(out)["jobs"][0]["write"]
    pct = job["clat_ns"]["percentile"]
    return {"iops": job["iops"], "p50_us": pct["50.000000"] / 1e3,
            "p99_us": pct["99.000000"] / 1e3, "p99.9_us": pct["99.900000"] / 1e3,
            "max_us": job["clat_ns"]["max"] / 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--iodepth", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0,
                        help="scrapes per second (0: back to back, the worst case)")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("fio") is None:
        print("needs root and fio", file=sys.stderr)
        return 2
    daemon_command = shutil.which("cramfsd") or str(Path(sys.executable).parent / "cramfsd")
    harness = Harness(Path(tempfile.mkdtemp(prefix="cramfs-scrape-")), daemon_command)
    try:
        address = f"127.0.0.1:{free_port()}"
        daemon = harness.start_daemon(CONFIG, metrics_address=address, log_level="info")
        device = harness.attach_loop(daemon.data("swap0"))
        subprocess.run(["dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=64",
                        "oflag=direct"], check=True, capture_output=True, timeout=120)
        quiet = fio(device, args.seconds, args.iodepth)
        stop = threading.Event()
        scrapes = []

        def scrape() -> None:
            period = 1 / args.rate if args.rate else 0
            while not stop.is_set():
                started = time.perf_counter()
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
                    reply.read()
                scrapes.append(time.perf_counter() - started)
                if period:
                    stop.wait(max(0.0, period - (time.perf_counter() - started)))

        thread = threading.Thread(target=scrape, daemon=True)
        thread.start()
        try:
            busy = fio(device, args.seconds, args.iodepth)
        finally:
            stop.set()
            thread.join(timeout=30)
        rate = len(scrapes) / args.seconds
        print(f"fio 4 KiB random writes, iodepth {args.iodepth}, {args.seconds} s each; "
              f"scraper: {rate:.0f} scrapes/s, median scrape "
              f"{sorted(scrapes)[len(scrapes) // 2] * 1e3:.2f} ms")
        print(f"{'':12} {'quiet':>10} {'scraping':>10} {'ratio':>7}")
        for key in quiet:
            ratio = busy[key] / quiet[key] if quiet[key] else float("nan")
            print(f"{key:12} {quiet[key]:10.1f} {busy[key]:10.1f} {ratio:6.2f}x")
    finally:
        problems = harness.cleanup()
        for problem in problems:
            print(f"teardown: {problem}", file=sys.stderr)
        shutil.rmtree(harness.tmp_path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
