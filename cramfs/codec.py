"""Page codec: same-filled detection, zstd compression in batches, huge-page cut-off.

Compression is a pure function of the page bytes, so it runs on any thread; zstandard
releases the GIL, and ``multi_compress_to_buffer`` spreads a batch over several cores
(seed 002: batch many pages per call, in parallel where the compressor allows).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import zstandard

from cramfs import PAGE_SIZE

# zram stores a page raw ("huge") once its compressed form would land in zsmalloc's
# largest size classes; with 4 KiB pages that cut-off (huge_class_size) is about 3.2 KiB.
DEFAULT_HUGE_THRESHOLD = 3264

# Batches at least this many pages long are compressed by zstd's own worker threads.
PARALLEL_BATCH_PAGES = 16

SAME = 1
COMPRESSED = 2
HUGE = 3

_WORDS = struct.Struct("<Q")
_SEGMENT = struct.Struct("<QQ")


@dataclass(frozen=True, slots=True)
class Encoded:
    """One page ready for the pool: how it is stored and what is stored."""

    kind: int  # SAME, COMPRESSED or HUGE
    payload: bytes  # compressed bytes (COMPRESSED), the raw page (HUGE), b"" (SAME)
    fill: int = 0  # the repeated 8-byte word (SAME)
    poor: bool = False  # zstd output was not even smaller than the page


def same_fill(page: bytes) -> int | None:
    """The 8-byte word a page repeats, or None when it is not same-filled."""
    head = page[:8]
    if page == head * (PAGE_SIZE // 8):
        return _WORDS.unpack(head)[0]
    return None


def fill_page(word: int) -> bytes:
    """The page a same-filled entry stands for."""
    return _WORDS.pack(word) * (PAGE_SIZE // 8)


class Codec:
    """zstd with a raw-block format: no magic, checksum, size or dict id (they cost pool bytes;
    the page table already knows the length and the page size is fixed)."""

    def __init__(self, level: int = 1, huge_threshold: int = DEFAULT_HUGE_THRESHOLD,
                 threads: int = 2) -> None:
        if not 1 <= huge_threshold <= PAGE_SIZE:
            raise ValueError(f"huge_threshold must be 1..{PAGE_SIZE}, got {huge_threshold}")
        self.level = level
        self.huge_threshold = huge_threshold
        self.threads = threads
        params = zstandard.ZstdCompressionParameters.from_level(
            level,
            format=zstandard.FORMAT_ZSTD1_MAGICLESS,
            write_content_size=False,
            write_checksum=False,
            write_dict_id=False,
        )
        self._params = params
        # One compressor per thread is required; multi_compress_to_buffer manages its own.
        self._batch_compressor = zstandard.ZstdCompressor(compression_params=params)
        self._format = zstandard.FORMAT_ZSTD1_MAGICLESS

    def _compressor(self) -> zstandard.ZstdCompressor:
        return zstandard.ZstdCompressor(compression_params=self._params)

    def encode_pages(self, data: bytes | memoryview) -> list[Encoded]:
        """Encode a whole number of pages. Safe to call from several threads at once."""
        count, rest = divmod(len(data), PAGE_SIZE)
        if rest:
            raise ValueError("encode_pages takes whole pages")
        data = bytes(data) if not isinstance(data, bytes) else data
        out: list[Encoded | None] = [None] * count
        todo: list[int] = []
        for index in range(count):
            page = data[index * PAGE_SIZE:(index + 1) * PAGE_SIZE]
            word = same_fill(page)
            if word is not None:
                out[index] = Encoded(SAME, b"", word)
            else:
                todo.append(index)
        if todo:
            for index, compressed in zip(todo, self._compress(data, todo), strict=True):
                out[index] = self._classify(data, index, compressed)
        return out  # type: ignore[return-value]

    def _compress(self, data: bytes, todo: list[int]) -> list[bytes]:
        if len(todo) >= PARALLEL_BATCH_PAGES and self.threads > 1:
            segments = b"".join(_SEGMENT.pack(i * PAGE_SIZE, PAGE_SIZE) for i in todo)
            batch = zstandard.BufferWithSegments(data, segments)
            # A fresh compressor per call: the batch API is not safe to share between threads.
            result = self._compressor().multi_compress_to_buffer(batch, threads=self.threads)
            return [segment.tobytes() for segment in result]
        compressor = self._compressor()
        return [compressor.compress(data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in todo]

    def _classify(self, data: bytes, index: int, compressed: bytes) -> Encoded:
        if len(compressed) < self.huge_threshold:
            return Encoded(COMPRESSED, compressed)
        raw = data[index * PAGE_SIZE:(index + 1) * PAGE_SIZE]
        return Encoded(HUGE, raw, poor=len(compressed) >= PAGE_SIZE)

    def decompress(self, payload: bytes) -> bytes:
        """Inverse of a COMPRESSED payload; raises zstandard.ZstdError on corruption."""
        decompressor = zstandard.ZstdDecompressor(format=self._format)
        page = decompressor.decompress(payload, max_output_size=PAGE_SIZE)
        if len(page) != PAGE_SIZE:
            raise zstandard.ZstdError(f"decompressed to {len(page)} bytes, not a page")
        return page
