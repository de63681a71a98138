"""What-if: what would this memory cost in zram, with each compressor?

``cramfs estimate`` reads pages -- a live process's private memory, or a file -- and reports,
per compressor, what zram's books would say and what this project's pool would really use:

- zero pages and same-filled pages (one non-zero 8-byte word repeated, the rule of
  ``cramfs.codec.same_fill``) cost nothing and are not compressed; the two counts are
  disjoint;
- ``compressed_bytes`` follows zram's ``compr_data_size``: the compressed length of each other
  page, or 4096 for a page whose compressed length is at or above the huge threshold
  (``cramfs.codec.DEFAULT_HUGE_THRESHOLD``; zram stores it raw and counts it in
  ``huge_pages``);
- ``pool_bytes`` is what ``cramfs.zspool`` would hold for those objects, packed as tightly as
  its compaction can pack them: each object rounded up to its size class, each class using
  ``ceil(objects / slots_per_block)`` blocks of ``frames_per_block`` 4 KiB frames; raw pages take
  the 4096-byte class;
- ``ratio`` is the original bytes of every page read (zero and same-filled ones included, as in
  zram's ``orig_data_size``) over ``pool_bytes``: the README's effective ratio, the one a
  capacity-lying device must sustain. It is None when nothing needs the pool;
- ``compress_mb_s`` / ``decompress_mb_s`` are one core's throughput on this machine over the
  pages that reach the compressor (not zero or same-filled), in 10^6 bytes of pages per second.
  Every such page is decompressed once, huge ones too: it is the compressor's own speed.

Memory stays bounded: pages stream through in chunks of ``CHUNK_BYTES`` and only per-compressor
tallies (bytes, huge pages, an object count per size class, seconds) are kept.

A process's pages are those a swap device could be handed: the resident anonymous pages (and
swapped-out ones) of its private mappings -- heap, stack, anonymous mappings and the written
pages of private file mappings -- found through ``/proc/PID/maps`` and ``/proc/PID/pagemap``
and read from ``/proc/PID/mem``. Pages that cannot be read (EIO, EFAULT: a racing munmap, a
guard) are skipped and counted in ``unreadable_bytes``. Reading another user's process needs
root (or ptrace rights).
"""

from __future__ import annotations

import errno
import os
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cramfs import PAGE_SIZE
from cramfs.codec import DEFAULT_HUGE_THRESHOLD, same_fill
from cramfs.compressors import DEFAULT_LEVELS, NAMES, PageCompressor, format_spec, make
from cramfs.zspool import FRAME, ZsPool

CHUNK_BYTES = 4 << 20
MB = 1_000_000

# /proc/PID/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE = 1 << 61  # a file page or shared anonymous: not what a private mapping swaps
_SPECIAL_MAPPINGS = ("[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]")

Progress = Callable[[int, int], None]  # (bytes scanned, bytes to scan)


class EstimateError(Exception):
    """Input that cannot be estimated: no such process, no permission, unreadable file."""


def default_specs() -> list[tuple[str, int | None]]:
    """zram's compressor set, each at its default level."""
    return [(name, DEFAULT_LEVELS[name]) for name in NAMES]


# -- the pool's size classes ---------------------------------------------------------------
class PoolClasses:
    """The device pool's size classes, read off a tiny ZsPool built the way devices build
    theirs, so the estimate follows the allocator if its classes change."""

    def __init__(self, huge_threshold: int = DEFAULT_HUGE_THRESHOLD) -> None:
        pool = ZsPool(FRAME, largest_compressed=huge_threshold)
        try:
            self.sizes = [cls.size for cls in pool.classes]
            self.frames_per_block = [cls.frames_per_block for cls in pool.classes]
            self.slots_per_block = [cls.slots_per_block for cls in pool.classes]
            # Class index for every object length 0..PAGE_SIZE: one lookup per page.
            self.index = array("H", (pool.class_of(n).index for n in range(PAGE_SIZE + 1)))
        finally:
            pool.close()

    def pool_bytes(self, objects: Sequence[int]) -> int:
        """Bytes of frames that hold ``objects[i]`` objects of class i, fully compacted."""
        total = 0
        for count, slots, frames in zip(objects, self.slots_per_block, self.frames_per_block,
                                        strict=True):
            total += -(-count // slots) * frames * FRAME
        return total


# -- per-compressor tallies ----------------------------------------------------------------
@dataclass
class CompressorResult:
    compressor: str
    level: int | None
    compressed_bytes: int
    pool_bytes: int
    huge_pages: int
    ratio: float | None
    compress_mb_s: float | None
    decompress_mb_s: float | None

    @property
    def spec(self) -> str:
        return format_spec(self.compressor, self.level)


class Tally:
    """What one compressor made of the pages so far: only counts, never the pages."""

    def __init__(self, compressor: PageCompressor, classes: PoolClasses,
                 huge_threshold: int) -> None:
        self.compressor = compressor
        self.classes = classes
        self.huge_threshold = huge_threshold
        self.huge_class = classes.index[PAGE_SIZE]
        self.objects = [0] * len(classes.sizes)
        self.compressed_bytes = 0
        self.huge_pages = 0
        self.measured_bytes = 0
        self.compress_seconds = 0.0
        self.decompress_seconds = 0.0

    def add(self, pages: Sequence[bytes]) -> None:
        """Compress (timed), decompress (timed) and book a batch of non-same pages."""
        compress = self.compressor.compress
        decompress = self.compressor.decompress
        start = time.perf_counter()
        payloads = [compress(page) for page in pages]
        middle = time.perf_counter()
        for payload in payloads:
            decompress(payload)
        self.compress_seconds += middle - start
        self.decompress_seconds += time.perf_counter() - middle
        self.measured_bytes += len(pages) * PAGE_SIZE
        for payload in payloads:
            self._book(len(payload))

    def _book(self, length: int) -> None:
        if length >= self.huge_threshold:
            self.huge_pages += 1
            self.compressed_bytes += PAGE_SIZE
            self.objects[self.huge_class] += 1
        else:
            self.compressed_bytes += length
            self.objects[self.classes.index[length]] += 1

    def result(self, original_bytes: int) -> CompressorResult:
        pool_bytes = self.classes.pool_bytes(self.objects)
        return CompressorResult(
            compressor=self.compressor.name, level=self.compressor.level,
            compressed_bytes=self.compressed_bytes, pool_bytes=pool_bytes,
            huge_pages=self.huge_pages,
            ratio=round(original_bytes / pool_bytes, 3) if pool_bytes else None,
            compress_mb_s=_rate(self.measured_bytes, self.compress_seconds),
            decompress_mb_s=_rate(self.measured_bytes, self.decompress_seconds))


def _rate(nbytes: int, seconds: float) -> float | None:
    if not nbytes or seconds <= 0:
        return None
    return round(nbytes / seconds / MB, 1)


# -- the whole estimate --------------------------------------------------------------------
@dataclass
class Report:
    pages: int
    zero_pages: int
    same_pages: int
    results: list[CompressorResult]
    unreadable_bytes: int = 0
    sources: list[dict[str, Any]] = field(default_factory=list)
    huge_threshold: int = DEFAULT_HUGE_THRESHOLD

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document: the contract's keys first, then the extras."""
        return {
            "pages": self.pages, "zero_pages": self.zero_pages, "same_pages": self.same_pages,
            "results": [{
                "compressor": r.compressor, "level": r.level,
                "compressed_bytes": r.compressed_bytes, "pool_bytes": r.pool_bytes,
                "huge_pages": r.huge_pages, "ratio": r.ratio,
                "compress_mb_s": r.compress_mb_s, "decompress_mb_s": r.decompress_mb_s,
            } for r in self.results],
            "unreadable_bytes": self.unreadable_bytes,
            "huge_threshold": self.huge_threshold,
            "sources": self.sources,
        }


class Estimator:
    """Feed it whole pages in any number of batches; ask for the report at the end."""

    def __init__(self, specs: Iterable[tuple[str, int | None]] | None = None,
                 huge_threshold: int = DEFAULT_HUGE_THRESHOLD) -> None:
        specs = default_specs() if specs is None else _unique(specs)
        classes = PoolClasses(huge_threshold)
        self.huge_threshold = huge_threshold
        self.tallies = [Tally(make(name, level), classes, huge_threshold)
                        for name, level in specs]
        self.pages = 0
        self.zero_pages = 0
        self.same_pages = 0

    def feed(self, data: bytes) -> None:
        """Count and compress a whole number of pages."""
        if len(data) % PAGE_SIZE:
            raise ValueError(f"feed takes whole {PAGE_SIZE}-byte pages, got {len(data)} bytes")
        others = []
        for offset in range(0, len(data), PAGE_SIZE):
            page = data[offset:offset + PAGE_SIZE]
            word = same_fill(page)
            if word is None:
                others.append(page)
            elif word:
                self.same_pages += 1
            else:
                self.zero_pages += 1
        self.pages += len(data) // PAGE_SIZE
        if others:
            for tally in self.tallies:
                tally.add(others)

    def report(self, unreadable_bytes: int = 0,
               sources: list[dict[str, Any]] | None = None) -> Report:
        original = self.pages * PAGE_SIZE
        return Report(self.pages, self.zero_pages, self.same_pages,
                      [tally.result(original) for tally in self.tallies],
                      unreadable_bytes, sources or [], self.huge_threshold)


def _unique(specs: Iterable[tuple[str, int | None]]) -> list[tuple[str, int | None]]:
    """The specs in order, each once (asking for zstd:1 twice measures it once)."""
    return list(dict.fromkeys(specs))


# -- sources: a file -----------------------------------------------------------------------
def file_chunks(path: str, progress: Progress | None = None,
                chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The file's pages, ``chunk_bytes`` at a time; a short tail page is padded with zeros."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, errors reworded first
    except OSError as exc:
        raise EstimateError(f"cannot read {path}: {_reason(exc)}") from None
    with handle:
        total = _size_of(handle.fileno())
        done = 0
        while True:
            try:
                data = handle.read(chunk_bytes)
            except OSError as exc:
                raise EstimateError(f"cannot read {path}: {_reason(exc)}") from None
            if not data:
                return
            done += len(data)
            if len(data) % PAGE_SIZE:
                data += bytes(PAGE_SIZE - len(data) % PAGE_SIZE)
            yield data
            if progress is not None:
                progress(done, max(total, done))


def _size_of(fd: int) -> int:
    """A file's size for the progress bar; block devices report theirs by seeking."""
    try:
        size = os.fstat(fd).st_size or os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        return size
    except OSError:
        return 0


def _reason(exc: OSError) -> str:
    return exc.strerror.lower() if exc.strerror else str(exc)


# -- sources: a live process ---------------------------------------------------------------
@dataclass
class ProcessSource:
    """One process to read: its candidate mappings, and what reading it found."""

    pid: int
    name: str
    regions: list[tuple[int, int]]
    pages: int = 0
    unreadable_bytes: int = 0

    @property
    def mapped_bytes(self) -> int:
        return sum(end - start for start, end in self.regions)

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "name": self.name, "pages": self.pages,
                "unreadable_bytes": self.unreadable_bytes}


def private_mapping(perms: str, path: str) -> bool:
    """Mappings whose pages a swap device could be handed: private and readable; anonymous
    (heap, stack, [anon:...]) or, if file-backed, writable (their written pages are anonymous
    copies)."""
    if len(perms) < 4 or perms[0] != "r" or perms[3] != "p" or path in _SPECIAL_MAPPINGS:
        return False
    if not path or path.startswith("[") or path.startswith("/memfd:"):
        return True
    return perms[1] == "w"


def parse_maps(text: str) -> list[tuple[int, int]]:
    """(start, end) of the private mappings in a /proc/PID/maps text."""
    regions = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        path = parts[5].strip() if len(parts) > 5 else ""
        if private_mapping(parts[1], path):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            regions.append((start, end))
    return regions


def open_process(pid: int) -> ProcessSource:
    """Check that ``pid`` exists and can be read, and list its private mappings."""
    where = f"/proc/{pid}"
    try:
        with open(f"{where}/maps") as maps:
            regions = parse_maps(maps.read())
        for name in ("mem", "pagemap"):
            os.close(os.open(f"{where}/{name}", os.O_RDONLY))
    except FileNotFoundError:
        raise EstimateError(f"no process {pid}") from None
    except PermissionError:
        raise EstimateError(f"cannot read the memory of process {pid}: permission denied "
                            "(run as root)") from None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise EstimateError(f"no process {pid}") from None
        raise EstimateError(f"cannot read the memory of process {pid}: {_reason(exc)}") \
            from None
    return ProcessSource(pid, _comm(pid), regions)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def process_chunks(source: ProcessSource, progress: Progress | None = None,
                   total: int = 0, done: int = 0,
                   chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The process's resident (or swapped) anonymous pages, about ``chunk_bytes`` at a time.
    ``done``/``total`` place this process in a progress bar over several."""
    where = f"/proc/{source.pid}"
    try:
        mem = os.open(f"{where}/mem", os.O_RDONLY)
        pagemap = os.open(f"{where}/pagemap", os.O_RDONLY)
    except OSError:
        source.unreadable_bytes += source.mapped_bytes  # it went away after open_process
        return
    buffer = bytearray()
    window = chunk_bytes
    try:
        for start, end in source.regions:
            for low in range(start, end, window):
                high = min(end, low + window)
                for address, length in _wanted_runs(pagemap, low, high):
                    buffer += _read_run(mem, address, length, source)
                if len(buffer) >= chunk_bytes:
                    yield _take(buffer, source)
                done += high - low
                if progress is not None:
                    progress(done, max(total, done))
        if buffer:
            yield _take(buffer, source)
    finally:
        os.close(mem)
        os.close(pagemap)


def _take(buffer: bytearray, source: ProcessSource) -> bytes:
    data = bytes(buffer)
    buffer.clear()
    source.pages += len(data) // PAGE_SIZE
    return data


def _wanted_runs(pagemap: int, low: int, high: int) -> Iterator[tuple[int, int]]:
    """(address, length) runs in [low, high) of pages a swap device could be handed:
    resident and anonymous, or swapped out. A pagemap that cannot be read: the whole range."""
    count = (high - low) // PAGE_SIZE
    try:
        raw = os.pread(pagemap, count * 8, low // PAGE_SIZE * 8)
    except OSError:
        yield low, high - low
        return
    if raw == bytes(len(raw)):
        return  # nothing resident: the common case for reserved heap and stacks
    entries = array("Q")
    entries.frombytes(raw[: len(raw) // 8 * 8])
    run = -1
    for i, entry in enumerate(entries):
        wanted = entry & PM_SWAPPED or (entry & PM_PRESENT and not entry & PM_FILE)
        if wanted and run < 0:
            run = i
        elif not wanted and run >= 0:
            yield low + run * PAGE_SIZE, (i - run) * PAGE_SIZE
            run = -1
    if run >= 0:
        yield low + run * PAGE_SIZE, (len(entries) - run) * PAGE_SIZE


def _read_run(mem: int, address: int, length: int, source: ProcessSource) -> bytes:
    """The readable whole pages of [address, address + length); pages that fail (EIO,
    EFAULT) or come back short are skipped and counted."""
    try:
        data = os.pread(mem, length, address)
    except OSError:
        data = b""
    if len(data) == length:
        return data
    good = len(data) // PAGE_SIZE * PAGE_SIZE
    parts = [data[:good]]
    for page_address in range(address + good, address + length, PAGE_SIZE):
        try:
            page = os.pread(mem, PAGE_SIZE, page_address)
        except OSError:
            page = b""
        if len(page) == PAGE_SIZE:
            parts.append(page)
        else:
            source.unreadable_bytes += PAGE_SIZE
    return b"".join(parts)


# -- entry points --------------------------------------------------------------------------
def estimate_file(path: str, specs: Iterable[tuple[str, int | None]] | None = None,
                  progress: Progress | None = None) -> Report:
    """The estimate for a file's pages."""
    estimator = Estimator(specs)
    for chunk in file_chunks(path, progress):
        estimator.feed(chunk)
    return estimator.report(0, [{"file": path, "pages": estimator.pages}])


def estimate_pids(pids: Sequence[int], specs: Iterable[tuple[str, int | None]] | None = None,
                  progress: Progress | None = None) -> Report:
    """The estimate over several processes' private memory, as one set of pages. Every pid is
    checked before any is read, so a typo fails at once."""
    sources = [open_process(pid) for pid in dict.fromkeys(pids)]
    estimator = Estimator(specs)
    total = sum(source.mapped_bytes for source in sources)
    done = 0
    for source in sources:
        for chunk in process_chunks(source, progress, total, done):
            estimator.feed(chunk)
        done += source.mapped_bytes
    unreadable = sum(source.unreadable_bytes for source in sources)
    return estimator.report(unreadable, [source.describe() for source in sources])
