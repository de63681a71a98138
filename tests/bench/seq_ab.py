"""1 MiB sequential through FUSE: cramfsd builds side by side with zstd alone.

    python tests/bench/seq_ab.py [--mib 64] [--rounds 5] [--old SRC] [--profile DIR]
                                 [--compressor NAME] [--pages FILE]

Mounts cramfsd as shipped (this checkout) and, with ``--old SRC``, the cramfsd of another
source tree (e.g. ``git archive <commit> | tar -x -C SRC``) with the same config, each behind
``losetup --direct-io=on``, and in every round runs, one after the other: zstd alone on the
same pages (zstd_ceiling.py, all CPUs), then dd 1 MiB write and read on each daemon in turn
(every read compared with the data by cmp). Medians of the rounds, and each figure as a
fraction of zstd alone measured in the same rounds, so a noisy neighbour hits every column
alike. ``--profile DIR`` samples each daemon with py-spy during one extra write and read pass
and prints where each millisecond per MiB goes (self time by function, all threads).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import compare as c  # noqa: E402
import zstd_ceiling  # noqa: E402

from tests.e2e import helpers as h  # noqa: E402

MiB = 1 << 20
MB = 1e6
EXTRA_ENV: dict[str, dict[str, str]] = {}  # daemon name -> environment added (--env)


def config_text(mnt: Path, size_mib: int, compressor: str, level: int | None) -> str:
    level_line = "" if level is None else f"level = {level}\n"
    return (f'mountpoint = "{mnt}"\nmetrics_address = ""\n\n[device.swap0]\nkind = "swap"\n'
            f'size = "{size_mib}M"\npool = "{size_mib}M"\ncompressor = "{compressor}"\n'
            f"{level_line}")


def start_daemon(name: str, src: Path | None, tmp: Path, size_mib: int, compressor: str,
                 level: int | None, td: c.Teardown) -> tuple[str, int]:
    """cramfsd from ``src`` (None: this checkout); returns (loop device, pid)."""
    base = tmp / name
    mnt = base / "mnt"
    mnt.mkdir(parents=True)
    config = base / "cramfs.toml"
    config.write_text(config_text(mnt, size_mib, compressor, level))
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    env.update(EXTRA_ENV.get(name, {}))
    log = base / "cramfsd.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", "from daemon.main import main; main()",
                                 "--config", str(config), "--log-level", "warning"],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                                cwd="/")
    td.push(f"stop {name}", lambda: c.stop_pid(proc, name))
    td.push(f"unmount {mnt}", lambda: h.unmount(mnt))
    data = mnt / "swap0" / "data"
    c.wait_for(lambda: h.is_mounted(mnt) and data.exists(), 30, name, proc, log)
    dev = h.attach_loop(data, direct_io=True)
    td.push(f"losetup -d {dev}", lambda: c.detach_if_attached(dev))
    return dev, proc.pid


def verify(datafile: Path, dev: str, nbytes: int) -> bool:
    return c.run(["cmp", "-n", str(nbytes), str(datafile), dev], timeout=120,
                 check=False).returncode == 0


def profile(pid: int, dev: str, datafile: Path, nbytes: int, out: Path, passes: int) -> dict:
    """py-spy over one daemon during ``passes`` dd writes then as many reads."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    result = {}
    for way in ("write", "read"):
        raw = out / f"seq-{pid}-{way}.txt"
        rate = 1000
        spy = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--rate", str(rate),
                                "--threads", "--nonblocking", "--format", "raw", "-o", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        start = time.perf_counter()
        for _ in range(passes):
            if way == "write":
                c.dd(str(datafile), dev, nbytes, "oflag=direct")
            else:
                c.dd(dev, "/dev/null", nbytes, "iflag=direct")
        elapsed = time.perf_counter() - start
        time.sleep(0.3)
        spy.send_signal(2)  # py-spy writes its file on SIGINT
        spy.wait(timeout=60)
        mib = passes * nbytes / MiB
        result[way] = summarise(raw, rate, mib) | {"wall_ms_per_mib": 1e3 * elapsed / mib}
    return result


def summarise(path: Path, rate: int, mib: float, top: int = 14) -> dict:
    """ms per MiB of samples by thread and by leaf function (py-spy raw = collapsed stacks)."""
    self_c: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    if not path.exists():
        return {"error": "no profile written"}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        threads[frames[0].split(" ")[0] + " " + frames[0].split("\"")[1]
                if '"' in frames[0] else frames[0]] += int(count)
        self_c[frames[-1]] += int(count)
    per = 1e3 / rate / mib
    return {"threads": [(k, round(v * per, 3)) for k, v in threads.most_common(6)],
            "self": [(k, round(v * per, 3)) for k, v in self_c.most_common(top)],
            "total_ms_per_mib": round(sum(self_c.values()) * per, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--old", type=Path, default=None, help="source tree of the other cramfsd")
    ap.add_argument("--compressor", default="zstd")
    ap.add_argument("--level", type=int, default=None)
    ap.add_argument("--pages", type=Path, default=None,
                    help="reuse (or first save) the gathered pages in this file")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    ap.add_argument("--env", action="append", default=[], metavar="NAME:KEY=VALUE",
                    help="extra environment for one daemon (new or old), e.g. "
                    "new:MALLOC_TRIM_THRESHOLD_=67108864")
    args = ap.parse_args(argv)
    for item in args.env:
        name, _, pair = item.partition(":")
        key, _, value = pair.partition("=")
        EXTRA_ENV.setdefault(name, {})[key] = value
    if os.geteuid() != 0:
        raise SystemExit("seq_ab.py needs root (loop devices)")
    nbytes = args.mib * MiB
    if args.pages is not None and args.pages.exists() and args.pages.stat().st_size >= nbytes:
        data = args.pages.read_bytes()[:nbytes]
    else:
        data, _ = c.make_data("real", nbytes)
        if args.pages is not None:
            args.pages.write_bytes(data)
    level = args.level if args.level is not None else (
        c.DEFAULT_LEVEL if args.compressor == "zstd" else None)
    names = ["new"] + (["old"] if args.old else [])
    tmp = Path(tempfile.mkdtemp(prefix="cramfs-seqab-"))
    td = c.Teardown()
    res: dict[str, dict[str, list[float]]] = {n: {"write": [], "read": []} for n in names}
    ceil: dict[str, list[float]] = {"compress": [], "decompress": []}
    profiles = {}
    ok = True
    try:
        datafile = tmp / "pages.bin"
        datafile.write_bytes(data)
        devs = {}
        for name in names:
            src = None if name == "new" else args.old
            devs[name] = start_daemon(name, src, tmp, 4 * args.mib, args.compressor, level, td)
        for round_no in range(args.rounds):
            if args.compressor == "zstd":
                z = zstd_ceiling.ceiling(data, level, repeat=1)
                ceil["compress"].append(z["compress_mbs"])
                ceil["decompress"].append(z["decompress_mbs"])
            order = names if round_no % 2 == 0 else names[::-1]
            for name in order:
                dev = devs[name][0]
                res[name]["write"].append(c.dd(str(datafile), dev, nbytes, "oflag=direct"))
                res[name]["read"].append(c.dd(dev, "/dev/null", nbytes, "iflag=direct"))
                if not verify(datafile, dev, nbytes):
                    ok = False
                    c.say(f"{name}: READ-BACK MISMATCH")
            c.say(f"round {round_no + 1}/{args.rounds}: " + ", ".join(
                f"{n} {res[n]['write'][-1]:.0f}/{res[n]['read'][-1]:.0f}" for n in names))
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for name in names:
                dev, pid = devs[name]
                profiles[name] = profile(pid, dev, datafile, nbytes, args.profile, 3)
    finally:
        td.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.mib} MiB of real pages, {args.compressor} level {level}, "
          f"{os.cpu_count()} CPUs, median of {args.rounds} alternating rounds")
    zc = statistics.median(ceil["compress"]) if ceil["compress"] else None
    zd = statistics.median(ceil["decompress"]) if ceil["decompress"] else None
    if zc:
        print(f"zstd alone, all CPUs: compress {zc:.0f} MB/s, decompress {zd:.0f} MB/s")
    for name in names:
        w = statistics.median(res[name]["write"])
        r = statistics.median(res[name]["read"])
        rel = f"  ({w / zc:.2f}x / {r / zd:.2f}x of zstd alone)" if zc else ""
        print(f"cramfsd {name:<4} write {w:6.0f} MB/s  read {r:6.0f} MB/s{rel}")
    for name, prof in profiles.items():
        for way, p in prof.items():
            print(f"\npy-spy {name} {way}: wall {p.get('wall_ms_per_mib', 0):.3f} ms/MiB, "
                  f"sampled {p.get('total_ms_per_mib')} ms/MiB (Python-visible, all threads)")
            for k, v in p.get("threads", []):
                print(f"   thread {k}: {v} ms/MiB")
            for k, v in p.get("self", []):
                print(f"   {v:7.3f}  {k}")
    print("verified: " + ("all reads matched" if ok else "MISMATCH"))
    return 0 if ok and not td.problems else 1


if __name__ == "__main__":
    sys.exit(main())
