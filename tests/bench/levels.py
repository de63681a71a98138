"""Choose the zstd level by measurement: speed against memory, level by level.

    python tests/bench/levels.py [--mib 64] [--levels 3 1 -1 -2 -3 -5] [--rounds 3]
                                 [--data real|synthetic] [--json PATH]

On one set of pages (real process memory by default, as compare.py gathers it) and for each
level: zstd alone in C on all cores (zstd_ceiling.py: the most any cramfs path could reach),
then cramfs's device path without FUSE (CompressedDevice.write / read in 1 MiB requests, the
codec's two threads, every page placed in the pool and read back verified) and the pool's
mem_used_total; kernel zram's mem_used_total on the same pages (its default algorithm,
measured once in the same run) is the memory reference. Levels are measured in interleaved
rounds and the best round kept, so a noisy neighbour hurts every level alike.

Prints one row per level, the levels whose pool stays within 0.9x zram's memory (the memory
target: at most 0.9x zram's mem_used_total on the same pages) and the fastest of those. The
device path leaves FUSE out: confirm a level through the whole path with
``compare.py --level N``. Needs root only for the zram reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import pool_bench  # noqa: E402
import zstd_ceiling  # noqa: E402

from daemon.config import DEFAULT_LEVEL  # noqa: E402

MIB = 1 << 20
MB = 1e6
ZRAM_FRACTION = 0.9


def device_round(data: bytes, level: int) -> dict:
    """Store then load ``data`` through a fresh device in 1 MiB requests."""
    dev = pool_bench.make_device(len(data), level)
    try:
        store = pool_bench.timed_store(dev, data, MIB)
        load, verified = pool_bench.timed_load(dev, data, MIB)
        return {"store_mbs": len(data) / store / MB, "load_mbs": len(data) / load / MB,
                "mem_used_total": dev.mm_stat()[2], "verified": verified}
    finally:
        dev.close()


def measure(data: bytes, levels: list[int], rounds: int) -> dict[int, dict]:
    best: dict[int, dict] = {level: {} for level in levels}
    for round_no in range(rounds):
        for level in levels:
            row = best[level]
            alone = zstd_ceiling.ceiling(data, level, repeat=1)
            dev = device_round(data, level)
            for key, value in (("zstd_compress_mbs", alone["compress_mbs"]),
                               ("zstd_decompress_mbs", alone["decompress_mbs"]),
                               ("store_mbs", dev["store_mbs"]), ("load_mbs", dev["load_mbs"])):
                row[key] = max(row.get(key, 0.0), value)
            row["mem_used_total"] = dev["mem_used_total"]
            row["verified"] = row.get("verified", True) and dev["verified"]
            print(f"[levels] round {round_no + 1}/{rounds} level {level}: store "
                  f"{dev['store_mbs']:.0f} MB/s, load {dev['load_mbs']:.0f} MB/s",
                  file=sys.stderr, flush=True)
    return best


def zram_memory(data: bytes) -> tuple[str, int | None, str]:
    if os.geteuid() != 0:
        return "-", None, "zram reference skipped: needs root"
    runs = pool_bench.zram_bench(data)
    first = runs[0]
    if "error" in first:
        return first.get("algorithm", "-"), None, f"zram reference: {first['error']}"
    return first["algorithm"], first["mem_used_total"], ""


def report(best: dict[int, dict], zram_alg: str, zram_mem: int | None, size: int) -> int | None:
    print(f"{'level':>5}  {'zstd alone c/d (MB/s)':>21}  {'cramfs store/load 1M':>20}  "
          f"{'pool MiB':>8}  {'ratio':>5}  {'x zram mem':>10}")
    for level, row in best.items():
        mem = row["mem_used_total"]
        versus = f"{mem / zram_mem:.2f}x" if zram_mem else "-"
        print(f"{level:>5}  {row['zstd_compress_mbs']:>9.0f} / {row['zstd_decompress_mbs']:<9.0f}  "
              f"{row['store_mbs']:>8.0f} / {row['load_mbs']:<9.0f}  {mem / MIB:>8.2f}  "
              f"{size / mem:>5.2f}  {versus:>10}")
    if zram_mem:
        print(f"zram ({zram_alg}) mem_used_total on the same pages: {zram_mem / MIB:.2f} MiB")
    fits = [level for level, row in best.items()
            if zram_mem is None or row["mem_used_total"] <= ZRAM_FRACTION * zram_mem]
    if not fits:
        print(f"no level keeps the pool within {ZRAM_FRACTION}x zram's memory")
        return None
    choice = max(fits, key=lambda level: best[level]["store_mbs"])
    print(f"within {ZRAM_FRACTION}x zram memory: levels {', '.join(map(str, fits))}; fastest "
          f"1 MiB store among them: level {choice} (the daemon's default is {DEFAULT_LEVEL})")
    return choice


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--levels", type=int, nargs="+", default=[3, 1, -1, -2, -3, -5])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", choices=("real", "synthetic"), default="real")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import compare  # the same page gathering as the side-by-side run

    started = time.perf_counter()
    data, info = compare.make_data(args.data, args.mib * MIB)
    print(f"{len(data) // MIB} MiB of {args.data} pages ({info.get('zero', 0)} zero), "
          f"{os.cpu_count()} CPUs, best of {args.rounds} interleaved rounds")
    best = measure(data, args.levels, args.rounds)
    alg, zram_mem, note = zram_memory(data)
    if note:
        print(note)
    choice = report(best, alg, zram_mem, len(data))
    if not all(row["verified"] for row in best.values()):
        print("FAIL  read-back differs from what was written")
        return 1
    print(f"bench time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"levels": best, "zram_algorithm": alg,
                                         "zram_mem_used_total": zram_mem, "choice": choice,
                                         "data": info}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
