"""Process-level safety and service plumbing: memory locking, IO_FLUSHER, sd_notify, FUSE tuning.

A daemon that backs swap must not itself be swapped or throttled by the reclaim it serves:
mlockall keeps its memory resident (MCL_ONFAULT, so the pool's arena is locked page by page
as it fills instead of all at once), and PR_SET_IO_FLUSHER lets its allocations dip into
reserves like a kernel block driver's would.
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


def set_io_flusher() -> bool:
    if _libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
        log.info("PR_SET_IO_FLUSHER set")
        return True
    err = ctypes.get_errno()
    log.warning("prctl(PR_SET_IO_FLUSHER) failed (%s): needs CAP_SYS_RESOURCE",
                os.strerror(err))
    return False


def sd_notify(message: str) -> bool:
    """Send a state line to $NOTIFY_SOCKET (the documented sd_notify datagram protocol)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", message.split("\n")[0], exc)
        return False
    return True


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
