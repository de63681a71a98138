"""How much of cramfs's time is the Python FUSE path itself: the floor any cramfs speed-up
runs into.

    python tests/bench/fuse_floor.py [--mib 64] [--rounds 3] [--seconds 5]

Mounts two file systems served by pyfuse3 the way cramfsd serves its own (same mount options,
same request loop settings, same max_background), each behind ``losetup --direct-io=on``:

  empty   one file that stores nothing: reads return zeros, writes are acknowledged. Every
          cost of a request except the device: the kernel's loop and FUSE work, pyfuse3's
          request loop on Trio, the reply.
  cramfs  cramfsd itself as shipped (metrics endpoint on, nobody scraping), on the pages
          compare.py uses.

and runs the same dd (1 MiB sequential) and fio (4 KiB random, iodepth 1 and 32) on both,
alternating target by target in each round so a noisy neighbour hits both alike; medians of
the rounds. Where cramfs is close to the empty file system, the time goes to the path, not to
cramfs, and only a different request loop (several threads on cloned /dev/fuse channels,
which pyfuse3 3.5 does not have) would move it.

Needs root, /dev/fuse, loop devices, dd and fio. Installs nothing; undoes what it set up.
``--serve MOUNTPOINT BYTES`` is the empty file system's own entry point (used internally).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

MiB = 1 << 20
PAGE = 4096
CRAMFSD = shutil.which("cramfsd") or str(Path(sys.executable).parent / "cramfsd")
CASES = ("seq write 1M", "seq read 1M", "rand read 4K QD1", "rand read 4K QD32",
         "rand write 4K QD1", "rand write 4K QD32")


# -- the empty file system ------------------------------------------------------------------
def serve(mountpoint: str, size: int) -> None:
    import pyfuse3
    import trio

    from daemon import main as cramfsd
    from daemon import system

    zeros = bytes(MiB)
    data_inode = pyfuse3.ROOT_INODE + 1

    class EmptyOperations(pyfuse3.Operations):
        """One file, ``data``, of ``size`` bytes that keeps nothing."""

        def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
            attrs = pyfuse3.EntryAttributes()
            attrs.st_ino = inode
            attrs.entry_timeout = attrs.attr_timeout = 60
            if inode == pyfuse3.ROOT_INODE:
                attrs.st_mode, attrs.st_nlink = stat.S_IFDIR | 0o755, 2
            else:
                attrs.st_mode, attrs.st_nlink, attrs.st_size = stat.S_IFREG | 0o600, 1, size
            attrs.st_blksize = PAGE
            return attrs

        async def getattr(self, inode, ctx=None):
            if inode not in (pyfuse3.ROOT_INODE, data_inode):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attrs(inode)

        async def lookup(self, parent_inode, name, ctx=None):
            if parent_inode != pyfuse3.ROOT_INODE or name != b"data":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attrs(data_inode)

        async def setattr(self, inode, attr, fields, fh, ctx):
            return self._attrs(inode)

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode, direct_io=False, keep_cache=False)

        async def read(self, fh, off, length):
            return zeros[:max(0, min(length, size - off))]

        async def write(self, fh, off, buf):
            return len(buf)

        async def flush(self, fh):
            return None

        async def release(self, fh):
            return None

    async def run() -> None:
        options = set(pyfuse3.default_options)
        options.update({"fsname=cramfs-empty", "allow_other"})
        options.discard("default_permissions")
        pyfuse3.init(EmptyOperations(), mountpoint, options)
        try:
            async with trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for _ in signals:
                            pyfuse3.terminate()
                            return

                async def tune() -> None:
                    info = await trio.to_thread.run_sync(os.stat, Path(mountpoint) / "data")
                    await trio.to_thread.run_sync(system.tune_fuse_connection, info.st_dev,
                                                  cramfsd.MAX_BACKGROUND)

                nursery.start_soon(stop_on_signal)
                nursery.start_soon(tune)
                await pyfuse3.main(min_tasks=cramfsd.FUSE_MIN_TASKS,
                                   max_tasks=cramfsd.FUSE_WORKERS)
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)

    os.chdir("/")
    trio.run(run)


# -- the comparison -------------------------------------------------------------------------
def setup_empty(c, h, tmp: Path, size_mib: int, td) -> str:
    mnt = tmp / "empty"
    mnt.mkdir()
    log = tmp / "empty.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(mnt),
                                 str(size_mib * MiB)], stdin=subprocess.DEVNULL, stdout=err,
                                stderr=err)
    td.push("stop the empty file system", lambda: c.stop_pid(proc, "empty fs"))
    td.push(f"unmount {mnt}", lambda: h.unmount(mnt))
    c.wait_for(lambda: h.is_mounted(mnt) and (mnt / "data").exists(), 30, "empty fs", proc, log)
    dev = h.attach_loop(mnt / "data", direct_io=True)
    td.push(f"losetup -d {dev}", lambda: c.detach_if_attached(dev))
    return dev


def one(c, case: str, dev: str, datafile: Path, nbytes: int, seconds: float,
        compress_pct: int) -> float:
    if case == "seq write 1M":
        return c.dd(str(datafile), dev, nbytes, "oflag=direct")
    if case == "seq read 1M":
        return c.dd(dev, "/dev/null", nbytes, "iflag=direct")
    _, way, _, depth = case.split()
    rw = "randread" if way == "read" else "randwrite"
    return c.fio(dev, rw, int(depth.removeprefix("QD")), seconds, nbytes, compress_pct)["mbs"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5, help="per fio run")
    ap.add_argument("--serve", nargs=2, metavar=("MOUNTPOINT", "BYTES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0
    if os.geteuid() != 0:
        raise SystemExit("fuse_floor.py needs root (loop devices)")
    import compare as c

    from tests.e2e import helpers as h

    nbytes = args.mib * MiB
    size_mib = 4 * args.mib
    data, info = c.make_data("real", nbytes)
    compress_pct = max(0, min(95, round(100 * (1 - 1 / info["zstd1_page_ratio"]))))
    tmp = Path(tempfile.mkdtemp(prefix="cramfs-floor-"))
    td = c.Teardown()
    results: dict[str, dict[str, list[float]]] = {"empty": {}, "cramfs": {}}
    try:
        datafile = tmp / "pages.bin"
        datafile.write_bytes(data)
        devices = {"empty": setup_empty(c, h, tmp, size_mib, td),
                   "cramfs": c.setup_cramfs(tmp, size_mib, td, CRAMFSD, c.DEFAULT_LEVEL).device}
        for dev in devices.values():  # both start holding the data
            c.dd(str(datafile), dev, nbytes, "oflag=direct")
        for round_no in range(args.rounds):
            for case in CASES:
                for name, dev in devices.items():
                    value = one(c, case, dev, datafile, nbytes, args.seconds, compress_pct)
                    results[name].setdefault(case, []).append(value)
            c.say(f"round {round_no + 1}/{args.rounds} done")
    finally:
        td.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.mib} MiB of real pages, {os.cpu_count()} CPUs, median of {args.rounds} "
          f"alternating rounds (MB/s)\n")
    print(f"{'case':<20} {'empty pyfuse3':>13} {'cramfs':>8} {'cramfs/empty':>12}")
    for case in CASES:
        empty = statistics.median(results["empty"][case])
        cram = statistics.median(results["cramfs"][case])
        print(f"{case:<20} {empty:>13.1f} {cram:>8.1f} {cram / empty:>11.2f}x")
    if td.problems:
        print("\nTEARDOWN PROBLEMS:\n  " + "\n  ".join(td.problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
