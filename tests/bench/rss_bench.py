#!/usr/bin/env python3
"""The daemon's own memory after a swap workload: RSS beyond the pool, allocator tuned or not.

cramfsd locks itself in memory (mlockall), so whatever its heap keeps after a burst of traffic
stays resident for good. This runs the swap workload the README's worked example describes --
the embedded default config (swap0: 1G over a 1G pool, node0), ``cramfs swapon swap0 --force``,
tests/e2e/workload.py (every page verified) in a memory cgroup smaller than the workload -- on
daemons in alternating rounds:

  untuned  cramfsd with ``daemon.system.tune_allocator`` replaced by a no-op: glibc's defaults
  tuned    cramfsd as shipped
  old      with ``--old SRC``: the cramfsd of another source tree (e.g. ``git archive <commit> |
           tar -x -C SRC``), as shipped there, to compare two builds

and reports, per round, the daemon's RSS beyond its pools (``VmRSS`` of /proc/PID/status minus
the ``pool_resident`` attribute of every device) and its anonymous memory (``Pss_Anon`` of
/proc/PID/smaps_rollup; the main ``[heap]`` separately): idle before the workload, the peak
while it runs, and after it exits. The bound the soak test (tests/e2e/test_soak.py) checks is
48 MB plus 16 bytes per stored page.

    sudo .venv/bin/python tests/bench/rss_bench.py [--rounds 3] [--mib 320] [--limit-mib 128]
                                                   [--old SRC] [--only tuned,old]

Measured here (busy 2-CPU host, 3 alternating rounds; MB = 10^6 bytes beyond the pools), the
allocator tuning, with the pool keeping a Python object per block:

    round variant  idle   peak  after (bound)  Pss_Anon  [heap]  workload
    1     untuned  40.2   65.9   66.8 (48.0)     53.8     20.0    133 s
    1     tuned    40.5   61.1   61.1 (48.5)     47.9     10.2    108 s
    2     tuned    40.5   56.1   56.5 (48.0)     43.3      9.6    119 s
    2     untuned  40.2  106.7   77.1 (48.0)     64.0     26.1    107 s
    3     untuned  40.3   81.3   77.3 (48.7)     64.0     21.9    142 s
    3     tuned    40.5   53.6   64.0 (48.4)     40.5     10.1    151 s

("after" is read 2 s after the workload exits, while the kernel's discards may still be
emptying the pool; after swapoff the same daemons held 66.8 / 77.1 / 77.2 and 61.1 / 56.5 /
53.1 MB.)

The pool's books in flat arrays in their own mapping (tuned) against a Python object per block
(old: the same tree with the earlier cramfs/zspool.py), 2 alternating rounds (load 2.1-2.7):

    round variant  idle   peak  after (bound)  [heap]  thread arenas  other anon
    1     tuned    36.7   68.2   58.9 (48.0)    14.7        4.5          24.3
    1     old      36.5   66.6   62.9 (48.0)    13.0        2.6          31.9
    2     old      36.4   83.7   79.8 (48.0)    15.9        4.6          43.5
    2     tuned    36.8   79.2   67.4 (48.0)    16.6        6.9          28.3

(idle: heap 7, other anon 14; at that time something outside the pool left either build far
above the bound.) Later, on one tree with either pool, the soak test's three 256 MiB
single-pass workloads on one daemon (--mib 256 --passes 1 --per-daemon 3, load 1.5):

    round variant  idle   peak  after (bound)  [heap]  thread arenas  other anon
    1.1   tuned    36.8   43.1   43.2 (48.0)     8.1        1.0            9.2
    1.2   tuned    43.2   43.9   43.1 (48.0)     8.1        1.1            9.0
    1.3   tuned    43.1   43.5   43.0 (48.0)     8.1        1.2            9.1
    1.1   old      36.6   50.3   49.3 (48.0)     8.7        0.8           19.3
    1.2   old      49.3   55.2   50.7 (48.0)     9.1        0.8           20.2
    1.3   old      50.7   51.2   50.5 (48.0)     9.1        0.8           20.1

(the array books' own mapping: 2.1 MB resident after the workloads.)

Needs root, /dev/fuse, loop devices and a memory cgroup. Everything set up is undone in
``finally`` blocks (the e2e Harness): cgroups, swapoff, losetup -d, the daemons it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from e2e.helpers import (  # noqa: E402
    Daemon,
    Harness,
    MiB,
    loop_for,
    mm_stat,
    read_attr,
    run,
    swaps,
    workload_command,
)

from daemon import config as configuration  # noqa: E402

BOUND_BASE = 48_000_000  # bytes of RSS beyond the pools, plus BOUND_PER_PAGE per stored page
BOUND_PER_PAGE = 16
PAGE = 4096

# A launcher that runs cramfsd with the allocator left at glibc's defaults.
UNTUNED = ("import sys; from daemon import system; system.tune_allocator = lambda: None; "
           "from daemon.main import main; sys.exit(main())")


def kb_fields(path: str) -> dict[str, int]:
    """The ``Key:  N kB`` lines of a /proc file (status, smaps_rollup), in bytes."""
    out = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def proc_status(pid: int) -> dict[str, int]:
    return kb_fields(f"/proc/{pid}/status")


def smaps_rollup(pid: int) -> dict[str, int]:
    return kb_fields(f"/proc/{pid}/smaps_rollup")


def heap_rss(pid: int) -> int:
    """Resident bytes of the main [heap] (brk) mapping."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and not line[0].isupper():
                inside = line.rstrip().endswith("[heap]")
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


PYMALLOC_ARENAS = (256 << 10, 1 << 20)  # obmalloc's arena: 256 KiB, 1 MiB from 3.10 on 64-bit
GLIBC_HEAP = 64 << 20  # a glibc thread arena's heap: reserved whole, made readable as it grows


def anon_mappings(pid: int) -> dict[str, int]:
    """Resident anonymous bytes of the process by what holds them, told apart by their
    mappings: the main heap, mappings of exactly an obmalloc arena's size (pymalloc arenas,
    or malloc blocks of that size), glibc thread arenas (inside a 64 MiB-aligned
    reservation), and the rest (thread stacks, mmapped malloc blocks, the interpreter's and
    the pool's own maps)."""
    out = {"heap": 0, "pymalloc": 0, "thread_arenas": 0, "other_anon": 0,
           "pymalloc_count": 0}
    name, size, start = "", 0, 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not line[0].isupper():
                lo, hi = (int(x, 16) for x in head.split("-"))
                fields = line.split()
                name = fields[5] if len(fields) > 5 else ""
                size, start = hi - lo, lo
            elif line.startswith("Anonymous:") and (not name or name == "[heap]"):
                rss = int(line.split()[1]) * 1024
                if name == "[heap]":
                    out["heap"] += rss
                elif size in PYMALLOC_ARENAS:
                    out["pymalloc"] += rss
                    out["pymalloc_count"] += 1
                elif start % GLIBC_HEAP == 0 and size < GLIBC_HEAP:
                    out["thread_arenas"] += rss
                else:
                    out["other_anon"] += rss
                    key = f"other_{size >> 10}k"  # by mapping size, to tell them apart
                    out[key] = out.get(key, 0) + rss
    return out


def pool_resident(daemon: Daemon) -> int:
    return sum(int(read_attr(daemon.mountpoint, name, "pool_resident"))
               for name in daemon.devices)


def stored_pages(daemon: Daemon) -> int:
    return sum(mm_stat(daemon.mountpoint, name)["orig_data_size"] // PAGE
               for name in daemon.devices)


def sample(daemon: Daemon) -> dict[str, int]:
    """Memory of the daemon now. The pool is read through the mount, the process from /proc."""
    pool = pool_resident(daemon)
    status = proc_status(daemon.pid)
    stored = stored_pages(daemon)
    return {"vmrss": status["VmRSS"], "pool_resident": pool,
            "beyond_pool": status["VmRSS"] - pool, "pss_anon": smaps_rollup(daemon.pid)["Pss_Anon"],
            "heap": heap_rss(daemon.pid), "stored_pages": stored,
            **{f"anon_{k}": v for k, v in anon_mappings(daemon.pid).items()},
            "bound": BOUND_BASE + BOUND_PER_PAGE * stored}


class PeakSampler(threading.Thread):
    """The largest RSS beyond the pool seen while a workload runs."""

    def __init__(self, daemon: Daemon, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.target = daemon
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            try:
                now = sample(self.target)
            except (OSError, ValueError):
                continue
            if now["beyond_pool"] > self.peak.get("beyond_pool", -1):
                self.peak = now

    def stop(self) -> dict[str, int]:
        self.halt.set()
        self.join(timeout=30)
        return self.peak


def cramfs_cli(*args: str, timeout: float = 300) -> None:
    beside = Path(sys.executable).parent / "cramfs"
    cmd = [str(beside)] if beside.exists() else [sys.executable, "-m", "daemon.cli"]
    run([*cmd, *args], timeout=timeout)


def swap_round(harness: Harness, daemon: Daemon, args: argparse.Namespace,
               seed: int) -> dict[str, object]:
    """One workload through swap0; the daemon's memory before, at the peak and after."""
    idle = sample(daemon)
    cg = harness.cgroup(args.limit_mib * MiB)
    peak = PeakSampler(daemon)
    peak.start()
    started = time.monotonic()
    try:
        result = cg.run(workload_command(args.mib, seed=seed, passes=args.passes, sleep=0.2),
                        timeout=args.timeout)
    finally:
        highest = peak.stop()
        cg.remove()
        harness.cgroups.remove(cg)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"workload failed ({result.returncode}):\n{result.stderr[-3000:]}")
    time.sleep(args.settle)  # the kernel's swap discards are asynchronous
    after = sample(daemon)
    return {"idle": idle, "peak": highest, "after": after, "elapsed_s": round(elapsed, 1)}


def launcher(tmp: Path, tuned: bool, src: Path | None = None) -> str:
    """An executable that starts cramfsd, with or without the allocator tuning, from this
    checkout or from the source tree ``src``."""
    cramfsd = Path(sys.executable).parent / "cramfsd"
    if tuned and src is None and cramfsd.exists():
        return str(cramfsd)
    path = tmp / ("cramfsd-tuned" if tuned else "cramfsd-untuned")
    code = "import sys; from daemon.main import main; sys.exit(main())" if tuned else UNTUNED
    # -P: the source tree on PYTHONPATH comes before the directory the bench runs in
    env = f"env PYTHONPATH={shlex.quote(str(src))} " if src is not None else ""
    flags = "-P " if src is not None else ""
    path.write_text(f"#!/bin/sh\nexec {env}{shlex.quote(sys.executable)} {flags}-c "
                    f'{shlex.quote(code)} "$@"\n')
    path.chmod(0o755)
    return str(path)


def run_variant(label: str, tuned: bool, args: argparse.Namespace, seed: int) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix=f"cramfs-rss-{label}-"))
    harness = Harness(tmp, launcher(tmp, tuned, args.old if label == "old" else None))
    try:
        daemon = harness.start_daemon(configuration.default_text(), log_level="info",
                                      metrics_address=args.metrics_address)
        cramfs_cli("--mountpoint", str(daemon.mountpoint), "swapon", "swap0", "--priority",
                   "32767", "--force")
        loop = loop_for(daemon.data("swap0"))
        if loop is None or loop not in swaps():
            raise SystemExit("cramfs swapon swap0 did not put swap on a loop device")
        rounds = [swap_round(harness, daemon, args, seed + i) for i in range(args.per_daemon)]
        cramfs_cli("--mountpoint", str(daemon.mountpoint), "swapoff", "swap0", timeout=600)
        return {"variant": label, "rounds": rounds, "after_swapoff": sample(daemon)}
    finally:
        problems = harness.cleanup()
        if problems:
            print(f"{label} teardown problems: " + "; ".join(problems), file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


def mb(value: int) -> str:
    return f"{value / 1e6:6.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant")
    parser.add_argument("--per-daemon", type=int, default=1,
                        help="workloads run back to back on one daemon in each round")
    parser.add_argument("--mib", type=int, default=320, help="workload size (MiB)")
    parser.add_argument("--limit-mib", type=int, default=128, help="memory cgroup limit (MiB)")
    parser.add_argument("--passes", type=int, default=2, help="workload verify+rewrite passes")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds to wait after the workload before measuring")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--metrics-address", default="127.0.0.1:0",
                        help='the endpoint, on as shipped but nobody scraping ("" = off)')
    parser.add_argument("--old", type=Path, default=None,
                        help="source tree of another cramfsd: the 'old' variant")
    parser.add_argument("--only", default=None,
                        help="comma-separated variants to run (untuned, tuned, old)")
    parser.add_argument("--json", type=Path, help="also write every sample here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("rss_bench.py needs root (loop devices, swap, cgroups)")

    variants = [("untuned", False), ("tuned", True)]
    if args.old is not None:
        variants.append(("old", True))
    if args.only:
        wanted = args.only.split(",")
        variants = [v for v in variants if v[0] in wanted]
    results: list[dict[str, object]] = []
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]  # alternate who goes first
        for label, tuned in order:
            print(f"round {r + 1}: {label} ...", file=sys.stderr, flush=True)
            row = run_variant(label, tuned, args, seed=100 + r)
            row["round"] = r + 1
            results.append(row)

    print(f"\nworkload {args.mib} MiB in a {args.limit_mib} MiB memory cgroup through swap0 "
          f"(default config), {args.passes} passes; MB = 10^6 bytes")
    print(f"bound after a workload: {BOUND_BASE / 1e6:.0f} MB + {BOUND_PER_PAGE} B per stored "
          "page")
    print("round variant | idle beyond-pool | peak beyond-pool | after beyond-pool (bound) "
          "pss_anon heap | after swapoff beyond-pool | workload s")
    summary: dict[str, list[int]] = {}
    for row in results:
        for i, one in enumerate(row["rounds"]):  # type: ignore[arg-type]
            idle, peak, after = one["idle"], one["peak"], one["after"]
            print(f"{row['round']}.{i + 1:<4} {row['variant']:<7} | {mb(idle['beyond_pool'])} | "
                  f"{mb(peak.get('beyond_pool', 0))} | {mb(after['beyond_pool'])} "
                  f"({mb(after['bound'])}) {mb(after['pss_anon'])} {mb(after['heap'])} | "
                  f"{mb(row['after_swapoff']['beyond_pool'])} | {one['elapsed_s']}")
            summary.setdefault(str(row["variant"]), []).append(after["beyond_pool"])
    print("anonymous memory idle and after each workload (MB): main heap | pymalloc-arena-"
          "sized maps (count) | glibc thread arenas | other")
    for row in results:
        for i, one in enumerate(row["rounds"]):  # type: ignore[arg-type]
            for when in ("idle", "after"):
                a = one[when]
                print(f"{row['round']}.{i + 1:<4} {row['variant']:<7} {when:<5} | "
                      f"{mb(a['anon_heap'])} | {mb(a['anon_pymalloc'])} "
                      f"({a['anon_pymalloc_count']}) | {mb(a['anon_thread_arenas'])} | "
                      f"{mb(a['anon_other_anon'])}")
    for label, values in summary.items():
        median = int(statistics.median(values))
        print(f"{label}: after a workload, RSS beyond the pool: median {mb(median)} MB, "
              f"max {mb(max(values))} MB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
