"""Device traces: every request on a device's data file, recorded compactly for replay.

A trace is a file header (magic, version, the device's configuration as JSON) followed by
chunks, each a compressed batch of records framed with its own lengths and CRC32s (the layout,
byte by byte, is in docs/TRACE-FORMAT.md). The writer's calls only copy the record into a
reused buffer on the caller's thread; a background thread compresses full buffers (zstandard
releases the GIL) and appends them to the file, so recording costs the daemon little. A crash
loses only what was not yet handed to the file: everything before the last complete chunk
stays readable, and the reader stops cleanly at a torn tail.

This module is plain Python: no FUSE, no Trio.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import zstandard

from cramfs import PAGE_SHIFT, PAGE_SIZE
from cramfs.device import CompressedDevice
from cramfs.errors import BackingError, OutOfRange, PoisonedPage, WriteRejected
from cramfs.zswap import ZswapDevice

FORMAT_VERSION = 1
FILE_MAGIC = b"\x89CRAMTR\n"  # high bit and newline catch text-mode mangling, as PNG's does
CHUNK_MAGIC = b"CHNK"
# magic, format version, flags, header JSON length, CRC32 of the header JSON
FILE_HEAD = struct.Struct("<8sHHII")
# magic, frame type, codec, reserved, payload length, raw length, payload CRC32; then the
# CRC32 of those 20 bytes (FRAME_HEAD is the whole 24-byte frame header)
FRAME_FIELDS = struct.Struct("<4sBBHIII")
FRAME_HEAD = struct.Struct("<4sBBHIIII")
_CRC = struct.Struct("<I")
# op, status, time (seconds since the trace began), offset, length; a body of ``length``
# bytes follows for writes, initial-state writes and events
RECORD = struct.Struct("<BBdQQ")
RECORD_SIZE = RECORD.size

FRAME_RECORDS = 1
FRAME_END = 2
CODEC_NONE = 0
CODEC_ZSTD = 1

OP_READ = 1
OP_WRITE = 2
OP_DISCARD = 3
OP_EVENT = 4
OP_INIT = 5  # a page the device held when the trace began (the snapshot)
OP_NAMES = {OP_READ: "read", OP_WRITE: "write", OP_DISCARD: "discard", OP_EVENT: "event",
            OP_INIT: "init"}
BODY_OPS = frozenset((OP_WRITE, OP_EVENT, OP_INIT))

# What became of a request (the device's answer): replay compares its own with it.
STATUS_OK = 0
STATUS_REJECTED = 1  # ENOSPC: write control or a full pool refused it, nothing changed
STATUS_IO_ERROR = 2  # EIO: a poisoned page, a failed backing-file write
STATUS_INVALID = 3  # outside the device
STATUS_NAMES = {STATUS_OK: "ok", STATUS_REJECTED: "rejected", STATUS_IO_ERROR: "io_error",
                STATUS_INVALID: "invalid"}

CHUNK_BYTES = 4 << 20  # raw bytes per chunk: big enough for zstd, small enough to lose
FLUSH_INTERVAL = 1.0  # seconds a record may wait in memory before it is written anyway
MAX_PENDING = 4  # full chunks waiting for the compressor before callers are held back
# zstd level for chunks. Recording competes with the device's own compression for the CPU
# (at 1 MiB the daemon keeps both cores compressing), so the trace takes a fast level:
# measured on 64 MiB of process pages, -30 compresses ~2.5x faster than -3 (~850 vs ~340
# MB/s of CPU here) for ~75% of its ratio.
TRACE_LEVEL = -30
GATHER_BELOW = 64 << 10  # bodies smaller than this are copied into the chunk buffer
SNAPSHOT_RUN = 256  # pages per initial-state record (1 MiB)

_pack_record_into = RECORD.pack_into


class TraceError(Exception):
    """A trace cannot be read or written; the message is one line naming the file."""


def status_of(exc: BaseException | None) -> int:
    """The status to record for a device call that raised ``exc`` (None: it succeeded)."""
    if exc is None:
        return STATUS_OK
    if isinstance(exc, WriteRejected):
        return STATUS_REJECTED
    if isinstance(exc, OutOfRange):
        return STATUS_INVALID
    if isinstance(exc, PoisonedPage | BackingError):
        return STATUS_IO_ERROR
    raise TypeError(f"no trace status for {type(exc).__name__}")


def _json_value(value: object) -> object:
    """JSON for header and event values: enums by value, dataclasses as dicts, paths as
    text."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def plain(value: object) -> object:
    """``value`` as a JSON value (see _json_value)."""
    if value is None or isinstance(value, int | float | str | bool | list | dict):
        return value
    return _json_value(value)


def to_json(value: object) -> bytes:
    return json.dumps(value, default=_json_value, separators=(",", ":"),
                      allow_nan=False).encode()


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        done = os.write(fd, view)
        view = view[done:]


class TraceWriter:
    """Append records to a trace file; compression and file writes on a background thread.

    Every recording call takes ``t``, seconds since the trace began, from its caller (the
    daemon passes ``writer.now()``; tests pass whatever clock they drive). The calls are
    thread-safe but meant for one thread (the daemon's), in the order the device saw the
    requests. A failure of the background thread is kept and raised, as a TraceError, by
    the next call (and by ``close`` if no call raised it yet): it is never lost.
    """

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any], *,
                 chunk_bytes: int = CHUNK_BYTES, interval: float = FLUSH_INTERVAL,
                 level: int = TRACE_LEVEL, max_pending: int = MAX_PENDING) -> None:
        self.path = Path(path)
        self._chunk_bytes = chunk_bytes
        self._interval = interval
        self._max_pending = max(1, max_pending)
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._started = time.monotonic()
        body = to_json({**header, "format_version": FORMAT_VERSION})
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                               0o644)
        except OSError as exc:
            raise TraceError(f"{self.path}: cannot create the trace: {exc.strerror}") from None
        try:
            _write_all(self._fd, FILE_HEAD.pack(FILE_MAGIC, FORMAT_VERSION, 0, len(body),
                                                zlib.crc32(body)) + body)
        except OSError as exc:
            os.close(self._fd)
            raise TraceError(f"{self.path}: cannot write the trace: {exc.strerror}") from None
        # Records since the last hand-off: written into ``_buffer`` (one of a few reused
        # buffers, see _append) from ``_run_start`` to ``_used``; ``_parts`` holds the runs
        # closed so far and the large bodies between them, in order.
        self._parts: list[bytes | memoryview] = []
        self._buffer: bytearray | None = None
        self._run_start = self._used = 0
        self._free: list[bytearray] = []  # buffers the background thread is done with
        # room for any chunk's records but its large bodies (a chunk passes chunk_bytes by
        # at most one record)
        self._capacity = chunk_bytes + RECORD_SIZE + GATHER_BELOW
        self._size = 0  # bytes of the records since the last hand-off
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._ready: collections.deque[Batch] = collections.deque()
        self._handed = 0  # chunks handed to the background thread
        self._written = 0  # chunks it has written
        self._error: TraceError | None = None
        self._error_raised = False
        self._refuse: str | None = None  # why calls are refused: closed, or failed
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="cramfs-trace", daemon=True)
        self._thread.start()

    # -- clock -------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the writer was created, on the monotonic clock: the daemon's ``t``."""
        return time.monotonic() - self._started

    # -- records (the hot calls: copied in under the lock, a full batch handed over) -------
    def read(self, t: float, offset: int, length: int, status: int = STATUS_OK) -> None:
        self._append(OP_READ, status, t, offset, length, None)

    def write(self, t: float, offset: int, data: bytes | bytearray | memoryview,
              status: int = STATUS_OK) -> None:
        """Record a write request and its data (copied, or for a large ``bytes`` body kept
        by reference: immutable, so as good as a copy)."""
        self._append(OP_WRITE, status, t, offset, len(data), data)

    def discard(self, t: float, offset: int, length: int, status: int = STATUS_OK) -> None:
        self._append(OP_DISCARD, status, t, offset, length, None)

    def event(self, t: float, kind: str, **fields: Any) -> None:
        """A control record: something that changed the device outside a request (a zero
        flush, a writeback batch, compaction, a tunable). Fields must be JSON values (enums
        are stored by value)."""
        body = to_json({"kind": kind, **fields})
        self._append(OP_EVENT, STATUS_OK, t, 0, len(body), body)

    def initial(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """A run of pages the device held when the trace began (time 0): the snapshot."""
        self._append(OP_INIT, STATUS_OK, 0.0, offset, len(data), data)

    def _append(self, op: int, status: int, t: float, offset: int, length: int,
                body: bytes | bytearray | memoryview | None) -> None:
        """Every record's one way in, under the lock (a failed background thread is raised
        here): the head and a small body are copied into the chunk buffer; a large body is
        kept as a part of its own (by reference if it is ``bytes``). A full batch is handed
        over.

        Why copy rather than keep the caller's bytes: the daemon's write buffers are fresh
        4 KiB objects, and with the allocator tuned as the daemon tunes it (trim threshold
        128 KiB) keeping a chunk's worth of them alive makes every new one land on memory
        that has to be faulted in: measured 5.1 us instead of 0.5-0.9 us to make a 4 KiB
        buffer, against ~0.2 us to copy one into a buffer that is reused chunk after chunk."""
        size = RECORD_SIZE + (0 if body is None else len(body))
        with self._lock:
            if self._refuse is not None:
                self._raise()
            buffer = self._buffer
            if buffer is None:
                buffer = self._buffer = self._free.pop() if self._free else \
                    bytearray(self._capacity)
            used = self._used
            _pack_record_into(buffer, used, op, status, t, offset, length)
            used += RECORD_SIZE
            if body is not None:
                if len(body) < GATHER_BELOW:
                    buffer[used:used + len(body)] = body
                    used += len(body)
                else:
                    self._parts.append(memoryview(buffer)[self._run_start:used])
                    self._parts.append(body if type(body) is bytes else bytes(body))
                    self._run_start = used
            self._used = used
            self._size += size
            if self._size >= self._chunk_bytes:
                self._hand_off(True)

    # -- hand-off, flush, close ----------------------------------------------------------
    def _hand_off(self, wait: bool) -> None:
        """(Lock held.) Queue the batch for the background thread; with ``wait``, hold the
        caller while too many batches are queued: memory stays bounded if the disk or the
        compressor falls behind."""
        parts, buffer = self._parts, self._buffer
        if buffer is not None and self._used > self._run_start:
            parts.append(memoryview(buffer)[self._run_start:self._used])
        self._ready.append((parts, buffer))
        self._parts, self._buffer = [], None
        self._run_start = self._used = 0
        self._size = 0
        self._handed += 1
        self._cond.notify_all()
        while wait and len(self._ready) > self._max_pending and self._error is None:
            self._cond.wait()

    def flush(self, sync: bool = False) -> None:
        """Write out everything recorded so far (and fsync with ``sync``); returns once it is
        in the file. A crash after this loses nothing recorded before it."""
        with self._lock:
            if self._refuse is not None:
                self._raise()
            if self._size:
                self._hand_off(False)
            target = self._handed
            while self._written < target and self._error is None:
                self._cond.wait()
            if self._error is not None:
                self._raise()
        if sync:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise TraceError(f"{self.path}: fsync failed: {exc.strerror}") from None

    def close(self, t: float | None = None) -> None:
        """Write the rest and an end frame carrying ``t`` (default ``now()``), the moment the
        trace stopped; close the file. Raises the background thread's error if no call has
        raised it yet. Closing twice does nothing."""
        end = self.now() if t is None else t
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._size and self._error is None:
                self._hand_off(False)
            self._cond.notify_all()
        self._thread.join()
        try:
            if self._error is None:
                self._frame(FRAME_END, CODEC_NONE, [to_json({"t": end})], 0)
        except OSError as exc:
            self._fail(f"writing the trace failed: {exc.strerror}")
        finally:
            os.close(self._fd)
            with self._lock:
                if self._refuse is None:
                    self._refuse = f"{self.path}: the trace is closed"
        if self._error is not None and not self._error_raised:
            self._raise()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _raise(self) -> None:
        if self._error is not None:
            self._error_raised = True
            raise self._error
        raise TraceError(self._refuse or f"{self.path}: the trace is closed")

    def _fail(self, what: str) -> None:
        """Keep an error for the caller (lock not held); every later call raises it."""
        with self._lock:
            if self._error is None:
                self._error = TraceError(f"{self.path}: {what}")
                self._refuse = str(self._error)
            self._ready.clear()
            self._cond.notify_all()

    # -- the background thread ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            parts, buffer = batch
            try:
                payload, raw_length = self._compress(parts)
                self._frame(FRAME_RECORDS, CODEC_ZSTD, payload, raw_length)
            except Exception as exc:  # kept for the caller; never swallowed
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                self._fail(f"writing the trace failed: {reason}")
                return
            del parts, batch  # their views of the buffer, before it is reused
            with self._lock:
                if buffer is not None and len(self._free) <= self._max_pending:
                    self._free.append(buffer)
                self._written += 1
                self._cond.notify_all()

    def _next_batch(self) -> Batch | None:
        """Wait for a full batch; after ``interval`` seconds without one, take whatever has
        been recorded, so a quiet device's records still reach the file within about a
        second."""
        with self._lock:
            while not self._ready:
                if self._closing:
                    return None
                if not self._cond.wait(self._interval) and self._size:
                    self._hand_off(False)
            batch = self._ready.popleft()
            self._cond.notify_all()
            return batch

    def _compress(self, parts: list[bytes | memoryview]) -> tuple[list[bytes], int]:
        """One zstd frame of the batch: a batch of small records (the chunk buffer's one run)
        in one call, straight from the buffer; otherwise each part, buffer runs and large
        bodies alike, through a streaming compressor as it is (copied only inside zstd,
        without the GIL)."""
        total = sum(len(part) for part in parts)
        if len(parts) == 1:
            return [self._compressor.compress(parts[0])], total
        compressor = self._compressor.compressobj(size=total)
        out = [compressor.compress(part) for part in parts]
        out.append(compressor.flush())
        return [piece for piece in out if piece], total

    def _frame(self, kind: int, codec: int, payload: list[bytes], raw_length: int) -> None:
        crc = 0
        for piece in payload:
            crc = zlib.crc32(piece, crc)
        head = FRAME_FIELDS.pack(CHUNK_MAGIC, kind, codec, 0, sum(map(len, payload)),
                                 raw_length, crc)
        head += _CRC.pack(zlib.crc32(head))
        _write_all(self._fd, head)
        for piece in payload:
            _write_all(self._fd, piece)


# -- reading ---------------------------------------------------------------------------------
class Record(NamedTuple):
    """One record. ``op`` is read, write, discard, event or init (a snapshot page run);
    ``data`` is the written bytes (write, init); ``event`` and ``fields`` describe a control
    record."""

    op: str
    t: float
    offset: int
    length: int
    status: int = STATUS_OK
    data: bytes | None = None
    event: str | None = None
    fields: dict[str, Any] | None = None


# op, status, t, offset, length, body: a memoryview into the chunk (bytes once replay has
# copied a write's data out)
RawRecord = tuple[int, int, float, int, int, memoryview | bytes | None]
# A batch for the background thread: its parts in order, and the chunk buffer they view
Batch = tuple[list[bytes | memoryview], bytearray | None]


class TraceReader:
    """Read a trace chunk by chunk (memory stays bounded by one chunk).

    ``header`` is available at once. Iterating yields Records; ``chunks()`` yields each
    chunk's raw records (op codes and memoryviews: what replay uses, without an object per
    record). A torn or truncated end stops the iteration cleanly and sets ``truncated``;
    a file that is not a trace, of an unsupported version, or corrupt before its end raises
    TraceError naming the file and the offset.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.truncated = False  # the trace did not end with its end frame
        self.complete = False  # the end frame was read
        self.end_time: float | None = None  # when the trace was stopped (end frame)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 -- closed by close()
        except OSError as exc:
            raise TraceError(f"{self.path}: {exc.strerror}") from None
        try:
            self.header, self._data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise
        self.version = FORMAT_VERSION

    def _fail(self, offset: int, what: str) -> TraceError:
        return TraceError(f"{self.path}: {what} at offset {offset}")

    def _read_header(self) -> tuple[dict[str, Any], int]:
        head = self._file.read(FILE_HEAD.size)
        if head[:len(FILE_MAGIC)] != FILE_MAGIC[:len(head)] or not head:
            raise self._fail(0, "not a cramfs trace (no trace magic)")
        if len(head) < FILE_HEAD.size:
            raise self._fail(len(head), "trace cut short inside its file header")
        _, version, _flags, length, crc = FILE_HEAD.unpack(head)
        if version != FORMAT_VERSION:
            raise TraceError(f"{self.path}: trace format version {version} is not supported "
                             f"(this cramfs reads version {FORMAT_VERSION})")
        body = self._file.read(length)
        if len(body) < length:
            raise self._fail(FILE_HEAD.size + len(body), "trace cut short inside its header")
        if zlib.crc32(body) != crc:
            raise self._fail(FILE_HEAD.size, "corrupt trace header (CRC mismatch)")
        try:
            header = json.loads(body)
        except ValueError:
            raise self._fail(FILE_HEAD.size, "corrupt trace header (not JSON)") from None
        if not isinstance(header, dict):
            raise self._fail(FILE_HEAD.size, "corrupt trace header (not a JSON object)")
        return header, FILE_HEAD.size + length

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- chunks ---------------------------------------------------------------------------
    def raw_chunks(self) -> Iterator[tuple[int, bytes]]:
        """(file offset, decompressed records) per chunk, from the start each time."""
        self.truncated = self.complete = False
        self.end_time = None
        file = self._file
        size = os.fstat(file.fileno()).st_size
        offset = self._data_start
        file.seek(offset)
        decompressor = zstandard.ZstdDecompressor()
        while True:
            head = file.read(FRAME_HEAD.size)
            if len(head) < FRAME_HEAD.size:
                self.truncated = True  # clean end without an end frame, or a torn header
                return
            magic, kind, codec, _, length, raw_length, crc, head_crc = FRAME_HEAD.unpack(head)
            if magic != CHUNK_MAGIC or zlib.crc32(head[:-4]) != head_crc:
                if self._zeros_to_end(offset, size):
                    self.truncated = True  # a crash left the tail zero-filled
                    return
                raise self._fail(offset, "corrupt chunk header")
            payload = file.read(length)
            end = offset + FRAME_HEAD.size + length
            if len(payload) < length:
                self.truncated = True  # torn: the chunk was being written
                return
            if zlib.crc32(payload) != crc:
                if end >= size:
                    self.truncated = True  # the final chunk is torn
                    return
                raise self._fail(offset, "corrupt chunk (CRC mismatch)")
            if kind == FRAME_END:
                self._read_end(offset, payload, end, size)
                return
            if kind != FRAME_RECORDS or codec not in (CODEC_NONE, CODEC_ZSTD):
                raise self._fail(offset, f"unknown chunk type {kind} or codec {codec}")
            yield offset, self._inflate(decompressor, offset, codec, payload, raw_length)
            offset = end

    def _inflate(self, decompressor: zstandard.ZstdDecompressor, offset: int, codec: int,
                 payload: bytes, raw_length: int) -> bytes:
        if codec == CODEC_NONE:
            raw = payload
        else:
            try:
                raw = decompressor.decompress(payload, max_output_size=raw_length)
            except zstandard.ZstdError as exc:
                raise self._fail(offset, f"corrupt chunk ({exc})") from None
        if len(raw) != raw_length:
            raise self._fail(offset, "corrupt chunk (wrong decompressed length)")
        return raw

    def _read_end(self, offset: int, payload: bytes, end: int, size: int) -> None:
        try:
            info = json.loads(payload)
            self.end_time = float(info["t"])
        except (ValueError, KeyError, TypeError):
            raise self._fail(offset, "corrupt end frame") from None
        if end != size:
            raise self._fail(end, "data after the end of the trace")
        self.complete = True

    def _zeros_to_end(self, offset: int, size: int) -> bool:
        file = self._file
        file.seek(offset)
        while block := file.read(1 << 20):
            if block.count(0) != len(block):
                return False
        return offset < size

    def chunks(self) -> Iterator[list[RawRecord]]:
        """Each chunk's records as (op, status, t, offset, length, body) tuples; ``body`` is
        a memoryview into the chunk for writes, init runs and events, else None."""
        for offset, raw in self.raw_chunks():
            yield parse_chunk(raw, self.path, offset)

    def __iter__(self) -> Iterator[Record]:
        names = OP_NAMES
        for chunk in self.chunks():
            for op, status, t, offset, length, body in chunk:
                if op == OP_EVENT:
                    assert body is not None
                    fields = decode_event(body)
                    kind = str(fields.pop("kind", ""))
                    yield Record("event", t, offset, length, status, None, kind, fields)
                else:
                    yield Record(names[op], t, offset, length, status,
                                 None if body is None else bytes(body))


def parse_chunk(raw: bytes, path: Path | str = "<trace>", at: int = 0) -> list[RawRecord]:
    """Split a decompressed chunk into records; a record that does not fit is corruption."""
    view = memoryview(raw)
    unpack = RECORD.unpack_from
    head = RECORD.size
    end = len(raw)
    body_ops = BODY_OPS
    out: list[RawRecord] = []
    append = out.append
    pos = 0
    while pos < end:
        if pos + head > end:
            raise TraceError(f"{path}: corrupt chunk (a record cut short) at offset {at}")
        op, status, t, offset, length = unpack(raw, pos)
        pos += head
        if op in body_ops:
            if pos + length > end:
                raise TraceError(f"{path}: corrupt chunk (a record cut short) at offset {at}")
            append((op, status, t, offset, length, view[pos:pos + length]))
            pos += length
        elif op in OP_NAMES:
            append((op, status, t, offset, length, None))
        else:
            raise TraceError(f"{path}: corrupt chunk (unknown record type {op}) at offset {at}")
    return out


def decode_event(body: memoryview | bytes) -> dict[str, Any]:
    value = json.loads(bytes(body))
    if not isinstance(value, dict):
        raise TraceError("corrupt event record (not a JSON object)")
    return value


# -- starting a trace on a live device -----------------------------------------------------
def device_header(name: str, kind: str, device: CompressedDevice,
                  compressor: str = "zstd", backing_file: str | None = None) -> dict[str, Any]:
    """The header for a trace of ``device``: its configuration with the tunables as they
    are now (attribute writes and SIGHUP may have changed them since start), the zswap
    settings, and the state it is in (a non-empty device is snapshotted; see
    start_trace)."""
    config = {name: plain(value) for name, value in runtime_config(device).items()}
    header: dict[str, Any] = {
        "kind": kind, "name": name, "page_size": PAGE_SIZE, "compressor": compressor,
        "config": config, "started": time.time(),
        # The recorder logs flushes and writeback batches as events: replay may use them.
        "background_events": True,
        "initial": _initial_state(device),
    }
    if isinstance(device, ZswapDevice):
        header["zswap"] = {
            "max_pool_percent": device.max_pool_percent,
            "accept_threshold_percent": device.accept_threshold_percent,
            "backing_file": backing_file,
        }
    return header


def runtime_config(device: CompressedDevice) -> dict[str, object]:
    """The device's DeviceConfig fields as they are now: a tunable the device keeps as an
    attribute of the same name and type (policy, failure_mode, no_alloc_on_full, ...) has
    its live value, the watermarks theirs; the rest is the configuration it was built with.
    Generic, so a field added to DeviceConfig later is recorded without a change here."""
    config: dict[str, object] = {}
    for field in dataclasses.fields(device.config):
        value = getattr(device.config, field.name)
        live = getattr(device, field.name, None)
        config[field.name] = live if type(live) is type(value) else value
    config.update(low=device.watermarks.low, high=device.watermarks.high)
    return config


def _initial_state(device: CompressedDevice) -> dict[str, Any]:
    """What the device held when the trace began: the snapshot's page count and what a
    write cannot recreate (poisoned and dropped pages, the watermark state, the gate)."""
    counters = device.counters
    return {
        "pages": device.pages_stored,
        "requests_before": counters.read_requests + counters.write_requests
        + counters.discard_requests + counters.failed_writes + counters.failed_reads
        + counters.invalid_io,
        "no_alloc": bool(getattr(device, "no_alloc", False)),
        "mm_stat": list(device.mm_stat()),
        "io_stat": list(device.io_stat()),
        "watermark_state": device.watermarks.state.value,
        "poisoned": sorted(device.poisoned),
        "lost": sorted(device.lost),
        "limit_reached": bool(getattr(device, "limit_reached", False)),
    }


def write_snapshot(writer: TraceWriter, device: CompressedDevice) -> int:
    """Record every non-empty page of ``device`` as initial-state records (runs of up to
    SNAPSHOT_RUN adjacent pages). Returns pages recorded. Runs on the device's thread: it
    reads the pool."""
    pages = 0
    run_start, run = -1, bytearray()
    for index in device.table.stored_indices():
        if run and (index != run_start + len(run) // PAGE_SIZE
                    or len(run) >= SNAPSHOT_RUN * PAGE_SIZE):
            writer.initial(run_start << PAGE_SHIFT, run)
            run = bytearray()
        if not run:
            run_start = index
        run += device._page_bytes(index)
        pages += 1
    if run:
        writer.initial(run_start << PAGE_SHIFT, run)
    return pages


def start_trace(path: str | os.PathLike[str], name: str, kind: str,
                device: CompressedDevice, compressor: str = "zstd",
                backing_file: str | None = None, **options: Any) -> TraceWriter:
    """Open a trace of ``device``: header, then the snapshot if the device holds data.
    Call on the device's thread, between requests."""
    header = device_header(name, kind, device, compressor, backing_file)
    writer = TraceWriter(path, header, **options)
    try:
        write_snapshot(writer, device)
    except BaseException:
        writer.close()
        raise
    return writer
