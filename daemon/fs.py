"""The FUSE file system: one directory per device, a data file and its attribute files.

A thin adapter. Compression and decompression of large requests run on worker threads under
a limiter (zstandard releases the GIL); everything that touches the page table runs on the
Trio thread, so commits never race. Every handler turns errors into FUSEError: an unexpected
exception is logged and answered with EIO, it never takes the mount down.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pyfuse3
import trio

from cramfs import PAGE_SIZE
from cramfs.device import OFFLOAD_MIN_BYTES
from cramfs.errors import (
    BackingError,
    DeviceError,
    InjectedFault,
    OutOfRange,
    PoisonedPage,
    WriteRejected,
)
from daemon import recording
from daemon.attributes import Attribute, attributes_for
from daemon.devices import DeviceEntry

if TYPE_CHECKING:
    from cramfs.device import CompressedDevice
    from cramfs.watermarks import State

log = logging.getLogger("cramfs.fs")

ROOT = pyfuse3.ROOT_INODE
# Which part of a request runs on a worker thread is the device's to say (its jobs'
# ``offload``); this is its threshold, under the name readers of this module know.
THREAD_MIN_BYTES = OFFLOAD_MIN_BYTES
REPLY_BUFFER_BYTES = 4 << 20  # reply buffers kept for reuse by large reads (see _give_back)
ATTR_SIZE = 4096
WARN_INTERVAL = 10.0  # seconds between summaries of a repeated warning
POLL_CHANGED = select.POLLIN | select.POLLRDNORM | select.POLLPRI
# fallocate(2) modes that release a range: what the loop driver sends for a discard
# (PUNCH_HOLE|KEEP_SIZE) and for a write-zeroes (ZERO_RANGE, with KEEP_SIZE or without).
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
DISCARD_MODES = frozenset({FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                           FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE})


@dataclass
class Node:
    inode: int
    name: str
    parent: int
    entry: DeviceEntry | None = None  # None for the root
    attribute: Attribute | None = None  # None for directories and data files
    is_dir: bool = False
    children: dict[bytes, int] = field(default_factory=dict)

    @property
    def is_data(self) -> bool:
        return self.entry is not None and not self.is_dir and self.attribute is None


@dataclass
class Handle:
    node: Node
    seen_generation: int = 0  # watermark_state: generation at open / last read
    poll_handle: pyfuse3.PollHandle | None = None


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def _guarded(handler: _Handler) -> _Handler:
    """Map every failure of a handler to a FUSEError so the mount survives it."""

    @functools.wraps(handler)
    async def wrapper(self: CramOperations, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s failed; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    # Typed as the handler itself (its arguments pass straight through; pyfuse3 and the
    # tests call handlers positionally, as the wrapper takes them), so mypy checks each
    # handler's signature against pyfuse3.Operations.
    return cast("_Handler", wrapper)


class CramOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, entries: list[DeviceEntry], observe: Callable[[str, str, float], None]
                 | None = None, threads: int = 2) -> None:
        super().__init__()
        self.entries = entries
        self.observe = observe or (lambda device, op, seconds: None)
        self.limiter = trio.CapacityLimiter(threads)
        self._reply_buffers: dict[int, list[bytearray]] = {}  # size -> free reply buffers
        self._reply_bytes = 0
        self.started = time.time()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.nodes: dict[int, Node] = {ROOT: Node(ROOT, "", ROOT, is_dir=True)}
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.open_data: dict[str, int] = {}  # device name -> open data handles
        self.on_idle: Callable[[], None] = lambda: None  # last data handle closed
        self._warnings: dict[tuple[str, str], tuple[int, float]] = {}  # -> (unlogged, since)
        for entry in entries:
            self._add_device(entry)

    # -- tree -----------------------------------------------------------------------------
    def _add_node(self, node: Node) -> None:
        self.nodes[node.inode] = node
        self.nodes[node.parent].children[node.name.encode()] = node.inode

    def _add_device(self, entry: DeviceEntry) -> None:
        directory = Node(len(self.nodes) + 1, entry.name, ROOT, entry, is_dir=True)
        self._add_node(directory)
        self._add_node(Node(len(self.nodes) + 1, "data", directory.inode, entry))
        for attribute in attributes_for(entry.kind):
            self._add_node(Node(len(self.nodes) + 1, attribute.name, directory.inode, entry,
                                attribute))
        self.open_data[entry.name] = 0

        def changed(old: State, new: State, name: str = entry.name) -> None:
            self._state_changed(name, old, new)

        entry.device.watermarks.subscribe(changed)

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    def busy_devices(self) -> list[str]:
        return [name for name, count in self.open_data.items() if count]

    # -- attributes ---------------------------------------------------------------------
    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.generation = 0
        attrs.entry_timeout = 60
        attrs.attr_timeout = 1
        attrs.st_uid, attrs.st_gid = self.uid, self.gid
        stamp = int(self.started * 1e9)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = stamp
        attrs.st_blksize = PAGE_SIZE
        if node.is_dir:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
            attrs.st_size = 0
        elif node.attribute is None:
            assert node.entry is not None
            attrs.st_mode = stat.S_IFREG | 0o600
            attrs.st_nlink = 1
            attrs.st_size = node.entry.device.size
            attrs.st_blocks = node.entry.device.used_bytes // 512
        else:
            mode = (0o444 if node.attribute.read else 0) | (0o200 if node.attribute.write else 0)
            attrs.st_mode = stat.S_IFREG | mode
            attrs.st_nlink = 1
            attrs.st_size = ATTR_SIZE
        return attrs

    @_guarded
    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    @_guarded
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b".":
            return self._attrs(parent)
        if name == b"..":
            return self._attrs(self._node(parent.parent))
        inode = parent.children.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.nodes[inode])

    @_guarded
    async def setattr(self, inode: pyfuse3.InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: pyfuse3.FileHandleT | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        # Truncation (O_TRUNC, `dd` without conv=notrunc, `echo >`) is accepted and ignored:
        # like a block device, the data file has a fixed size and keeps its contents.
        return self._attrs(node)

    @_guarded
    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_guarded
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        node = self._node(fh)
        for index, (name, inode) in enumerate(sorted(node.children.items())):
            if index < start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attrs(self.nodes[inode]),
                                         index + 1):
                break

    @_guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = PAGE_SIZE
        total = sum(e.device.pool.capacity for e in self.entries) // PAGE_SIZE
        used = sum(e.device.used_bytes for e in self.entries) // PAGE_SIZE
        stats.f_blocks, stats.f_bfree, stats.f_bavail = total, total - used, total - used
        stats.f_files = stats.f_ffree = stats.f_favail = 0
        stats.f_namemax = 255
        return stats

    # -- open / release -------------------------------------------------------------------
    @_guarded
    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        accmode = flags & os.O_ACCMODE
        if node.attribute is not None:
            if accmode != os.O_RDONLY and node.attribute.write is None:
                raise pyfuse3.FUSEError(errno.EACCES)
            if accmode != os.O_WRONLY and node.attribute.read is None:
                raise pyfuse3.FUSEError(errno.EACCES)
        fh = self._next_fh
        self._next_fh += 1
        handle = Handle(node)
        if node.attribute is not None:
            assert node.entry is not None
            handle.seen_generation = node.entry.device.watermarks.generation
            self.handles[fh] = handle
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        assert node.entry is not None
        self.handles[fh] = handle
        self.open_data[node.entry.name] += 1
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=False)

    @_guarded
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None or not handle.node.is_data:
            return
        assert handle.node.entry is not None
        self.open_data[handle.node.entry.name] -= 1
        if not self.busy_devices():
            self.on_idle()

    @_guarded
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_guarded
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        return None  # every accepted write is already in the pool

    # -- data -----------------------------------------------------------------------------
    @_guarded
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        handle = self._handle(fh)
        node = handle.node
        assert node.entry is not None
        if node.attribute is not None:
            return self._read_attribute(handle, off, size)
        device = node.entry.device
        started = time.perf_counter()
        size = max(0, min(size, device.size - off))  # a file's read stops at its end
        if off < 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if size == 0:
            return b""
        entry = node.entry
        try:
            try:
                job = device.submit_read(off, size, self._reply_buffer)
            except DeviceError as exc:
                if entry.trace is not None:
                    recording.request(entry, "read", off, size, exc)
                raise
            if entry.trace is not None:  # in the device's order: before any await
                recording.request(entry, "read", off, size, None)
            if job.offload is not None:
                await trio.to_thread.run_sync(job.offload, limiter=self.limiter)
            data = job.finish()
        except PoisonedPage as exc:
            log.warning("%s: read of poisoned page %d", node.entry.name, exc.page)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except InjectedFault:
            raise pyfuse3.FUSEError(errno.EIO) from None
        delay = job.delay()
        if delay > 0:
            await trio.sleep(delay)
        self.observe(node.entry.name, "read", time.perf_counter() - started)
        reply = job.reply
        if reply is not None:
            self._give_back(reply)  # once nothing can await any more
        return data

    def _reply_buffer(self, size: int) -> bytearray | None:
        """A reply buffer of ``size`` bytes a finished read gave back, if there is one;
        reusing it saves a page fault per 4 KiB of a fresh one (~6 us each on a VM)."""
        free = self._reply_buffers.get(size)
        if not free:
            return None
        self._reply_bytes -= size
        return free.pop()

    def _give_back(self, reply: bytearray) -> None:
        """Keep a large read's reply buffer for the next read of its size. Called right
        before the handler returns, with no await after it: pyfuse3 copies the reply out
        (fuse_read_async calls fuse_reply_buf as soon as the handler returns) before any other
        task runs, so the next read may reuse it. At most REPLY_BUFFER_BYTES are kept."""
        size = len(reply)
        if self._reply_bytes + size > REPLY_BUFFER_BYTES:
            return
        self._reply_buffers.setdefault(size, []).append(reply)
        self._reply_bytes += size

    @_guarded
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        node = handle.node
        assert node.entry is not None
        if node.attribute is not None:
            return self._write_attribute(node, off, buf)
        device = node.entry.device
        name = node.entry.name
        started = time.perf_counter()
        entry = node.entry
        try:
            try:
                job = device.submit_write(off, buf)
                if job.offload is not None:
                    await trio.to_thread.run_sync(job.offload, limiter=self.limiter)
                result = job.finish()
            except DeviceError as exc:
                if entry.trace is not None:
                    recording.request(entry, "write", off, buf, exc)
                raise
            if entry.trace is not None:  # right after the commit, in the device's order
                recording.request(entry, "write", off, buf, None)
        except OutOfRange:
            raise pyfuse3.FUSEError(errno.EFBIG) from None
        except WriteRejected as exc:
            await self._refused(node.entry, off, len(buf), exc)
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except PoisonedPage as exc:
            log.warning("%s: write into poisoned page %d", name, exc.page)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except InjectedFault:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except BackingError as exc:
            self._warn_limited(name, "writes failed in the backing file", str(exc))
            raise pyfuse3.FUSEError(errno.EIO) from None
        if result.lost_pages:
            fate = "dropped" if device.failure_mode.value == "drop" else "poisoned"
            self._warn_limited(name, f"writes with pages {fate} past the real capacity",
                               f"{result.lost_pages} page(s) at offset {off}")
        delay = job.delay()
        if delay > 0:
            await trio.sleep(delay)
        self.observe(name, "write", time.perf_counter() - started)
        return len(buf)

    @_guarded
    async def fallocate(self, fh: pyfuse3.FileHandleT, mode: int, offset: int,
                        length: int) -> None:
        """The kernel's discard: the loop driver turns a discard into PUNCH_HOLE|KEEP_SIZE and
        a write-zeroes into ZERO_RANGE. Both release the range (device.discard); any other
        mode is EOPNOTSUPP and changes nothing. Never ENOSYS: the kernel would stop sending
        fallocate for the life of the mount."""
        handle = self._handle(fh)
        node = handle.node
        if not node.is_data:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        assert node.entry is not None
        if mode not in DISCARD_MODES:
            log.debug("%s: fallocate mode %#x not supported", node.entry.name, mode)
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        name, entry = node.entry.name, node.entry
        try:
            try:
                entry.device.discard(offset, length)
            except DeviceError as exc:
                if entry.trace is not None:
                    recording.request(entry, "discard", offset, length, exc)
                raise
            if entry.trace is not None:
                recording.request(entry, "discard", offset, length, None)
        except OutOfRange:
            raise pyfuse3.FUSEError(errno.EFBIG) from None
        except WriteRejected as exc:
            self._warn_limited(name, "discards refused with ENOSPC", str(exc))
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except PoisonedPage as exc:
            log.warning("%s: discard edge in poisoned page %d", name, exc.page)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except BackingError as exc:
            self._warn_limited(name, "writes failed in the backing file", str(exc))
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _refused(self, entry: DeviceEntry, off: int, length: int,
                       exc: WriteRejected) -> None:
        """Log a refusal without flooding; recognise the kernel's endless retry of the same
        refused pages (cramfs.storm), say once what is happening and the way out, and hold
        each refusal back while it lasts so the retry loop costs little CPU."""
        name, storm = entry.name, entry.storm
        now = time.monotonic()
        pages = max(1, (off + length - 1) // PAGE_SIZE - off // PAGE_SIZE + 1)
        if storm.refused(off // PAGE_SIZE, pages, now):
            ways = [f"`cramfs swapoff {name}` (raise the workload's memory limit first, or "
                    "swapoff will wait for room)", "a larger pool", "write_policy none"]
            if entry.device.no_alloc:
                ways.insert(0, f"open the allocation gate (echo 0 > {name}/no_alloc)")
            log.error("%s: refusal storm: the same %d pages are being refused again and "
                      "again (%d refusals so far, reason %s). The kernel retries a refused "
                      "swap-out forever and the processes waiting for that memory sleep "
                      "uninterruptibly, so SIGTERM cannot stop them. Way out: %s. Each "
                      "refusal is now held %.0f ms to spare the CPU.", name,
                      storm.distinct_pages(), storm.refusals, exc.reason, "; or ".join(ways),
                      storm.hold * 1000)
        if storm.active(now):
            await trio.sleep(storm.hold)
        else:
            self._warn_limited(name, "writes refused with ENOSPC", str(exc))

    def _warn_limited(self, name: str, what: str, detail: str) -> None:
        """Warn without flooding: a kernel retrying swap writes against a full device can
        cause thousands of these a second. The first after a quiet spell is logged, then one
        summary line per WARN_INTERVAL; exact counts are in io_stat, lost_pages and metrics."""
        key = (name, what)
        now = time.monotonic()
        count, since = self._warnings.get(key, (0, -WARN_INTERVAL))
        if now - since < WARN_INTERVAL:
            self._warnings[key] = (count + 1, since)
            return
        if count:
            log.warning("%s: %d more %s in the last %.0f s (latest: %s)", name, count, what,
                        now - since, detail)
        else:
            log.warning("%s: %s: %s", name, what, detail)
        self._warnings[key] = (0, now)

    def _read_attribute(self, handle: Handle, off: int, size: int) -> bytes:
        node = handle.node
        assert node.attribute is not None and node.attribute.read is not None
        assert node.entry is not None
        if node.attribute.pollable:
            handle.seen_generation = node.entry.device.watermarks.generation
        text = node.attribute.read(node.entry).encode()
        return text[off:off + size]

    def _write_attribute(self, node: Node, off: int, buf: bytes) -> int:
        attribute = node.attribute
        assert attribute is not None and attribute.write is not None and node.entry is not None
        if off != 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            text = buf.decode("ascii").strip()
            attribute.write(node.entry, text)
            if attribute.event is not None and node.entry.trace is not None:
                kind, fields = attribute.event(node.entry)
                recording.event(node.entry, kind, **fields)
        except (ValueError, UnicodeDecodeError) as exc:
            log.info("%s/%s: rejected %r: %s", node.entry.name, attribute.name, buf[:64], exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        log.info("%s/%s set to %s", node.entry.name, attribute.name, text)
        return len(buf)

    # -- poll: the emulated watermark interrupt -------------------------------------------
    @_guarded
    async def poll(self, inode: pyfuse3.InodeT, fh: pyfuse3.FileHandleT,
                   poll_handle: pyfuse3.PollHandle | None, ctx: pyfuse3.RequestContext) -> int:
        handle = self._handle(fh)
        node = handle.node
        if node.attribute is None or not node.attribute.pollable:
            return select.POLLIN | select.POLLRDNORM | select.POLLOUT | select.POLLWRNORM
        assert node.entry is not None
        if poll_handle is not None:
            handle.poll_handle = poll_handle
        # Ready once a wake-up newer than what this handle last read has been delivered: a
        # dropped interrupt really leaves the poller asleep (the file still reads the truth).
        if node.entry.device.interrupts.generation > handle.seen_generation:
            return POLL_CHANGED
        return 0

    def _state_changed(self, name: str, old: State, new: State) -> None:
        log.warning("%s: watermark state %s -> %s", name, old.value, new.value)
        device = self._device(name)
        generation = device.watermarks.generation
        delay = device.interrupts.raised()
        if delay is None:
            log.info("%s: watermark interrupt dropped (interrupts.drop_rate)", name)
        elif delay > 0 and _in_trio():
            trio.lowlevel.spawn_system_task(self._interrupt_later, name, generation, delay)
        else:
            device.interrupts.deliver(generation, late=False)
            self._wake_pollers(name)

    async def _interrupt_later(self, name: str, generation: int, delay: float) -> None:
        await trio.sleep(delay)
        self._device(name).interrupts.deliver(generation, late=True)
        self._wake_pollers(name)

    def _device(self, name: str) -> CompressedDevice:
        return next(e.device for e in self.entries if e.name == name)

    def _wake_pollers(self, name: str) -> None:
        for handle in list(self.handles.values()):
            if handle.poll_handle is not None and handle.node.entry is not None \
                    and handle.node.entry.name == name:
                poll_handle, handle.poll_handle = handle.poll_handle, None
                try:
                    poll_handle.notify()
                except OSError as exc:  # the poller may have gone away
                    log.debug("poll notify failed: %s", exc)
