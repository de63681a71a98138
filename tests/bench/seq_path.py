"""cramfs's 1 MiB device path without FUSE, stage by stage, next to zstd alone.

    python tests/bench/seq_path.py [--mib 64] [--rounds 5] [--pages FILE] [--compressor NAME]

Runs the daemon's large-request path on the device directly, the way daemon/fs.py calls it:
writes ``precheck_write`` + ``prepare_write`` + ``commit_write`` per 1 MiB request, reads
``fetch`` + ``decode``, and times each stage per MiB, then the one-page path a swap-out and
swap-in take (``write``/``read`` of 4 KiB per call, per page), alternating with zstd alone
(zstd_ceiling.py) on the same pages in every round; medians of the rounds. Every read is
compared with what was written. ``--pages FILE`` reuses (or first saves) the gathered real
pages so runs on different code see the same data.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import pages as pagesrc  # noqa: E402
import zstd_ceiling  # noqa: E402

from cramfs.device import CompressedDevice, DeviceConfig  # noqa: E402

MiB = 1 << 20
MB = 1e6
PAGE = 4096


def load_pages(mib: int, path: Path | None) -> bytes:
    nbytes = mib * MiB
    if path is not None and path.exists() and path.stat().st_size >= nbytes:
        return path.read_bytes()[:nbytes]
    real = pagesrc.gather_real_pages(nbytes)
    data = real.data
    if len(data) < nbytes:
        data += pagesrc.synthetic_pages((nbytes - len(data)) // pagesrc.PAGE)
    data = data[:nbytes]
    if path is not None:
        path.write_bytes(data)
    return data


def one_round(data: bytes, compressor: str, level: int | None) -> dict[str, float]:
    """Seconds per MiB for each stage of one pass over ``data``."""
    dev = CompressedDevice(DeviceConfig(size=4 * len(data), pool=2 * len(data),
                                        compressor=compressor, level=level))
    view = memoryview(data)
    t = dict.fromkeys(("prepare", "commit", "fetch", "decode", "write", "read"), 0.0)
    clock = time.perf_counter
    try:
        start_all = clock()
        for off in range(0, len(data), MiB):
            buf = bytes(view[off:off + MiB])  # pyfuse3 hands the handler a bytes object
            t0 = clock()
            dev.precheck_write(off, buf)
            plan = dev.prepare_write(off, buf)
            t1 = clock()
            dev.commit_write(plan)
            t2 = clock()
            t["prepare"] += t1 - t0
            t["commit"] += t2 - t1
        t["write"] = clock() - start_all
        start_all = clock()
        for off in range(0, len(data), MiB):
            t0 = clock()
            rplan = dev.fetch(off, MiB)
            t1 = clock()
            out = dev.decode(rplan)
            t2 = clock()
            t["fetch"] += t1 - t0
            t["decode"] += t2 - t1
            checked = clock()
            if out != data[off:off + MiB]:
                raise SystemExit(f"read-back mismatch at offset {off}")
            start_all += clock() - checked  # the check is not the device's time
        t["read"] = clock() - start_all
        # One page at a time (swap-out and swap-in): device.write / device.read per page,
        # into the second quarter of the device, then read back in the same order.
        base = len(data)
        pages = [bytes(view[off:off + PAGE]) for off in range(0, len(data), PAGE)]
        t0 = clock()
        for i, page in enumerate(pages):
            dev.write(base + i * PAGE, page)
        t["write_4k"] = clock() - t0
        t0 = clock()
        got = [dev.read(base + i * PAGE, PAGE) for i in range(len(pages))]
        t["read_4k"] = clock() - t0
        if got != pages:
            raise SystemExit("4 KiB read-back mismatch")
        t["pool_mib"] = dev.pool.used_bytes / MiB
    finally:
        dev.close()
    mibs = len(data) / MiB
    return {k: (v / mibs if k != "pool_mib" else v) for k, v in t.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pages", type=Path, default=None)
    ap.add_argument("--compressor", default="zstd")
    ap.add_argument("--level", type=int, default=None)
    args = ap.parse_args(argv)
    data = load_pages(args.mib, args.pages)
    level = -1 if args.level is None and args.compressor == "zstd" else args.level
    rounds: list[dict[str, float]] = []
    ceil: list[dict] = []
    for _ in range(args.rounds):
        if args.compressor == "zstd":
            ceil.append(zstd_ceiling.ceiling(data, level, repeat=1))
        rounds.append(one_round(data, args.compressor, level))

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    print(f"{args.mib} MiB of real pages, {args.compressor} level {level}, median of "
          f"{args.rounds} rounds")
    print(f"{'stage':<10} {'ms/MiB':>8}")
    for key in ("prepare", "commit", "write", "fetch", "decode", "read"):
        print(f"{key:<10} {1e3 * med(key):>8.3f}")
    print(f"4 KiB pages, one call each: write {1e6 * med('write_4k') * PAGE / MiB:.2f} us, "
          f"read {1e6 * med('read_4k') * PAGE / MiB:.2f} us per page")
    w, r = MiB / med("write") / MB, MiB / med("read") / MB
    print(f"device write {w:.0f} MB/s, read {r:.0f} MB/s, pool {med('pool_mib'):.2f} MiB")
    if ceil:
        cw = statistics.median(c["compress_mbs"] for c in ceil)
        cr = statistics.median(c["decompress_mbs"] for c in ceil)
        print(f"zstd alone  {cw:.0f} MB/s compress ({1e3 * MiB / cw / MB:.3f} ms/MiB), "
              f"{cr:.0f} MB/s decompress ({1e3 * MiB / cr / MB:.3f} ms/MiB)")
        print(f"device / zstd alone: write {w / cw:.2f}x, read {r / cr:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
