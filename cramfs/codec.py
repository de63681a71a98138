"""Page codec: same-filled detection, zstd compression in batches, huge-page cut-off.

Compression is a pure function of the page bytes, so it runs on any thread; zstandard
releases the GIL, and ``multi_compress_to_buffer`` spreads a batch over several cores
(batch many pages per call, in parallel where the compressor allows, as the linux-mm series
"mm: zswap: Batched zswap_compress()" does in the kernel).
"""

from __future__ import annotations

import struct
import threading
from array import array
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import zstandard

from cramfs import PAGE_SIZE

# The encodings share the table states (re-exported: the device reads them as codec.SAME...).
from cramfs.pagetable import COMPRESSED as COMPRESSED
from cramfs.pagetable import HUGE as HUGE
from cramfs.pagetable import SAME as SAME

if TYPE_CHECKING:
    from collections.abc import Callable, Sized
    from typing import Protocol, TypeAlias, TypeVar

    from typing_extensions import Buffer

    from cramfs.compressors import PageCompressor

    _T = TypeVar("_T")
    _R = TypeVar("_R")

    class Segment(Buffer, Sized, Protocol):
        """A zstandard BufferSegment as it is: its stub leaves out the buffer protocol the C
        type has (memoryview(), b"".join() and slice assignment all take one)."""

    class Segments(Protocol):
        """A zstandard BufferWithSegmentsCollection (multi_(de)compress_to_buffer's result),
        with its items typed as the buffers they are (see Segment)."""

        def __getitem__(self, i: int, /) -> Segment: ...
        def size(self) -> int: ...

    # What an Encoded page carries: bytes, or from encode_batch a memoryview slice of the
    # batch (HUGE) or a zstandard BufferSegment (COMPRESSED); all have len() and are buffers.
    Payload: TypeAlias = bytes | memoryview | Segment
    # One page of a read plan: (state, payload bytes | fill word | None), the state says which.
    PlanItem: TypeAlias = tuple[int, Any]
    # A gathered read's run: (frames start, frames end, out start, out end).
    Run: TypeAlias = tuple[int, int, int, int]

# zram stores a page raw ("huge") once its compressed form would land in zsmalloc's
# largest size classes; with 4 KiB pages that cut-off (huge_class_size) is about 3.2 KiB.
DEFAULT_HUGE_THRESHOLD = 3264
# The lowest cut-off a device takes (DeviceConfig): below it nearly every page a swap workload
# writes would be stored raw, a pool that compresses nothing. The codec itself works down to 1
# (the estimator and the batch-path tests use small cut-offs to force raw pages).
MIN_DEVICE_HUGE_THRESHOLD = 256

# Batches at least this many pages long use more than one thread: encode_pages hands half to a
# persistent worker, decode_joined hands the compressed pages to zstd's batch decoder.
PARALLEL_BATCH_PAGES = 16

ZERO_PAGE = bytes(PAGE_SIZE)

_WORDS = struct.Struct("<Q")
_FRAME_MAGIC = struct.pack("<I", 0xFD2FB528)  # what FORMAT_ZSTD1_MAGICLESS leaves out
_PAGE_SIZE_ENTRY = array("Q", [PAGE_SIZE]).tobytes()  # one frame's decompressed size

# A same-filled page (one 8-byte word repeated) compresses to at most 37 bytes in a magicless
# zstd frame at any level from -7 to 22 (measured over random words), so a batch only checks
# pages whose frame is this short for a repeated word (tests/unit/test_codec.py holds it).
SAME_FILL_MAX_FRAME = 64

_page_segments_cache: dict[int, bytes] = {}


def page_segments(count: int) -> bytes:
    """The BufferWithSegments table of ``count`` whole pages laid end to end (cached)."""
    table = _page_segments_cache.get(count)
    if table is None:
        table = _page_segments_cache[count] = frame_segments([PAGE_SIZE] * count)
    return table


class Encoded:
    """One page ready for the pool: how it is stored and what is stored."""

    __slots__ = ("kind", "payload", "fill", "poor")

    def __init__(self, kind: int, payload: Payload, fill: int = 0, poor: bool = False) -> None:
        self.kind = kind  # SAME, COMPRESSED or HUGE
        self.payload = payload  # compressed bytes, the raw page (HUGE), b"" (SAME)
        self.fill = fill  # the repeated 8-byte word (SAME)
        self.poor = poor  # zstd output was not even smaller than the page

    def __repr__(self) -> str:
        return f"Encoded(kind={self.kind}, {len(self.payload)} bytes, fill={self.fill:#x})"


def same_fill(page: bytes) -> int | None:
    """The 8-byte word a page repeats, or None when it is not same-filled."""
    head = page[:8]
    if page == head * (PAGE_SIZE // 8):
        word: int = _WORDS.unpack(head)[0]
        return word
    return None


def fill_page(word: int) -> bytes:
    """The page a same-filled entry stands for."""
    return _WORDS.pack(word) * (PAGE_SIZE // 8)


# Hash and chain tables larger than a page only cost time: zstd clears them for every frame.
# Measured on 64 MiB of real process pages (level 1): the default tables 256 MB/s, sized for
# a 4 KiB source 311 MB/s, capped at 2^12 entries 350 MB/s, with slightly smaller output.
MAX_TABLE_LOG = 12


def page_parameters(level: int, magicless: bool = True) -> zstandard.ZstdCompressionParameters:
    """zstd parameters for one 4 KiB page at ``level``: raw frames (no checksum, size or dict
    id, and unless ``magicless`` is False no magic number: the page table knows the length
    and the page size is fixed), tables sized for a page."""
    tuned = zstandard.ZstdCompressionParameters.from_level(level, source_size=PAGE_SIZE)
    return zstandard.ZstdCompressionParameters(
        format=zstandard.FORMAT_ZSTD1_MAGICLESS if magicless else zstandard.FORMAT_ZSTD1,
        write_content_size=False,
        write_checksum=False,
        write_dict_id=False,
        window_log=tuned.window_log,
        hash_log=min(tuned.hash_log, MAX_TABLE_LOG),
        chain_log=min(tuned.chain_log, MAX_TABLE_LOG),
        search_log=tuned.search_log,
        min_match=tuned.min_match,
        target_length=tuned.target_length,
        strategy=tuned.strategy,
    )


def frame_segments(lengths: list[int]) -> bytes:
    """The (offset, length) table zstandard's BufferWithSegments wants for frames laid end
    to end."""
    table = array("Q")
    offset = 0
    for length in lengths:
        table.extend((offset, length))
        offset += length
    return table.tobytes()


def _uncompressed(state: int, value: Any) -> bytes:
    """A read-plan entry that needs no decompression: raw (HUGE), same-filled, or empty."""
    if state == HUGE:
        page: bytes = value
        return page
    if state == SAME:
        return fill_page(value)
    return ZERO_PAGE


def _inflate(decompressor: zstandard.ZstdDecompressor, payload: bytes) -> bytes:
    page = decompressor.decompress(payload, max_output_size=PAGE_SIZE)
    if len(page) != PAGE_SIZE:
        raise zstandard.ZstdError(f"decompressed to {len(page)} bytes, not a page")
    return page


class _ThreadContexts(threading.local):
    """Each thread's own zstd contexts (zstandard's are not thread-safe), made the first time
    the thread touches them."""

    def __init__(self, params: zstandard.ZstdCompressionParameters) -> None:
        self.compressor = zstandard.ZstdCompressor(compression_params=params)
        self.decompressor = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)
        self.batch_decompressor = zstandard.ZstdDecompressor()  # standard frames only


class Codec:
    """zstd on single pages (see page_parameters).

    Large batches are split in two: one half on the calling thread, the other on a persistent
    worker, each with its own compressor (zstandard releases the GIL inside compress(), and
    measured here this beats multi_compress_to_buffer by ~1.6x on 4 KiB frames).
    """

    def __init__(self, level: int | None = 1, huge_threshold: int = DEFAULT_HUGE_THRESHOLD,
                 threads: int = 2, compressor: str = "zstd") -> None:
        if not 1 <= huge_threshold <= PAGE_SIZE:
            raise ValueError(f"huge_threshold must be 1..{PAGE_SIZE}, got {huge_threshold}")
        self.huge_threshold = huge_threshold
        self.threads = max(1, threads)
        self.compressor = compressor
        self._workers: ThreadPoolExecutor | None = None
        # zstd keeps its own contexts here (page parameters, the batch decoder); the other
        # compressors of zram's set come through cramfs.compressors, one page at a time.
        self._other: PageCompressor | None = None
        self.level: int | None
        if compressor == "zstd":
            self.level = 1 if level is None else level
            self._local = _ThreadContexts(page_parameters(self.level))
        else:
            from cramfs.compressors import make, validate  # compressors imports this module

            self.level = validate(compressor, level)
            self._other = make(compressor, self.level)

    def encode_pages(self, data: bytes | memoryview) -> list[Encoded]:
        """Encode a whole number of pages. Safe to call from several threads at once."""
        count, rest = divmod(len(data), PAGE_SIZE)
        if rest:
            raise ValueError("encode_pages takes whole pages")
        if not isinstance(data, bytes):
            data = bytes(data)
        if count >= PARALLEL_BATCH_PAGES and self.threads > 1:
            return self._spread(self._encode_range, data, count)
        return self._encode_range(data, 0, count)

    def encode_batch(self, data: bytes | memoryview) -> list[Encoded]:
        """``encode_pages`` for the device's hot path: the same kinds, fills and lengths, but
        COMPRESSED payloads are zstandard buffer segments and HUGE payloads memoryview slices
        of ``data`` (no bytes object per page; both have len() and the buffer protocol). A
        zstd batch is one multi_compress_to_buffer call, on ``threads`` C threads with no
        Python per page; only pages whose frame is short enough to be a repeated word get
        the same-fill check. Other compressors, and short batches, go page by page."""
        count, rest = divmod(len(data), PAGE_SIZE)
        if rest:
            raise ValueError("encode_batch takes whole pages")
        if count < PARALLEL_BATCH_PAGES or self._other is not None or self.threads < 2:
            return self.encode_pages(data)
        if not isinstance(data, bytes):
            data = bytes(data)  # the HUGE payloads below must not change under the plan
        frames = cast("Segments", self._local.compressor.multi_compress_to_buffer(
            zstandard.BufferWithSegments(data, page_segments(count)), threads=self.threads))
        view = memoryview(data)
        huge = self.huge_threshold
        unpack = _WORDS.unpack_from
        items: list[Encoded] = []
        append = items.append
        start = 0
        for i in range(count):
            frame = frames[i]
            length = len(frame)
            if length < SAME_FILL_MAX_FRAME:
                page = data[start:start + PAGE_SIZE]
                if page == page[:8] * (PAGE_SIZE // 8):
                    append(Encoded(SAME, b"", unpack(page)[0]))
                    start += PAGE_SIZE
                    continue
            if length < huge:
                append(Encoded(COMPRESSED, frame))
            else:
                append(Encoded(HUGE, view[start:start + PAGE_SIZE], 0, length >= PAGE_SIZE))
            start += PAGE_SIZE
        return items

    def _spread(self, work: Callable[[_T, int, int], list[_R]], items: _T,
                count: int) -> list[_R]:
        """Run ``work(items, start, end)`` over ``count`` items: the first share on the calling
        thread, the others on the persistent workers; results in order."""
        if self._workers is None:
            self._workers = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="cramfs-zstd")
        step = -(-count // self.threads)
        futures = [self._workers.submit(work, items, start, min(count, start + step))
                   for start in range(step, count, step)]
        out = work(items, 0, step)
        for future in futures:
            out.extend(future.result())
        return out

    def decode_pages(self, pages: list[PlanItem]) -> list[bytes]:
        """Pages of a read plan, (state, value) each, back to bytes. Pure; safe on any
        thread."""
        if self._other is not None:
            decompress = self._other.decompress
            return [decompress(value) if state == COMPRESSED else _uncompressed(state, value)
                    for state, value in pages]
        decompressor = self._local.decompressor
        return [_inflate(decompressor, value) if state == COMPRESSED
                else _uncompressed(state, value) for state, value in pages]

    def decode_joined(self, pages: list[PlanItem]) -> bytes:
        """``b"".join(decode_pages(pages))``. A large read is decompressed by zstd's own
        threads in one call, with no Python per page (measured: ~25% faster than one Python
        loop per core). Its batch decoder wants standard frames, so each stored magicless frame
        gets zstd's 4-byte magic number back in front on the way in."""
        compressed = [value for state, value in pages if state == COMPRESSED]
        if len(compressed) < PARALLEL_BATCH_PAGES or self.threads < 2 or self._other:
            return b"".join(self.decode_pages(pages))
        segments = frame_segments([len(payload) + len(_FRAME_MAGIC) for payload in compressed])
        pages_out: Segments | None
        try:
            pages_out = cast("Segments", self._local.batch_decompressor.multi_decompress_to_buffer(
                zstandard.BufferWithSegments(_FRAME_MAGIC + _FRAME_MAGIC.join(compressed),
                                             segments),
                decompressed_sizes=_PAGE_SIZE_ENTRY * len(compressed), threads=self.threads))
        except (zstandard.ZstdError, ValueError):
            pages_out = None  # a corrupt frame: the page-by-page path names the error
        if pages_out is None or pages_out.size() != len(compressed) * PAGE_SIZE:
            return b"".join(self.decode_pages(pages))
        if len(compressed) == len(pages):
            return b"".join(pages_out[i] for i in range(len(compressed)))
        parts: list[bytes | Segment] = []
        next_compressed = 0
        for state, value in pages:
            if state == COMPRESSED:
                parts.append(pages_out[next_compressed])
                next_compressed += 1
            else:
                parts.append(_uncompressed(state, value))
        return b"".join(parts)

    @property
    def batch_reads(self) -> bool:
        """May the device hand this codec a gathered read (``inflate_runs``)?"""
        return self._other is None

    def inflate_runs(self, frames: bytearray, runs: list[Run], out: bytearray) -> None:
        """Decompress gathered frames into ``out``: each run (frames start, frames end, out
        start, out end) is magicless zstd frames laid end to end, each of one page; one
        streaming call per run, no Python per page. Runs are shared between this thread and
        the persistent workers (zstd releases the GIL). Raises zstandard.ZstdError if a run
        does not decompress to exactly its pages (the caller then names the bad page)."""
        if self.threads > 1 and len(runs) > 1:
            self._spread(self._inflate_range, (frames, runs, out), len(runs))
        else:
            self._inflate_range((frames, runs, out), 0, len(runs))

    def _inflate_range(self, work: tuple[bytearray, list[Run], bytearray], first: int,
                       end: int) -> list[object]:
        frames, runs, out = work
        source, target = memoryview(frames), memoryview(out)
        decompressor = self._local.decompressor
        for start, stop, at, until in runs[first:end]:
            reader = decompressor.stream_reader(source[start:stop], read_across_frames=True,
                                                read_size=stop - start)
            if reader.readinto(target[at:until]) != until - at or reader.read(1):
                raise zstandard.ZstdError("a gathered run did not decompress to its pages")
        return []

    def check_frames(self, frames: bytearray, runs: list[Run]) -> None:
        """Decompress gathered frames one at a time (frames carry no lengths, so each is read
        off a stream): raises the first corrupt frame's error."""
        decompressor = self._local.decompressor
        source = memoryview(frames)
        for start, stop, at, until in runs:
            reader = decompressor.stream_reader(source[start:stop], read_across_frames=False)
            for _ in range((until - at) // PAGE_SIZE):
                page = reader.read(PAGE_SIZE)
                if len(page) != PAGE_SIZE:
                    raise zstandard.ZstdError(f"decompressed to {len(page)} bytes, not a page")

    def _encode_range(self, data: bytes, first: int, end: int) -> list[Encoded]:
        return [self.encode_page(data[index * PAGE_SIZE:(index + 1) * PAGE_SIZE])
                for index in range(first, end)]

    def encode_page(self, page: bytes) -> Encoded:
        """One whole page (bytes) ready for the pool."""
        word = same_fill(page)
        if word is not None:
            return Encoded(SAME, b"", word)
        if self._other is None:
            compressed = self._local.compressor.compress(page)
        else:
            compressed = self._other.compress(page)
        if len(compressed) < self.huge_threshold:
            return Encoded(COMPRESSED, compressed)
        return Encoded(HUGE, page, poor=len(compressed) >= PAGE_SIZE)

    def decompress(self, payload: bytes) -> bytes:
        """Inverse of a COMPRESSED payload; raises zstandard.ZstdError (or, for the other
        compressors, cramfs.compressors.CompressorError) on corruption."""
        if self._other is not None:
            return self._other.decompress(payload)
        return _inflate(self._local.decompressor, payload)

    def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(wait=False)
