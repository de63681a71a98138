"""A tiny pyfuse3 file system for the fallocate tests: one file, ``data``, 1 MiB held in memory.

    python fallocate_fs.py MOUNTPOINT LOG {handler,eopnotsupp,default}

``handler``: ``fallocate`` appends each call to LOG (a JSON line: fh, mode, offset, length) and
serves it -- PUNCH_HOLE zeroes the range, mode 0 or KEEP_SIZE alone allocates (mode 0 may extend
the file), anything else raises EOPNOTSUPP. ``eopnotsupp``: logs each call, then raises
``FUSEError(EOPNOTSUPP)``. ``default``: no ``fallocate`` method, so pyfuse3's default
``Operations.fallocate`` (ENOSYS) answers; with a stock pyfuse3 libfuse itself answers ENOSYS.

The file starts filled with 0xAB so a test can see which bytes a hole punch zeroed. Runs in the
foreground until unmounted (fusermount3 -u) or SIGTERM/SIGINT.
"""

from __future__ import annotations

import errno
import json
import signal
import stat
import sys
import time

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1
FILE_NAME = b"data"
SIZE = 1 << 20
FILL = 0xAB
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class OneFile(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray([FILL]) * SIZE
        self.stamp = time.time_ns()

    async def getattr(self, inode, ctx=None):
        attrs = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
        elif inode == FILE_INODE:
            attrs.st_mode = stat.S_IFREG | 0o644
            attrs.st_nlink = 1
            attrs.st_size = len(self.data)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.st_ino = inode
        attrs.st_blksize = 4096
        attrs.st_blocks = (attrs.st_size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self.stamp
        return attrs

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INODE)

    async def statfs(self, ctx):
        # The loop driver offers discard only when the backing file's statfs(2) works (its
        # f_bsize becomes the discard granularity) and its f_op has fallocate.
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = 4096
        stats.f_blocks = len(self.data) // 4096
        stats.f_namemax = 255
        return stats

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, await self.getattr(FILE_INODE), 1)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return bytes(self.data[off:off + size])

    async def write(self, fh, off, buf):
        end = off + len(buf)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[off:end] = buf
        return len(buf)


class Logged(OneFile):
    """Records every fallocate call before answering it."""

    def __init__(self, log_path: str, answer: str) -> None:
        super().__init__()
        self.log_path = log_path
        self.answer = answer

    async def fallocate(self, fh, mode, offset, length):
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"fh": fh, "mode": mode, "offset": offset, "length": length}))
            f.write("\n")
        if self.answer == "eopnotsupp":
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        end = offset + length
        if mode & FALLOC_FL_PUNCH_HOLE:
            stop = min(end, len(self.data))
            if offset < stop:
                self.data[offset:stop] = bytes(stop - offset)
        elif mode & ~FALLOC_FL_KEEP_SIZE:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        elif not mode & FALLOC_FL_KEEP_SIZE and end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))


def main() -> None:
    mountpoint, log_path, answer = sys.argv[1:4]
    if answer not in ("handler", "eopnotsupp", "default"):
        sys.exit(f"unknown answer {answer!r}")
    ops = OneFile() if answer == "default" else Logged(log_path, answer)
    options = set(pyfuse3.default_options) | {"fsname=cramfs-fallocate-test"}
    pyfuse3.init(ops, mountpoint, options)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(stop_on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        # After fusermount3 -u the mount is gone; after a signal it is still there.
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
