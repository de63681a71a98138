"""The physical backing of a zswap device: a sparse file on real disk, one 4 KiB slot per page
at the page's own offset. Released pages are punched out, so the file's allocated blocks are
exactly the pages living there."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from cramfs import PAGE_SHIFT, PAGE_SIZE
from cramfs.sparse import allocated_bytes, punch_hole


class BackingStore:
    def __init__(self, path: Path | str, size: int) -> None:
        path = Path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT,
                                    f"backing file directory {path.parent} does not exist")
        self.path = path
        # Created or truncated at start: the backing survives nothing, but is never stale.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            os.close(self._fd)
            raise
        self.size = size

    def write(self, index: int, page: bytes) -> None:
        written = os.pwrite(self._fd, page, index << PAGE_SHIFT)
        if written != PAGE_SIZE:
            raise OSError(errno.EIO, f"short write to {self.path}")

    def read(self, index: int) -> bytes:
        page = os.pread(self._fd, PAGE_SIZE, index << PAGE_SHIFT)
        if len(page) != PAGE_SIZE:
            raise OSError(errno.EIO, f"short read from {self.path}")
        return page

    def punch(self, index: int) -> None:
        # A file system without hole punching keeps the stale block; it is never read
        # again because the page table no longer points there.
        with contextlib.suppress(OSError):
            punch_hole(self._fd, index << PAGE_SHIFT, PAGE_SIZE)

    def allocated_bytes(self) -> int:
        return allocated_bytes(self._fd)

    def close(self) -> None:
        os.close(self._fd)
