"""What zstd alone can do on this machine: the ceiling under any cramfs throughput figure.

zstandard's ``multi_compress_to_buffer`` / ``multi_decompress_to_buffer`` run a whole batch of
4 KiB frames in C on ``threads`` OS threads, with no Python per page, no pool, no page table and
no FUSE. cramfs cannot move pages faster than this at the same level, so a throughput target
above it cannot be met by tuning cramfs, only by a faster codec, a lower level or more cores.
Frames use cramfs's page parameters (codec.page_parameters) but keep zstd's magic number,
because the batch decoder refuses magicless frames; that costs 4 bytes per page and no time.
"""

from __future__ import annotations

import os
import time
from array import array

import zstandard

from cramfs.codec import frame_segments, page_parameters

PAGE = 4096
BATCH = 256  # pages per call: one 1 MiB request, as the FUSE path delivers them
MB = 1e6


def ceiling(data: bytes, level: int, threads: int | None = None, repeat: int = 3) -> dict:
    """Best of ``repeat`` rounds of compressing and decompressing ``data`` (whole pages) in
    1 MiB batches; MB/s each way, and the per-page compression ratio."""
    threads = threads or os.cpu_count() or 1
    usable = len(data) // (BATCH * PAGE) * BATCH * PAGE
    if not usable:
        raise ValueError("ceiling() needs at least 1 MiB of pages")
    compressor = zstandard.ZstdCompressor(
        compression_params=page_parameters(level, magicless=False))
    decompressor = zstandard.ZstdDecompressor()
    page_segments = frame_segments([PAGE] * BATCH)
    sizes = array("Q", [PAGE] * BATCH).tobytes()
    best_c = best_d = float("inf")
    stored = 0
    for _ in range(repeat):
        start = time.perf_counter()
        batches = [compressor.multi_compress_to_buffer(
            zstandard.BufferWithSegments(data[at:at + BATCH * PAGE], page_segments),
            threads=threads) for at in range(0, usable, BATCH * PAGE)]
        best_c = min(best_c, time.perf_counter() - start)
        frames = [[bytes(segment) for segment in batch] for batch in batches]
        stored = sum(min(len(f), PAGE) for batch in frames for f in batch)
        inputs = [zstandard.BufferWithSegments(b"".join(batch),
                                               frame_segments([len(f) for f in batch]))
                  for batch in frames]
        start = time.perf_counter()
        for frames_in in inputs:
            decompressor.multi_decompress_to_buffer(frames_in, decompressed_sizes=sizes,
                                                    threads=threads)
        best_d = min(best_d, time.perf_counter() - start)
    return {"level": level, "threads": threads, "compress_mbs": usable / best_c / MB,
            "decompress_mbs": usable / best_d / MB, "ratio": usable / max(1, stored)}
