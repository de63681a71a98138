"""Side-by-side benchmark: cramfs vs nbdkit+nbdfuse vs kernel zram, same data, one run.

    python tests/bench/compare.py [--mib 64] [--out tests/bench/out] [--quick]
                                  [--data real|synthetic] [--level N] [--no-metrics] [--profile]
                                  [--skip NAME ...]

Three block devices holding the same pages (real process memory dumped from running processes,
or a synthetic mix), one after the other, each set up, measured and torn down before the next:

  cramfs   cramfsd with a temporary config (one ``swap`` device, size 4x the data, pool = size,
           the default zstd level, the metrics endpoint on as shipped but nobody scraping),
           ``losetup --find --show --direct-io=on <mnt>/swap0/data``;
  nbdkit   ``nbdkit -f -U SOCK memory size=... allocator=zstd`` exported by
           ``nbdfuse DIR --unix SOCK``, then ``losetup --direct-io=on DIR/nbd`` (the C userspace
           peer on the same FUSE + loop path; skipped with a message when not installed);
  zram     /sys/block/zram0: reset, disksize, /dev/zram0 used directly (refused when zram0 is
           swap, mounted, held, or already sized by someone else); reset afterwards.

Measured on each: dd 1 MiB sequential write then read (oflag/iflag=direct) of the data file,
read-back verified with cmp; fio random 4 KiB read and write at iodepth 1 and 32 (libaio,
direct=1, time-bounded, on the data pre-filled by dd; fio write buffers compress like the data);
a loop-swap workload (tests/e2e/workload.py, every page verified) in a ``cramfs-bench-*`` memory
cgroup half its size, elapsed; memory used and compression ratio (cramfs and zram: mm_stat
mem_used_total; nbdkit: growth of its RSS); process RSS; CPU seconds per GiB moved (cramfsd, and
nbdkit+nbdfuse together) from /proc/PID/stat. Also, on the same pages and at cramfs's level, zstd
alone in C on all CPUs (zstd_ceiling.py): no FUSE, no pool, no Python per page. That is the most
any cramfs sequential figure can reach here; a target above it is marked so.

Prints a table (rows = metrics; columns cramfs / nbdkit+nbdfuse / zram, cramfs÷nbdkit,
cramfs÷zram) and PASS/MISS per target (the project's speed and memory aims against the two
peers), writes ``compare.json`` and (with matplotlib: ``pip install .[bench]``)
``compare.png`` into --out. ``--profile`` also samples cramfsd with
py-spy during an extra 4 KiB QD1 random-write run and prints its hottest frames.

Needs root, /dev/fuse, loop devices, a memory cgroup controller, dd, fio, cmp. Installs nothing.
Everything set up is undone in ``finally`` blocks: swapoff, losetup -d, unmount, stop the
processes it started (by pid), remove cgroups, reset zram.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import pages as pagesrc  # noqa: E402
import zstd_ceiling  # noqa: E402

from daemon.config import DEFAULT_LEVEL  # noqa: E402
from tests.e2e import helpers as h  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
MB = 1e6
CLK_TCK = os.sysconf("SC_CLK_TCK")
ZRAM = Path("/sys/block/zram0")
NAMES = ("cramfs", "nbdkit", "zram")
TITLES = {"cramfs": "cramfs", "nbdkit": "nbdkit+nbdfuse", "zram": "zram"}
SWAP_PRIORITY = 32767  # above any other swap on the machine, so the workload uses ours


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f}s: {' '.join(cmd)}") from None
    if check and proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr.strip()}")
    return proc


# -- /proc readings -------------------------------------------------------------------------
def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.startswith(("Vm", "Rss")):
                out[key] = int(value.split()[0]) * 1024
    return out


def rss(pids: list[int]) -> int:
    return sum(proc_status(p).get("VmRSS", 0) for p in pids)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# -- teardown stack -------------------------------------------------------------------------
class Teardown:
    """Undo steps run newest first; each step runs even if an earlier one failed."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []
        self.problems: list[str] = []

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self.steps.append((what, fn))

    def close(self) -> None:
        while self.steps:
            what, fn = self.steps.pop()
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - teardown must go on
                self.problems.append(f"{what}: {exc}")
                say(f"teardown: {what}: {exc}")


def stop_pid(proc: subprocess.Popen, name: str, timeout: float = 30) -> None:
    """SIGTERM the process we started; SIGKILL that same pid if it ignores it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        say(f"{name} pid {proc.pid} ignored SIGTERM for {timeout}s; SIGKILL")
        proc.kill()
        proc.wait(timeout=30)


def swapoff_if_on(dev: str) -> None:
    if dev in h.swaps():
        run(["swapoff", dev], timeout=300)


def detach_if_attached(dev: str) -> None:
    if dev in h.loop_devices():
        h.detach_loop(dev)


def wait_for(cond: Callable[[], bool], timeout: float, what: str,
             alive: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if alive is not None and alive.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {alive.returncode}\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout}s")
        time.sleep(0.05)


# -- targets --------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    device: str = ""                 # what dd/fio/mkswap use
    pids: list[int] = field(default_factory=list)   # processes whose CPU/RSS we read
    notes: list[str] = field(default_factory=list)
    mm_stat: Callable[[], dict[str, int]] | None = None
    loop: str | None = None
    pool_pid: int | None = None      # cramfsd: RSS beyond the pool is measured for it


def free_port() -> int:
    """A TCP port on 127.0.0.1 free a moment ago (cramfsd's config wants a real port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def setup_cramfs(tmp: Path, size_mib: int, td: Teardown, cramfsd: str, level: int | None,
                 metrics: bool = True, compressor: str = "zstd") -> Target:
    """cramfsd as shipped: its metrics endpoint on (a free port on 127.0.0.1, nobody
    scraping) unless ``metrics`` is False; ``compressor`` at ``level`` (None: its default)."""
    base = tmp / "cramfs"
    mnt = base / "mnt"
    mnt.mkdir(parents=True)
    config = base / "cramfs.toml"
    address = f"127.0.0.1:{free_port()}" if metrics else ""
    device = h.swap_config(f"{size_mib}M", f"{size_mib}M", level=level or DEFAULT_LEVEL)
    device = device.replace('compressor = "zstd"', f'compressor = "{compressor}"')
    if level is None:
        device = re.sub(r"(?m)^level = .*\n", "", device)
    config.write_text(f'mountpoint = "{mnt}"\nmetrics_address = "{address}"\n' + device)
    errlog = base / "cramfsd.log"
    with open(errlog, "wb") as err:
        proc = subprocess.Popen([cramfsd, "--config", str(config), "--mountpoint", str(mnt),
                                 "--metrics-address", address, "--log-level", "warning"],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    td.push("stop cramfsd", lambda: stop_pid(proc, "cramfsd"))
    td.push(f"unmount {mnt}", lambda: h.unmount(mnt))
    data = mnt / "swap0" / "data"
    wait_for(lambda: h.is_mounted(mnt) and data.exists(), 30, "cramfsd", proc, errlog)
    dev = h.attach_loop(data, direct_io=True)
    td.push(f"losetup -d {dev}", lambda: detach_if_attached(dev))
    td.push(f"swapoff {dev}", lambda: swapoff_if_on(dev))
    t = Target("cramfs", dev, [proc.pid], loop=dev, pool_pid=proc.pid,
               mm_stat=lambda: h.mm_stat(mnt, "swap0"))
    if not h.loop_direct_io(dev):
        t.notes.append("loop direct-io did not take effect")
    return t


def setup_nbdkit(tmp: Path, size_mib: int, td: Teardown) -> Target:
    base = tmp / "nbd"
    mnt = base / "mnt"
    mnt.mkdir(parents=True)
    sock = base / "nbdkit.sock"
    klog = base / "nbdkit.log"
    with open(klog, "wb") as err:
        kit = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock),
                                "memory", f"size={size_mib}M", "allocator=zstd"],
                               stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    td.push("stop nbdkit", lambda: stop_pid(kit, "nbdkit"))
    wait_for(sock.exists, 30, "nbdkit", kit, klog)
    flog = base / "nbdfuse.log"
    with open(flog, "wb") as err:
        fuse = subprocess.Popen(["nbdfuse", str(mnt), "--unix", str(sock)],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)

    def stop_fuse() -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            fuse.wait(timeout=15)  # exits by itself once unmounted
        stop_pid(fuse, "nbdfuse")

    td.push("stop nbdfuse", stop_fuse)
    td.push(f"unmount {mnt}", lambda: h.unmount(mnt))
    data = mnt / "nbd"
    wait_for(lambda: h.is_mounted(mnt) and data.exists(), 30, "nbdfuse", fuse, flog)
    dev = h.attach_loop(data, direct_io=True)
    td.push(f"losetup -d {dev}", lambda: detach_if_attached(dev))
    td.push(f"swapoff {dev}", lambda: swapoff_if_on(dev))
    t = Target("nbdkit", dev, [kit.pid, fuse.pid], loop=dev)
    if not h.loop_direct_io(dev):
        t.notes.append("loop direct-io did not take effect")
    return t


def zram_busy() -> str | None:
    if not ZRAM.exists():
        return "no /sys/block/zram0 (kernel without zram)"
    if "/dev/zram0" in h.swaps():
        return "zram0 is in use as swap"
    if re.search(r"^/dev/zram0\s", Path("/proc/mounts").read_text(), re.M):
        return "zram0 is mounted"
    if any((ZRAM / "holders").iterdir()):
        return "zram0 has holders"
    if int((ZRAM / "disksize").read_text()) != 0:
        return "zram0 is already initialised (disksize != 0): someone else is using it"
    return None


def zram_reset() -> None:
    for _ in range(50):
        try:
            (ZRAM / "reset").write_text("1")
            return
        except OSError:  # EBUSY while something still holds it open
            time.sleep(0.2)
    (ZRAM / "reset").write_text("1")


def setup_zram(size_mib: int, td: Teardown, algorithm: str | None = None) -> Target:
    """zram0 of ``size_mib``; with ``algorithm``, that compressor (set before disksize, as
    zram requires; the kernel's default otherwise)."""
    zram_reset()
    td.push("reset zram0", zram_reset)
    if algorithm is not None:
        (ZRAM / "comp_algorithm").write_text(algorithm)
    (ZRAM / "disksize").write_text(str(size_mib * MiB))
    td.push("swapoff /dev/zram0", lambda: swapoff_if_on("/dev/zram0"))
    algo = next((a.strip("[]") for a in (ZRAM / "comp_algorithm").read_text().split()
                 if a.startswith("[")), "?")

    def mm() -> dict[str, int]:
        return h.parse_fields((ZRAM / "mm_stat").read_text(), h.MM_STAT_FIELDS)

    return Target("zram", "/dev/zram0", [], notes=[f"zram algorithm {algo}"], mm_stat=mm)


# -- measurements ---------------------------------------------------------------------------
def dd(src: str, dst: str, nbytes: int, direct: str) -> float:
    """Copy nbytes with 1 MiB blocks; return MB/s."""
    count = nbytes // MiB
    start = time.perf_counter()
    run(["dd", f"if={src}", f"of={dst}", "bs=1M", f"count={count}", direct, "status=none"],
        timeout=180)
    return count * MiB / (time.perf_counter() - start) / MB


def fio(dev: str, rw: str, depth: int, seconds: float, size: int, compress_pct: int) -> dict:
    cmd = ["fio", "--name=bench", f"--filename={dev}", f"--rw={rw}", "--bs=4k", "--direct=1",
           "--ioengine=libaio", f"--iodepth={depth}", f"--size={size}", "--time_based",
           f"--runtime={seconds}", "--ramp_time=0", "--norandommap", "--randrepeat=1",
           "--output-format=json", "--refill_buffers", "--lat_percentiles=1",
           f"--buffer_compress_percentage={compress_pct}", "--buffer_compress_chunk=4096"]
    proc = run(cmd, timeout=seconds + 90)
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    side = job["read" if rw == "randread" else "write"]
    pct = side.get("lat_ns", {}).get("percentile", {})
    return {"mbs": side["bw_bytes"] / MB, "iops": side["iops"], "io_bytes": side["io_bytes"],
            "lat_mean_us": side.get("lat_ns", {}).get("mean", 0) / 1e3,
            "lat_p99_us": pct.get("99.000000", 0) / 1e3}


class Phase:
    """CPU seconds of the target's processes over a block, with the bytes it moved."""

    def __init__(self, target: Target, cpu: dict, name: str) -> None:
        self.target, self.cpu, self.name = target, cpu, name
        self.bytes = 0

    def __enter__(self) -> Phase:
        self.c0 = cpu_seconds(self.target.pids)
        return self

    def __exit__(self, *exc) -> None:
        used = cpu_seconds(self.target.pids) - self.c0
        entry = self.cpu.setdefault(self.name, {"cpu_s": 0.0, "bytes": 0})
        entry["cpu_s"] += used
        entry["bytes"] += self.bytes


def memory_sample(t: Target, r: dict, label: str, baseline_rss: int) -> None:
    s: dict = {"rss": rss(t.pids), "rss_by_pid": {p: rss([p]) for p in t.pids}}
    if t.mm_stat is not None:
        mm = t.mm_stat()
        s["mm_stat"] = mm
        s["mem_used_total"] = mm["mem_used_total"]
        s["orig_data_size"] = mm["orig_data_size"]
    else:
        s["mem_used_total"] = max(0, s["rss"] - baseline_rss)  # nbdkit: what its RSS grew by
    if t.pool_pid:
        st = proc_status(t.pool_pid)
        s["status"] = {k: st.get(k, 0) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile",
                                                 "RssShmem")}
        # conservative: every resident byte that is not pool data in use counts as overhead
        s["rss_beyond_pool"] = st.get("VmRSS", 0) - s["mem_used_total"]
    r["memory"][label] = s


def block_bytes(dev: str) -> tuple[int, int]:
    """(bytes read, bytes written) through a block device so far, from /sys/block/X/stat."""
    fields = Path(f"/sys/block/{Path(dev).name}/stat").read_text().split()
    return int(fields[2]) * 512, int(fields[6]) * 512


def swap_cgroup_limit(mib: int) -> int:
    """Half the workload's pages plus room for the interpreter, so it swaps but is not killed."""
    return (mib // 2 + 16) * MiB


class SwapSampler(threading.Thread):
    """Largest used KiB per active swap device while the workload runs (other swaps at the same
    priority share the pages round-robin; this shows how much went where)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.max_used: dict[str, int] = {}
        self.priority: dict[str, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for dev, e in h.swaps().items():
                self.max_used[dev] = max(self.max_used.get(dev, 0), e.used_kib)
                self.priority[dev] = e.priority
            self.halt.wait(0.2)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)


def settle_after_exit(t: Target, timeout: float = 10.0) -> None:
    """Give the kernel's asynchronous swap discards a moment after the workload has exited:
    wait until the pool stops shrinking (or ``timeout``)."""
    if t.mm_stat is None:
        return
    last, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        used = t.mm_stat()["mem_used_total"]
        if used == last:
            return
        last = used
        time.sleep(1.0)


def swap_workload(t: Target, r: dict, mib: int, passes: int, timeout: float, cpu: dict,
                  baseline_rss: int, rival_wait: float) -> None:
    dev = t.device
    cg = None
    deadline = time.monotonic() + rival_wait
    while (rivals := [d for d, e in h.swaps().items() if e.priority >= SWAP_PRIORITY]) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    if rivals:
        say(f"{t.name}: other swaps at priority {SWAP_PRIORITY} ({', '.join(rivals)}) will "
            "share the workload's pages; its elapsed time is not comparable")
    try:
        run(["mkswap", dev], timeout=60)
        # --discard (once and pages): the earlier phases' data leaves the device at swapon,
        # and freed slots leave the pool as `cramfs swapon` arranges (zram hears of them
        # anyway, through its slot-free notify), so "pool after the workload exits" compares
        run(["swapon", "--discard", "--priority", str(SWAP_PRIORITY), dev], timeout=60)
        cg = h.MemCgroup(f"bench-{os.getpid()}-{t.name}", swap_cgroup_limit(mib))
        cmd = h.workload_command(mib, passes=passes, sleep=0.2, python=sys.executable)
        sampler = SwapSampler()
        sampler.start()
        try:
            with Phase(t, cpu, "swap") as ph:
                rd0, wr0 = block_bytes(dev)
                start = time.perf_counter()
                proc = cg.run(cmd, timeout=timeout)
                elapsed = time.perf_counter() - start
                rd1, wr1 = block_bytes(dev)
                ph.bytes = rd1 - rd0 + wr1 - wr0
        finally:
            sampler.stop()
        rivals = {d: kib for d, kib in sampler.max_used.items()
                  if d != dev and sampler.priority.get(d, -1) >= SWAP_PRIORITY and kib}
        r["swap_shared"] = bool(rivals)
        if rivals:
            t.notes.append("swap workload NOT COMPARABLE, pages shared with other swaps at "
                           "the same priority: "
                           + ", ".join(f"{d} {kib // 1024} MiB" for d, kib in rivals.items()))
        memory_sample(t, r, "after_swap", baseline_rss)
        settle_after_exit(t)
        memory_sample(t, r, "after_exit", baseline_rss)
        summary = {}
        with contextlib.suppress(ValueError, IndexError):
            summary = json.loads(proc.stdout.strip().splitlines()[-1])
        vmstat = cg.stat()
        r["swap"] = {"elapsed_s": elapsed, "workload_mib": mib,
                     "cgroup_limit_mib": swap_cgroup_limit(mib) // MiB,
                     "exit": proc.returncode, "bad_pages": summary.get("bad_pages"),
                     "workload_elapsed_s": summary.get("elapsed"),
                     "timings": summary.get("timings"), "oom_kills": cg.oom_kills(),
                     "swap_max_used_kib": sampler.max_used.get(dev),
                     "other_swaps_max_used_kib": {d: k for d, k in sampler.max_used.items()
                                                  if d != dev},
                     "cgroup_swap": vmstat.get("swap", vmstat.get("total_swap")),
                     "swap_in_bytes": rd1 - rd0, "swap_out_bytes": wr1 - wr0}
        if proc.returncode != 0:
            r["swap"]["error"] = (proc.stderr or "")[-1500:]
            t.notes.append(f"swap workload exit {proc.returncode}")
    finally:
        # kill the workload first (nothing left to page back in), then swapoff, then the cgroup
        if cg is not None:
            with contextlib.suppress(Exception):
                cg.kill()
        swapoff_if_on(dev)
        if cg is not None:
            cg.remove()


def measure(t: Target, datafile: Path, nbytes: int, args, compress_pct: int, out: Path) -> dict:
    r: dict = {"device": t.device, "notes": t.notes, "memory": {}, "fio": {}}
    cpu: dict = {}
    r["cpu"] = cpu
    baseline_rss = rss(t.pids)
    r["baseline_rss"] = baseline_rss
    if t.loop:
        r["loop_direct_io"] = h.loop_direct_io(t.loop)

    writes, reads = [], []
    for _ in range(args.reps):
        with Phase(t, cpu, "seq_write") as ph:
            writes.append(dd(str(datafile), t.device, nbytes, "oflag=direct"))
            ph.bytes = nbytes
    memory_sample(t, r, "after_write", baseline_rss)
    for _ in range(args.reps):
        with Phase(t, cpu, "seq_read") as ph:
            reads.append(dd(t.device, "/dev/null", nbytes, "iflag=direct"))
            ph.bytes = nbytes
    r["seq_write_mbs"], r["seq_read_mbs"] = max(writes), max(reads)
    r["seq_write_all"], r["seq_read_all"] = writes, reads
    cmp = run(["cmp", "-n", str(nbytes), str(datafile), t.device], timeout=120, check=False)
    r["verified"] = cmp.returncode == 0
    if not r["verified"]:
        t.notes.append(f"READ-BACK MISMATCH: {cmp.stdout.strip() or cmp.stderr.strip()}")
    say(f"{t.name}: seq write {r['seq_write_mbs']:.0f} MB/s, read {r['seq_read_mbs']:.0f} MB/s"
        f", verified={r['verified']}")

    for rw in ("randread", "randwrite"):
        for depth in (1, 32):
            with Phase(t, cpu, "rand_4k") as ph:
                res = fio(t.device, rw, depth, args.fio_seconds, nbytes, compress_pct)
                ph.bytes = res["io_bytes"]
            r["fio"][f"{rw}_qd{depth}"] = res
            say(f"{t.name}: {rw} 4k qd{depth}: {res['mbs']:.1f} MB/s, {res['iops']:.0f} IOPS, "
                f"p99 {res['lat_p99_us']:.0f} us")
    memory_sample(t, r, "after_fio", baseline_rss)

    if args.profile and t.name == "cramfs":
        r["profile"] = profile_cramfs(t, args, nbytes, compress_pct, out)

    try:
        swap_workload(t, r, args.swap_mib, args.swap_passes, args.swap_timeout, cpu,
                      baseline_rss, 10 if args.quick else 30)
        say(f"{t.name}: swap workload {r['swap']['elapsed_s']:.1f} s "
            f"(exit {r['swap']['exit']}, bad pages {r['swap']['bad_pages']})")
    except Exception as exc:  # noqa: BLE001 - report and go on to the next target
        r["swap"] = {"error": str(exc)[-1500:]}
        t.notes.append(f"swap workload failed: {str(exc).splitlines()[0]}")
        say(f"{t.name}: swap workload failed: {exc}")
    return r


def profile_cramfs(t: Target, args, nbytes: int, compress_pct: int, out: Path) -> dict:
    """py-spy over cramfsd during an extra 4 KiB QD1 random-write run (not in the table)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        return {"error": "py-spy not found (pip install py-spy)"}
    pid = t.pids[0]
    seconds = max(3, int(args.fio_seconds))
    result: dict = {}
    for rw, depth in (("randwrite", 1), ("write", 32)):
        label = f"{rw}-qd{depth}"
        raw = out / f"cramfs-profile-{label}.txt"
        spy = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(seconds),
                                "--rate", "250", "--threads", "--nonblocking", "--format", "raw",
                                "-o", str(raw)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.5)
            if rw == "write":  # sequential 4 KiB at depth: the per-request cost without seeks
                fio(t.device, "write", depth, seconds, nbytes, compress_pct)
            else:
                fio(t.device, rw, depth, seconds, nbytes, compress_pct)
            _, err = spy.communicate(timeout=seconds + 60)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait(timeout=30)
        result[label] = summarise_profile(raw) if raw.exists() else {"error": err[-500:]}
    return result


def summarise_profile(path: Path, top: int = 15) -> dict:
    """Self and inclusive sample shares from py-spy's collapsed stacks."""
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0]] += n
        self_c[frames[-1]] += n
        for fr in set(frames[1:]):
            incl[fr] += n
    if not total:
        return {"samples": 0}

    def share(c: collections.Counter) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)]

    return {"samples": total, "file": str(path), "threads": share(threads),
            "self_pct": share(self_c), "inclusive_pct": share(incl)}


# -- data -----------------------------------------------------------------------------------
def make_data(kind: str, nbytes: int) -> tuple[bytes, dict]:
    info: dict = {"kind": kind}
    if kind == "synthetic":
        data = pagesrc.synthetic_pages(nbytes // PAGE)
    else:
        real = pagesrc.gather_real_pages(nbytes)
        info.update(processes=len(real.pids), regions=real.regions)
        data = real.data
        if len(data) < nbytes:
            say(f"only {len(data) // MiB} MiB of real pages on this machine; starting ballast")
            ballast = pagesrc.spawn_ballast(nbytes - len(data) + 8 * MiB)
            try:
                more = pagesrc.gather_real_pages(nbytes - len(data), pids=[ballast.pid])
            finally:
                pagesrc.stop_ballast(ballast)
            data += more.data
            info["ballast_bytes"] = len(more.data)
        if len(data) < nbytes:
            short = nbytes - len(data)
            info["synthetic_padding_bytes"] = short
            data += pagesrc.synthetic_pages(short // PAGE)
    data = data[:nbytes]
    info.update(pagesrc.describe(data))
    import zstandard  # the project's own dependency

    comp = zstandard.ZstdCompressor(level=1)
    csize = sum(min(len(comp.compress(data[i:i + PAGE])), PAGE)
                for i in range(0, len(data), PAGE))
    info["zstd1_page_ratio"] = len(data) / max(1, csize)
    info["zlib1_ratio"] = len(data) / len(zlib.compress(data, 1))
    return data, info


# -- report ---------------------------------------------------------------------------------
def rows_from(results: dict, nbytes: int,
              zstd_alone: dict) -> list[tuple[str, str, dict[str, float | None]]]:
    """(label, format, {target: value}) per table row."""

    def get(fn) -> dict[str, float | None]:
        out = {}
        for n in NAMES:
            r = results.get(n)
            try:
                out[n] = fn(r) if r and "error" not in r else None
            except (KeyError, TypeError, ZeroDivisionError):
                out[n] = None
        return out

    def cpu_per_gib(r, phases) -> float | None:
        if r.get("device") == "/dev/zram0":
            return None  # kernel work: not attributable to a process
        s = sum(r["cpu"][p]["cpu_s"] for p in phases)
        b = sum(r["cpu"][p]["bytes"] for p in phases)
        return s / (b / GiB)

    rows = [
        ("seq write 1M (MB/s)", "{:.0f}", get(lambda r: r["seq_write_mbs"])),
        ("seq read 1M (MB/s)", "{:.0f}", get(lambda r: r["seq_read_mbs"])),
    ]
    for rw, short in (("randread", "read"), ("randwrite", "write")):
        for d in (1, 32):
            rows.append((f"rand {short} 4K QD{d} (MB/s)", "{:.1f}",
                         get(lambda r, k=f"{rw}_qd{d}": r["fio"][k]["mbs"])))
    for rw, short in (("randread", "read"), ("randwrite", "write")):
        rows.append((f"rand {short} 4K QD1 p99 (us)", "{:.0f}",
                     get(lambda r, k=f"{rw}_qd1": r["fio"][k]["lat_p99_us"])))
    rows += [
        ("swap workload elapsed (s)", "{:.1f}",
         get(lambda r: r["swap"]["elapsed_s"] if r["swap"].get("exit") == 0 else None)),
        ("pool after the workload exits (MiB)", "{:.2f}",
         get(lambda r: r["memory"]["after_exit"]["mem_used_total"] / MiB
             if "orig_data_size" in r["memory"]["after_exit"] else None)),
        ("data held after the workload exits (MiB)", "{:.2f}",
         get(lambda r: r["memory"]["after_exit"]["orig_data_size"] / MiB)),
        ("memory used (MiB)", "{:.1f}",
         get(lambda r: r["memory"]["after_write"]["mem_used_total"] / MiB)),
        ("compression ratio (data/mem)", "{:.2f}",
         get(lambda r: nbytes / r["memory"]["after_write"]["mem_used_total"])),
        ("process RSS after write (MiB)", "{:.1f}",
         get(lambda r: r["memory"]["after_write"]["rss"] / MiB if r["baseline_rss"] else None)),
        ("RSS beyond pool, max (MiB)", "{:.1f}",
         get(lambda r: max(s["rss_beyond_pool"] for s in r["memory"].values()) / MiB)),
        ("CPU s/GiB seq write", "{:.2f}", get(lambda r: cpu_per_gib(r, ["seq_write"]))),
        ("CPU s/GiB seq read", "{:.2f}", get(lambda r: cpu_per_gib(r, ["seq_read"]))),
        ("CPU s/GiB rand 4K", "{:.2f}", get(lambda r: cpu_per_gib(r, ["rand_4k"]))),
        ("CPU s/GiB swap in+out", "{:.2f}", get(lambda r: cpu_per_gib(r, ["swap"]))),
    ]
    for way in ("compress", "decompress"):  # cramfs's ceiling: its codec with nothing around it
        if f"{way}_mbs" in zstd_alone:
            rows.append((f"zstd alone {way}, all CPUs (MB/s)", "{:.0f}",
                         {"cramfs": zstd_alone[f"{way}_mbs"], "nbdkit": None, "zram": None}))
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def table(rows) -> str:
    head = ["metric", "cramfs", "nbdkit+nbdfuse", "zram", "cramfs/nbdkit", "cramfs/zram"]
    body = []
    for label, spec, vals in rows:
        body.append([label] + [fmt(vals[n], spec) for n in NAMES]
                    + [fmt(ratio(vals["cramfs"], vals["nbdkit"]), "{:.2f}x"),
                       fmt(ratio(vals["cramfs"], vals["zram"]), "{:.2f}x")])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def checks(rows, results: dict, advertised_pages: int,
           zstd_alone: dict) -> list[tuple[str, str, str]]:
    v = {label: vals for label, _, vals in rows}

    def check(name: str, a, b, factor: float, higher: bool,
              ceiling: float | None = None) -> tuple[str, str, str]:
        if a is None or b is None:
            return ("SKIP", name, "not measured")
        need = b * factor
        ok = a >= need if higher else a <= need
        rel = ">=" if higher else "<="
        detail = f"{a:.4g} {rel} {need:.4g} ({factor}x {b:.4g}); actual {a / b:.2f}x"
        if ceiling is not None and not ok and need > ceiling:
            detail += f" [needs more than zstd alone does here: {ceiling:.0f} MB/s]"
        return ("PASS" if ok else "MISS", name, detail)

    write, read = v["seq write 1M (MB/s)"], v["seq read 1M (MB/s)"]
    squeeze, inflate = zstd_alone.get("compress_mbs"), zstd_alone.get("decompress_mbs")
    out = [
        check("seq 1M write >= 2x nbdkit", write["cramfs"], write["nbdkit"], 2, True, squeeze),
        check("seq 1M read >= 2x nbdkit", read["cramfs"], read["nbdkit"], 2, True, inflate),
        check("seq 1M write >= 0.5x zram", write["cramfs"], write["zram"], 0.5, True, squeeze),
    ]
    if squeeze:  # the target: 0.7x of what zstd alone does on the same pages, same run
        out += [check("seq 1M write >= 0.7x zstd alone (all CPUs)", write["cramfs"], squeeze,
                      0.7, True),
                check("seq 1M read >= 0.7x zstd alone (all CPUs)", read["cramfs"], inflate,
                      0.7, True)]
    for short in ("read", "write"):
        for d in (1, 32):
            row = v[f"rand {short} 4K QD{d} (MB/s)"]
            out.append(check(f"rand 4K {short} QD{d} >= 1.5x nbdkit", row["cramfs"],
                             row["nbdkit"], 1.5, True))
    sw = v["swap workload elapsed (s)"]
    c = check("swap workload elapsed <= 2x zram", sw["cramfs"], sw["zram"], 2, False)
    if any(results.get(n, {}).get("swap_shared") for n in ("cramfs", "zram")):
        c = (c[0], c[1], c[2] + " [unreliable: other swaps at the same priority took pages]")
    out.append(c)
    mem = v["memory used (MiB)"]
    out.append(check("pool in use <= 0.9x zram mem_used_total", mem["cramfs"], mem["zram"],
                     0.9, False))
    beyond = v["RSS beyond pool, max (MiB)"]["cramfs"]
    limit = (64 * MiB + 16 * advertised_pages) / MiB
    if beyond is None:
        out.append(("SKIP", "daemon RSS beyond pool <= 64 MiB + 16 B/page", "not measured"))
    else:
        out.append(("PASS" if beyond <= limit else "MISS",
                    "daemon RSS beyond pool <= 64 MiB + 16 B/page",
                    f"{beyond:.1f} MiB <= {limit:.1f} MiB ({advertised_pages} pages)"))
    return out


def chart(rows, path: Path, subtitle: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install '.[bench]'): no chart"
    shown = [r for r in rows if any(x is not None for x in r[2].values())]
    cols = 4
    nrows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    colors = {"cramfs": "#2a7ab9", "nbdkit": "#e08a2c", "zram": "#5a9e4b"}
    for ax, (label, spec, vals) in zip(axes.flat, shown, strict=False):
        xs = [TITLES[n] for n in NAMES]
        ys = [vals[n] or 0 for n in NAMES]
        bars = ax.bar(xs, ys, color=[colors[n] for n in NAMES])
        for bar, n in zip(bars, NAMES, strict=True):
            ax.annotate(fmt(vals[n], spec), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(f"cramfs vs nbdkit+nbdfuse vs zram — {subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- main -----------------------------------------------------------------------------------
def preflight(skip: set[str]) -> dict[str, str]:
    """target -> reason it is skipped."""
    reasons = {}
    if os.geteuid() != 0:
        raise SystemExit("compare.py needs root (loop devices, swap, cgroups, zram)")
    for tool in ("dd", "fio", "cmp", "losetup", "mkswap", "swapon", "swapoff"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: install it (e.g. apt-get install fio)")
    if not Path("/dev/fuse").exists():
        reasons["cramfs"] = reasons["nbdkit"] = "no /dev/fuse"
    missing = [t for t in ("nbdkit", "nbdfuse") if not shutil.which(t)]
    if missing:
        reasons["nbdkit"] = (f"{' and '.join(missing)} not installed "
                             "(apt-get install nbdkit libnbd-bin)")
    busy = zram_busy()
    if busy:
        reasons["zram"] = busy
    for n in skip:
        reasons[n] = "skipped by --skip"
    return reasons


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="data size in MiB (default 64)")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--quick", action="store_true", help="shorter runs (under 2 minutes)")
    ap.add_argument("--data", choices=("real", "synthetic"), default="real")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy cramfsd during extra 4 KiB runs and print the hottest frames")
    ap.add_argument("--skip", nargs="*", default=[], choices=NAMES)
    ap.add_argument("--no-metrics", action="store_true",
                    help="run cramfsd without its metrics endpoint (on by default, as shipped)")
    ap.add_argument("--level", type=int, default=DEFAULT_LEVEL,
                    help=f"cramfs's zstd level (default {DEFAULT_LEVEL}, the daemon's default)")
    ap.add_argument("--compressor", default="zstd",
                    help="cramfs's compressor; kernel zram is set to the same one "
                    "when it offers it. Not zstd: no zstd-alone rows, the level is the "
                    "compressor's default unless --level is given")
    ap.add_argument("--cramfsd", default=shutil.which("cramfsd")
                    or str(Path(sys.executable).parent / "cramfsd"))
    args = ap.parse_args(argv)
    if args.compressor != "zstd" and "--level" not in (argv if argv is not None else sys.argv):
        args.level = None
    if args.mib < 8:
        ap.error("--mib must be at least 8")
    if args.quick:
        args.mib = min(args.mib, 32)
    args.reps = 1 if args.quick else 2
    args.fio_seconds = 3 if args.quick else 8
    args.swap_mib = 2 * args.mib
    args.swap_passes = 1 if args.quick else 2
    args.swap_timeout = 120 if args.quick else 240
    nbytes = args.mib * MiB
    size_mib = max(4 * args.mib, args.swap_mib + 32)  # holds the data and the workload's swap
    args.out.mkdir(parents=True, exist_ok=True)

    signal.signal(signal.SIGTERM, _interrupted)  # a SIGTERM must run the finally blocks too

    reasons = preflight(set(args.skip))
    for n, why in reasons.items():
        say(f"skipping {TITLES[n]}: {why}")
    t_start = time.monotonic()
    load_start = loadavg()
    say(f"gathering {args.mib} MiB of {args.data} pages")
    data, data_info = make_data(args.data, nbytes)
    compress_pct = max(0, min(95, round(100 * (1 - 1 / data_info["zstd1_page_ratio"]))))
    say(f"data: {data_info}")
    zstd_alone: dict = {}
    if args.compressor == "zstd":
        say(f"zstd alone at level {args.level} on the same pages, all CPUs (the ceiling)")
        zstd_alone = zstd_ceiling.ceiling(data, args.level)
    zram_algorithm = None
    if args.compressor != "zstd" and "zram" not in reasons:
        offered = [a.strip("[]") for a in (ZRAM / "comp_algorithm").read_text().split()]
        if args.compressor in offered:
            zram_algorithm = args.compressor
        else:
            say(f"zram here does not offer {args.compressor} ({' '.join(offered)}): "
                "zram keeps its default")

    results: dict = {}
    problems: list[str] = []
    other_swaps = [s for s in h.swaps()]
    tmp = Path(tempfile.mkdtemp(prefix="cramfs-bench-"))
    try:
        datafile = tmp / "pages.bin"
        datafile.write_bytes(data)
        del data
        for name in NAMES:
            if name in reasons:
                results[name] = {"error": reasons[name]}
                continue
            td = Teardown()
            try:
                say(f"== {TITLES[name]} ==")
                if name == "cramfs":
                    t = setup_cramfs(tmp, size_mib, td, args.cramfsd, args.level,
                                      not args.no_metrics, args.compressor)
                elif name == "nbdkit":
                    t = setup_nbdkit(tmp, size_mib, td)
                else:
                    t = setup_zram(size_mib, td, zram_algorithm)
                results[name] = measure(t, datafile, nbytes, args, compress_pct, args.out)
            except Exception as exc:  # noqa: BLE001 - one target failing must not stop the rest
                say(f"{TITLES[name]} failed: {exc}")
                results[name] = {"error": str(exc)[-2000:]}
            finally:
                td.close()
                problems += [f"{name}: {p}" for p in td.problems]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    load_end = loadavg()
    ncpu = os.cpu_count() or 1
    busy = max(load_start[0], load_end[0]) > 0.5 * ncpu
    env = {"kernel": platform.release(), "cpus": ncpu, "loadavg_start": load_start,
           "loadavg_end": load_end, "other_swaps_active": other_swaps,
           "machine_busy": busy, "elapsed_s": round(time.monotonic() - t_start, 1)}
    advertised_pages = size_mib * MiB // PAGE
    rows = rows_from(results, nbytes, zstd_alone)
    verdicts = checks(rows, results, advertised_pages, zstd_alone)

    print()
    print(f"cramfs benchmark: {args.mib} MiB of {args.data} pages "
          f"({data_info['pages']} pages, {data_info['zero']} zero, {data_info['same']} same; "
          f"zstd-1 per-page ratio {data_info['zstd1_page_ratio']:.2f}), cramfs "
          f"{args.compressor} level {args.level}, "
          f"metrics endpoint {'off' if args.no_metrics else 'on (unscraped)'}, "
          f"devices {size_mib} MiB, "
          f"fio {args.fio_seconds}s per run, swap workload {args.swap_mib} MiB in a "
          f"{swap_cgroup_limit(args.swap_mib) // MiB} MiB cgroup{' [quick]' if args.quick else ''}")
    print(f"machine: {ncpu} CPUs, kernel {env['kernel']}, load {load_start[0]:.2f} -> "
          f"{load_end[0]:.2f}{' (BUSY: other work was running; numbers are noisy)' if busy else ''}"
          f"; swaps already active: {', '.join(other_swaps) or 'none'}")
    for n in NAMES:
        r = results.get(n, {})
        if "error" in r:
            print(f"  {TITLES[n]}: not measured: {r['error'].splitlines()[0]}")
        elif r.get("notes"):
            print(f"  {TITLES[n]}: {'; '.join(r['notes'])}")
    print()
    print(table(rows))
    print()
    for verdict, name, detail in verdicts:
        print(f"{verdict:4}  {name}: {detail}")
    prof = results.get("cramfs", {}).get("profile")
    if prof:
        print()
        for label, p in prof.items():
            if not p.get("samples"):
                print(f"profile {label}: {p}")
                continue
            print(f"py-spy cramfsd during fio 4K {label} ({p['samples']} samples, {p['file']}):")
            print("  threads: " + ", ".join(f"{k} {v}%" for k, v in p["threads"][:6]))
            print("  self:    " + "; ".join(f"{k} {v}%" for k, v in p["self_pct"][:10]))
            print("  incl:    " + "; ".join(f"{k} {v}%" for k, v in p["inclusive_pct"][:12]))
    if problems:
        print("\nTEARDOWN PROBLEMS:\n  " + "\n  ".join(problems))

    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "data": data_info, "fio_buffer_compress_percentage": compress_pct,
              "zstd_alone": zstd_alone,
              "device_size_mib": size_mib, "env": env, "results": results,
              "table": [{"metric": label, **vals} for label, _, vals in rows],
              "checks": [{"verdict": a, "target": b, "detail": c} for a, b, c in verdicts],
              "teardown_problems": problems}
    jpath = args.out / "compare.json"
    jpath.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {jpath}")
    note = chart(rows, args.out / "compare.png",
                 f"{args.mib} MiB {args.data} pages, load {load_start[0]:.1f}")
    print(note or f"wrote {args.out / 'compare.png'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
