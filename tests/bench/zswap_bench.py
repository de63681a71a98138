"""zswap benchmark: store/load pages/s with the pool full and writeback running.

    python tests/bench/zswap_bench.py [--mib N] [--pool-mib N] [--request-pages N]

A ZswapDevice whose pool limit is far below the data (so the limit is hit, the shrinker runs
and pages move to the backing file) against a plain CompressedDevice large enough to hold
every page, on the same pages (a synthetic memory-like mix; see pages.py). Stores interleave
writeback(max_pages=64) between requests the way the daemon's shrinker task does while the
pool is above the accept threshold. Loads are random 4 KiB reads (each one verified) across
the whole device, so a zswap load comes from the pool or the backing file as placed.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import pages as pagesrc  # noqa: E402

from cramfs.device import CompressedDevice, DeviceConfig  # noqa: E402
from cramfs.zswap import ZswapDevice  # noqa: E402

PAGE = 4096
MIB = 1 << 20


def store(dev, data: bytes, request: int, shrink: bool) -> tuple[float, int]:
    """Seconds to write ``data`` in ``request``-byte writes; pages written back meanwhile."""
    written_back = 0
    start = time.perf_counter()
    for off in range(0, len(data), request):
        dev.write(off, data[off:off + request])
        if shrink and dev.needs_writeback():
            written_back += dev.writeback(max_pages=64)
    return time.perf_counter() - start, written_back


def load(dev, data: bytes, count: int, seed: int = 3) -> float:
    rng = random.Random(seed)
    pages = len(data) // PAGE
    order = [rng.randrange(pages) for _ in range(count)]
    start = time.perf_counter()
    for i in order:
        got = dev.read(i * PAGE, PAGE)
        if got != data[i * PAGE:(i + 1) * PAGE]:
            raise AssertionError(f"page {i} read back wrong")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="data to store")
    parser.add_argument("--pool-mib", type=int, default=8, help="zswap pool (limit = "
                        "max_pool_percent of it)")
    parser.add_argument("--max-pool-percent", type=int, default=50)
    parser.add_argument("--accept", type=int, default=80)
    parser.add_argument("--loads", type=int, default=20000)
    args = parser.parse_args(argv)

    size = args.mib * MIB
    npages = size // PAGE
    data = pagesrc.synthetic_pages(npages, pagesrc.DEFAULT_MIX, seed=5)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cramfs-zswap-bench-") as tmp:
        for request_pages in (1, 256):
            request = request_pages * PAGE
            for kind in ("plain", "zswap"):
                if kind == "plain":
                    dev = CompressedDevice(DeviceConfig(size=size, pool=size + size // 4,
                                                        low=0.98, high=0.99))
                else:
                    dev = ZswapDevice(DeviceConfig(size=size, pool=args.pool_mib * MIB),
                                      backing_file=Path(tmp) / "backing.img",
                                      max_pool_percent=args.max_pool_percent,
                                      accept_threshold_percent=args.accept)
                try:
                    # first pass fills the device; the second overwrites a full device,
                    # the steady state the issue asks about (pool full, writeback running)
                    store(dev, data, request, kind == "zswap")
                    seconds, written_back = store(dev, data, request, kind == "zswap")
                    loads = load(dev, data, args.loads)
                    backing = getattr(dev, "backing_pages", 0)
                    rows.append((kind, request_pages * 4, npages / seconds,
                                 args.loads / loads, dev.used_bytes / MIB, backing,
                                 written_back, dev.counters.pool_limit_hit))
                finally:
                    dev.close()
    print(f"{args.mib} MiB synthetic memory pages (mix {pagesrc.DEFAULT_MIX}); zswap pool "
          f"{args.pool_mib} MiB, limit {args.max_pool_percent}%, accept {args.accept}%")
    header = ("device", "req KiB", "store pages/s", "load pages/s", "pool MiB",
              "backing pages", "written back", "limit hits")
    print(" | ".join(header))
    print(" | ".join("-" * len(h) for h in header))
    for row in rows:
        kind, req, st, ld, pool, backing, wb, hits = row
        print(f"{kind:6} | {req:7} | {st:13,.0f} | {ld:12,.0f} | {pool:8.2f} | {backing:13} | "
              f"{wb:12} | {hits:10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
