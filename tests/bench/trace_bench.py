"""What recording costs the live device, and how fast a recording replays (cramfs trace/replay).

    python tests/bench/trace_bench.py [--mib 64] [--rounds 3] [--seconds 10] [--data real]

One cramfsd (as shipped, a swap device 4x the data with pool = size) behind a direct-io loop,
the same pages compare.py uses. Alternating rounds, recording off then on: dd 1 MiB writes of
the data, then fio random 4 KiB writes at iodepth 1 for --seconds. Medians, and the cost of
recording against the targets (at most 15% of 4 KiB write throughput, 25% at 1 MiB). Then the
speed of a replay of the last recorded round's trace against the live path on the same trace:
pages per second the device saw live (the dd and fio requests, pages written and read, over
their wall time) and pages per second `cramfs replay` gets through (its own figure; target:
at least 5x), the replay run --replays times (median and range), with the load average.
``--replay-only TRACE`` replays a trace kept with ``--keep-trace`` against the live figure kept
beside it (no root needed).

Needs root, /dev/fuse, loop devices, dd and fio. Undoes everything it set up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402

MiB = compare.MiB
PAGE = compare.PAGE


def trace_control(mountpoint: Path, command: str) -> None:
    (mountpoint / "swap0" / "trace").write_text(command)


def one_round(target: compare.Target, datafile: Path, nbytes: int, seconds: float,
              mountpoint: Path, trace: Path | None) -> dict:
    """dd 1 MiB writes, then fio 4 KiB writes; with ``trace``, recorded."""
    if trace is not None:
        trace_control(mountpoint, f"start {trace}")
    started = time.perf_counter()
    try:
        seq = compare.dd(str(datafile), target.device, nbytes, "oflag=direct")
        rand = compare.fio(target.device, "randwrite", 1, seconds, nbytes, 60)
    finally:
        if trace is not None:
            trace_control(mountpoint, "stop")
    wall = time.perf_counter() - started
    pages = nbytes // PAGE + rand["io_bytes"] // PAGE
    return {"seq_write_mbs": seq, "rand_write_mbs": rand["mbs"], "pages": pages,
            "live_pages_per_s": pages / wall}


def replay_speed(trace: Path, times: int) -> list[float]:
    """Pages per second of ``cramfs replay TRACE`` (one variant, as recorded), ``times`` runs."""
    speeds = []
    for _ in range(times):
        done = subprocess.run([sys.executable, "-m", "daemon.cli", "replay", str(trace),
                               "--json"], capture_output=True, text=True, timeout=1200,
                              cwd=HERE.parent.parent)
        if done.returncode:
            raise SystemExit(f"replay failed: {done.stderr}")
        speeds.append(json.loads(done.stdout)["variants"][0]["pages_per_second"])
        compare.say(f"replay: {speeds[-1]:.0f} pages/s (load {compare.loadavg()[0]:.2f})")
    return speeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--replays", type=int, default=3)
    parser.add_argument("--data", choices=("real", "synthetic"), default="real")
    parser.add_argument("--keep-trace", type=Path, metavar="PATH",
                        help="copy the last recorded round's trace here, with its live "
                             "pages/s in PATH.json, for profiling replay without root")
    parser.add_argument("--replay-only", type=Path, metavar="TRACE",
                        help="only replay a trace kept with --keep-trace")
    args = parser.parse_args(argv)
    if args.replay_only is not None:
        kept = json.loads(args.replay_only.with_suffix(".json").read_text())
        load = compare.loadavg()
        speeds = replay_speed(args.replay_only, args.replays)
        print_speed(kept["live_pages_per_s"], speeds, load, compare.loadavg())
        return 0
    nbytes = args.mib * MiB
    cramfsd = str(Path(sys.executable).parent / "cramfsd")
    data, _ = compare.make_data(args.data, nbytes)
    results: dict[bool, list[dict]] = {False: [], True: []}
    load_start = compare.loadavg()
    with tempfile.TemporaryDirectory(prefix="cramfs-trace-bench-") as tmp_name:
        tmp = Path(tmp_name)
        datafile = tmp / "data.bin"
        datafile.write_bytes(data)
        td = compare.Teardown()
        try:
            target = compare.setup_cramfs(tmp, 4 * args.mib, td, cramfsd,
                                          compare.DEFAULT_LEVEL)
            mountpoint = tmp / "cramfs" / "mnt"
            last_trace = tmp / "round.trace"
            for index in range(args.rounds):
                for recording in (False, True):
                    result = one_round(target, datafile, nbytes, args.seconds, mountpoint,
                                       last_trace if recording else None)
                    result["load"] = compare.loadavg()[0]
                    results[recording].append(result)
                    compare.say(f"round {index + 1} recording={recording}: {result}")
            trace_bytes = last_trace.stat().st_size
            if args.keep_trace is not None:
                shutil.copyfile(last_trace, args.keep_trace)
                args.keep_trace.with_suffix(".json").write_text(json.dumps(
                    {"live_pages_per_s": results[True][-1]["live_pages_per_s"],
                     "pages": results[True][-1]["pages"]}))
            load_replay = compare.loadavg()
            speeds = replay_speed(last_trace, args.replays)
        finally:
            td.close()
    report(results, trace_bytes, load_start)
    print_speed(results[True][-1]["live_pages_per_s"], speeds, load_replay, compare.loadavg())
    return 0


def report(results: dict[bool, list[dict]], trace_bytes: int, load: list[float]) -> None:
    def median(recording: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[recording])

    def spread(recording: bool, key: str) -> str:
        return ", ".join(f"{r[key]:.1f}" for r in results[recording])

    print(f"\nload average at the start {load[0]:.2f}; per round (off/on): "
          + ", ".join(f"{off['load']:.2f}/{on['load']:.2f}"
                      for off, on in zip(results[False], results[True], strict=True)))
    print("\n| | recording off | recording on | cost | target |")
    print("|---|---|---|---|---|")
    for key, label, limit in (("seq_write_mbs", "1 MiB writes (MB/s)", 25),
                              ("rand_write_mbs", "4 KiB writes QD1 (MB/s)", 15)):
        off, on = median(False, key), median(True, key)
        cost = (off - on) / off * 100
        verdict = "PASS" if cost <= limit else "MISS"
        print(f"| {label} | {off:.1f} ({spread(False, key)}) | {on:.1f} ({spread(True, key)}) "
              f"| {cost:.1f}% | <= {limit}%: {verdict} |")
    print(f"\ntrace of the last round: {trace_bytes / MiB:.1f} MiB for "
          f"{results[True][-1]['pages'] * PAGE / MiB:.0f} MiB written")


def print_speed(live: float, speeds: list[float], load_start: list[float],
                load_end: list[float]) -> None:
    speed = statistics.median(speeds)
    verdict = "PASS" if speed >= 5 * live else "MISS"
    print(f"\n| pages/s | live (recorded round) | replay, median of {len(speeds)} (range) | "
          f"ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| as recorded | {live:.0f} | {speed:.0f} ({min(speeds):.0f}-{max(speeds):.0f}) | "
          f"{speed / live:.1f}x | >= 5x: {verdict} |")
    print(f"load average during the replays: {load_start[0]:.2f} -> {load_end[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
