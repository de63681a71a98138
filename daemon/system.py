"""Process-level safety and service plumbing: memory locking, the allocator, IO_FLUSHER,
sd_notify, FUSE tuning, where the mountpoint lives.

A daemon that backs swap must not itself be swapped or throttled by the reclaim it serves:
mlockall keeps its memory resident (MCL_ONFAULT, so the pool's arena is locked page by page
as it fills instead of all at once), and PR_SET_IO_FLUSHER lets its allocations dip into
reserves like a kernel block driver's would. Locked memory is memory the allocator can no
longer give back by the usual means, so the allocator is tuned for it (tune_allocator). All
code that changes the allocator's behaviour lives here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import subprocess
from pathlib import Path

log = logging.getLogger("cramfs.system")

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PR_SET_IO_FLUSHER = 57

_libc = ctypes.CDLL(None, use_errno=True)


def lock_memory() -> bool:
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
        log.info("memory locked (mlockall CURRENT|FUTURE|ONFAULT)")
        return True
    err = ctypes.get_errno()
    log.warning("mlockall failed (%s): the daemon's memory may be swapped out; run as root "
                "or with LimitMEMLOCK=infinity", os.strerror(err))
    return False


# mallopt(3) parameters (glibc <malloc.h>).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 128 << 10  # glibc's own starting value, frozen
TRIM_THRESHOLD = 128 << 10  # glibc's own starting value, frozen
ARENA_MAX = 2  # the Trio thread's arena, and one for every worker thread


def tune_allocator() -> bool:
    """Keep glibc's malloc from stranding memory that mlockall then keeps resident for good.

    Under mlockall, glibc can give memory back only by unmapping it: the free pages in the
    middle of a heap are normally returned with madvise(MADV_DONTNEED), which the kernel
    refuses on locked pages (EINVAL; verified here on 6.18 -- a periodic malloc_trim(0)
    therefore returns nothing either, and a thread arena's heap never shrinks). So:

    - M_MMAP_THRESHOLD fixed at 128 KiB. By default glibc raises the threshold to the size of
      each mmapped block freed (up to 32 MiB): after the first 1 MiB FUSE buffer or request
      payload is freed, every later one comes from the heap, which then grows to the peak of
      the traffic and stays there, locked. A fixed threshold also turns that dynamic
      adjustment off, so blocks of 128 KiB and more are mapped and unmapped on free.
    - M_TRIM_THRESHOLD fixed at 128 KiB: the top of the main heap is given back (brk, which
      works on locked pages) once 128 KiB of it is free.
    - M_ARENA_MAX 2: every thread that mallocs (trio.to_thread workers, the codec's worker,
      zstd's own threads, the metrics server) would otherwise get an arena of its own (up to 8
      per CPU), each a heap that keeps its peak.

    Measured here (tests/bench/rss_bench.py: the default config with the metrics endpoint on,
    `cramfs swapon swap0`, a 320 MiB workload in a 128 MiB memory cgroup, the two daemons in
    alternating rounds; MB beyond the pools = VmRSS minus every pool_resident): idle 40.2-40.5
    either way; after the workload glibc's defaults left 66.8 / 77.1 / 77.3 (the main heap
    20-26 MB; peak 66-107), these settings 61.1 / 56.5 / 64.0 (heap ~10 MB; peak 54-61). With
    the endpoint off (idle 38.5): defaults 62.8-68.0, these settings 51.9-53.0, no higher after
    a second or third workload (tests/e2e/test_soak.py: 52.3 / 52.4 / 53.5 after three 256 MiB
    workloads).

    The price: a block of 128 KiB or more now costs an mmap, page faults and an munmap each
    time. 1 MiB sequential I/O through a loop device (tests/bench/seq_ab.py, 64 MiB of real
    pages, 9 alternating rounds, medians; busy 2-CPU host) wrote ~15-20 % slower (e.g. 158 vs
    195 MB/s) and read 0-20 % slower; the swap workload's elapsed time did not change beyond
    its noise (108-151 s either way), its writes being mostly under 128 KiB and its reads 4 KiB.
    A fixed threshold of 2 MiB (1 MiB buffers reused from the heap) with a 32 MiB trim
    threshold and malloc_trim(0) when idle kept ~25-30 MB of heap after the workload: objects
    that outlive a burst pin the heap above them, and under mlockall nothing below the top can
    be returned.

    The pool no longer adds to what is left: its books are flat arrays in a mapping of their
    own (cramfs/zspool.py), where they once were Python objects per block that filled new
    1 MiB pymalloc arenas, returned only once every object in them was freed (rss_bench,
    three 256 MiB workloads on one daemon: 5 -> 9 arenas with those objects, 7 throughout
    with the arrays). Still needed: with the array books, 320 MiB workloads left 70.4 / 70.1
    MB beyond the pools with glibc's defaults against 59.5-60.6 MB with these settings
    (rss_bench, 2 alternating rounds). On a later tree, three 256 MiB workloads on one daemon
    left 42.4 / 42.9 / 42.6 MB with these settings (main heap 8 MB, 7 idle) and 47.5 / 62.3 /
    64.9 MB with glibc's defaults (main heap 13 -> 30 MB): the tuning stays.
    Returns False (and logs) where mallopt is missing or refuses a parameter.
    """
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is None:
        log.warning("no mallopt (not glibc): the allocator keeps its defaults")
        return False
    refused = [name for name, param, value in (
        ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        ("M_ARENA_MAX", M_ARENA_MAX, ARENA_MAX)) if mallopt(param, value) != 1]
    if refused:
        log.warning("mallopt refused %s: the allocator keeps its defaults there",
                    ", ".join(refused))
        return False
    log.info("allocator: mmap threshold %d KiB, trim threshold %d KiB, %d arenas",
             MMAP_THRESHOLD >> 10, TRIM_THRESHOLD >> 10, ARENA_MAX)
    return True


def set_io_flusher() -> bool:
    if _libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
        log.info("PR_SET_IO_FLUSHER set")
        return True
    err = ctypes.get_errno()
    log.warning("prctl(PR_SET_IO_FLUSHER) failed (%s): needs CAP_SYS_RESOURCE",
                os.strerror(err))
    return False


def sd_notify(message: str) -> bool:
    """Send a state line to $NOTIFY_SOCKET (the documented sd_notify datagram protocol).

    Never blocks: a supervisor that stops reading its socket (a full queue) costs a
    warning and a lost status line, never a daemon frozen inside a SIGHUP."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.send(message.encode(), socket.MSG_DONTWAIT)
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", message.split("\n")[0], exc)
        return False
    return True


# File systems that are the kernel's windows, not storage: mounting a FUSE file system on
# (or creating a mountpoint in) one of them is refused before anything is mounted.
PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "configfs",
    "bpf", "pstore", "efivarfs", "fusectl", "devpts", "mqueue", "binfmt_misc", "nsfs",
    "hugetlbfs", "selinuxfs", "autofs", "rpc_pipefs", "nfsd"})


def _unescape_mountinfo(field: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(path: Path, mountinfo: str | None = None) -> str:
    """The type of the file system ``path`` (which exists) lives on: the mount in
    /proc/self/mountinfo with the longest mount point containing its real path (the last one
    mounted, when several share a mount point). Reads the table, never the mount itself, so a
    hung FUSE mount elsewhere cannot hang the caller."""
    real = os.path.realpath(path)
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    best, best_type = "", ""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = _unescape_mountinfo(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, right.split()[0]
    return best_type


def pseudo_filesystem(path: Path) -> str | None:
    """The type of the pseudo file system ``path`` is on (proc, sysfs, ...), or None."""
    try:
        fstype = filesystem_type(path)
    except OSError:
        return None
    return fstype if fstype in PSEUDO_FILESYSTEMS else None


FUSECTL = Path("/sys/fs/fuse/connections")


def tune_fuse_connection(device: int, max_background: int) -> None:
    """Raise the connection's max_background so more requests are in flight at once.

    ``device`` is the st_dev of the mount, taken by the caller from a stat made off the
    event loop (a stat of our own mount from the loop's thread would wait on itself). Where
    fusectl is not mounted (hosts without systemd), it is mounted for the write and unmounted
    again, so the host is left as it was found.
    """
    mounted_here = False
    try:
        if not any(FUSECTL.iterdir()) and os.geteuid() == 0:
            mounted_here = subprocess.run(
                ["mount", "-t", "fusectl", "none", str(FUSECTL)], check=False,
                capture_output=True, timeout=10).returncode == 0
        minor = os.minor(device)
        base = FUSECTL / str(minor)
        (base / "max_background").write_text(str(max_background))
        (base / "congestion_threshold").write_text(str(max_background * 3 // 4))
        log.info("FUSE connection %d: max_background=%d", minor, max_background)
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("could not tune the FUSE connection: %s", exc)
    finally:
        if mounted_here:
            subprocess.run(["umount", str(FUSECTL)], check=False, capture_output=True,
                           timeout=10)
