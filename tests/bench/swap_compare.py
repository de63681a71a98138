#!/usr/bin/env python3
"""Run the same verifiable memory workload on a cramfs loop-swap and on kernel zram.

Each backend is the only swap the workload should use (it gets priority 32767; other active
swaps are reported). The workload (tests/e2e/workload.py) runs in a memory cgroup smaller than
itself, so the kernel swaps; the script prints the workload size, the memcg limit, the elapsed
time and what each device stored. Needs root, /dev/fuse, loop devices, a memory cgroup and
/sys/block/zram0 (not in use: the script refuses to touch a zram0 that has a disksize).

    sudo .venv/bin/python tests/bench/swap_compare.py --mib 384 --limit-mib 128
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e.helpers import (  # noqa: E402
    Harness,
    MemCgroup,
    MiB,
    Sampler,
    mm_stat,
    run,
    swap_config,
    swap_off,
    swap_on,
    swaps,
    workload_command,
)

PRIORITY = 32767
ZRAM = Path("/sys/block/zram0")


def parse_summary(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def run_workload(label: str, args, swap_dev: str, stat_dir: Path, stat_dev: str) -> dict:
    cg = MemCgroup(f"bench-{label}-{os.getpid()}", args.limit_mib * MiB)
    sampler = Sampler(stat_dir, stat_dev, swap_dev, interval=0.25)
    others = [d for d in swaps() if d != swap_dev]
    try:
        sampler.start()
        start = time.monotonic()
        result = cg.run(workload_command(args.mib, seed=args.seed, mix=args.mix,
                                         passes=args.passes, sleep=args.sleep),
                        timeout=args.timeout)
        elapsed = time.monotonic() - start
        sampler.stop()
        oom = cg.oom_kills()
    finally:
        with contextlib.suppress(Exception):
            sampler.stop()
        cg.remove()
    summary = parse_summary(result.stdout)
    final = mm_stat(stat_dir, stat_dev)
    return {
        "backend": label, "workload_mib": args.mib, "memcg_limit_mib": args.limit_mib,
        "mix": args.mix, "passes": args.passes, "elapsed_s": round(elapsed, 2),
        "exit": result.returncode, "bad_pages": summary.get("bad_pages"), "oom_kills": oom,
        "swap_used_max_mib": round(sampler.max_swap_used_kib / 1024, 1),
        "stored_max_mib": round(sampler.max_orig / MiB, 1),
        "pool_used_max_mib": round(sampler.max_used_total / MiB, 1),
        "final_orig_mib": round(final["orig_data_size"] / MiB, 1),
        "final_compr_mib": round(final["compr_data_size"] / MiB, 1),
        "timings": summary.get("timings"), "other_swaps": others,
        "stderr_tail": "" if result.returncode == 0 else result.stderr[-2000:],
    }


def bench_cramfs(args) -> dict:
    cramfsd = args.cramfsd or shutil.which("cramfsd") or str(Path(sys.executable).parent /
                                                              "cramfsd")
    tmp = Path(tempfile.mkdtemp(prefix="cramfs-bench-"))
    harness = Harness(tmp, cramfsd)
    config = swap_config(args.size, args.pool, name="bench0", level=args.level)
    try:
        daemon = harness.start_daemon(config, log_level="info")
        loop = harness.attach_loop(daemon.data("bench0"), direct_io=True)
        swap_on(loop, priority=PRIORITY)
        row = run_workload("cramfs", args, loop, daemon.mountpoint, "bench0")
        row["device"] = f"{loop} -> {daemon.data('bench0')} (zstd level {args.level})"
        return row
    finally:
        problems = harness.cleanup()
        if problems:
            print("cramfs teardown problems: " + "; ".join(problems), file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


def bench_zram(args) -> dict:
    if not ZRAM.exists():
        run(["modprobe", "zram"], check=False)
    if not ZRAM.exists():
        raise SystemExit("no /sys/block/zram0")
    if "/dev/zram0" in swaps() or int((ZRAM / "disksize").read_text()) != 0:
        raise SystemExit("zram0 is in use (disksize set or swap on it); not touching it")
    try:
        (ZRAM / "reset").write_text("1")
        if args.zram_algorithm:
            (ZRAM / "comp_algorithm").write_text(args.zram_algorithm)
        algorithm = (ZRAM / "comp_algorithm").read_text().split("[")[1].split("]")[0]
        (ZRAM / "disksize").write_text(str(parse_size(args.size)))
        swap_on("/dev/zram0", priority=PRIORITY)
        row = run_workload("zram", args, "/dev/zram0", Path("/sys/block"), "zram0")
        row["device"] = f"/dev/zram0 ({algorithm}, disksize {args.size})"
        return row
    finally:
        with contextlib.suppress(Exception):
            swap_off("/dev/zram0")
        with contextlib.suppress(OSError):
            (ZRAM / "reset").write_text("1")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper()
    if text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=384, help="workload size (MiB)")
    parser.add_argument("--limit-mib", type=int, default=128, help="memcg limit (MiB)")
    parser.add_argument("--mix", default="mixed", choices=["mixed", "compressible", "random"])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--size", default="1G", help="advertised size / zram disksize")
    parser.add_argument("--pool", default="512M", help="cramfs pool")
    parser.add_argument("--level", type=int, default=1, help="cramfs zstd level")
    parser.add_argument("--zram-algorithm", help="e.g. lz4 (default: the kernel's current)")
    parser.add_argument("--cramfsd", help="path to cramfsd")
    parser.add_argument("--only", choices=["cramfs", "zram"])
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines too")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root")

    rows = []
    if args.only in (None, "cramfs"):
        rows.append(bench_cramfs(args))
    if args.only in (None, "zram"):
        rows.append(bench_zram(args))

    print(f"\nworkload: {args.mib} MiB ({args.mix} pages, {args.passes} verify+rewrite passes), "
          f"memcg limit {args.limit_mib} MiB")
    header = ("backend", "elapsed_s", "exit", "bad_pages", "oom_kills", "swap_used_max_mib",
              "stored_max_mib", "pool_used_max_mib")
    print("  ".join(f"{h:>17}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]!s:>17}" for h in header))
    for row in rows:
        print(f"{row['backend']}: {row['device']}; phases {row['timings']}"
              + (f"; other active swaps {row['other_swaps']}" if row["other_swaps"] else ""))
        if row["stderr_tail"]:
            print(f"{row['backend']} workload stderr:\n{row['stderr_tail']}")
    if args.json:
        for row in rows:
            print(json.dumps(row))
    return 0 if all(r["exit"] == 0 and r["bad_pages"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
