"""Sparse-file primitives shared by the pool's memfd arena and zswap's backing file: give a
range's blocks back to the kernel, and ask how many blocks a file really holds."""

from __future__ import annotations

import ctypes
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of ``fd`` in [offset, offset+length) without changing its size.

    Works on memfd pages that are mlocked in a mapping, where MADV_DONTNEED would fail.
    """
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def allocated_bytes(fd: int) -> int:
    """Bytes the file really occupies (its allocated blocks), holes excluded."""
    return os.fstat(fd).st_blocks * 512
