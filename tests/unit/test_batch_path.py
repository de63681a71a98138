"""The device's batch paths (one compressor call per request) give exactly what the
page-by-page paths give."""

from __future__ import annotations

import os
import random
import struct

import pytest

from cramfs import PAGE_SIZE
from cramfs.codec import PARALLEL_BATCH_PAGES, SAME_FILL_MAX_FRAME, Codec, page_parameters
from cramfs.device import CompressedDevice, DeviceConfig

P = PAGE_SIZE


def mixed_pages(count: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        kind = i % 6
        if kind == 0:
            out.append(bytes(P))
        elif kind == 1:
            out.append(struct.pack("<Q", rng.getrandbits(64)) * (P // 8))
        elif kind == 2:
            out.append(rng.randbytes(P))  # huge and poor
        elif kind == 3:
            out.append(rng.randbytes(P // 2) + bytes(P // 2))
        else:
            words = [b"alpha ", b"beta ", b"gamma ", b"%d " % rng.getrandbits(12)]
            text = b"".join(rng.choice(words) for _ in range(P))
            out.append(text[:P])
    return b"".join(out)


@pytest.mark.parametrize("level", [-7, -1, 1, 3, 22])
def test_same_filled_frames_are_short(level):
    import zstandard

    comp = zstandard.ZstdCompressor(compression_params=page_parameters(level))
    rng = random.Random(level)
    for _ in range(64):
        word = struct.pack("<Q", rng.getrandbits(64))
        assert len(comp.compress(word * (P // 8))) < SAME_FILL_MAX_FRAME
    for byte in (0, 1, 0xFF):
        assert len(comp.compress(bytes([byte]) * P)) < SAME_FILL_MAX_FRAME


@pytest.mark.parametrize("count", [1, PARALLEL_BATCH_PAGES, 257])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("huge_threshold", [64, 3264, P])
def test_encode_batch_matches_encode_pages(count, threads, huge_threshold):
    codec = Codec(-1, huge_threshold=huge_threshold, threads=threads)
    data = mixed_pages(count, seed=count)
    batch, pages = codec.encode_batch(data), codec.encode_pages(data)
    assert [(e.kind, bytes(e.payload), e.fill, e.poor) for e in batch] == \
        [(e.kind, e.payload, e.fill, e.poor) for e in pages]


@pytest.mark.parametrize("compressor", ["zstd", "deflate"])
@pytest.mark.parametrize("zero_flush", [0.0, 5.0])
def test_large_writes_and_reads_match_page_by_page(compressor, zero_flush):
    pages = 96
    config = dict(size=pages * P, pool=pages * P, compressor=compressor,
                  zero_flush_interval=zero_flush)
    fast, slow = CompressedDevice(DeviceConfig(**config)), CompressedDevice(DeviceConfig(**config))
    try:
        model = bytearray(pages * P)
        rng = random.Random(7)
        for step in range(12):
            count = rng.choice([PARALLEL_BATCH_PAGES, 40, 64])
            first = rng.randrange(0, pages - count)
            data = mixed_pages(count, seed=step)
            fast.commit_write(fast.prepare_write(first * P, data))
            for i in range(count):  # the same bytes, one page at a time
                slow.write((first + i) * P, data[i * P:(i + 1) * P])
            model[first * P:(first + count) * P] = data
            assert fast.decode(fast.fetch(0, pages * P)) == model
            for dev in (fast, slow):
                dev.pool.check()
                assert dev.recount() == {
                    "pages_stored": dev.pages_stored, "same_pages": dev.same_pages,
                    "huge_pages": dev.huge_pages, "compr_data_size": dev.compr_data_size,
                    "backing_pages": 0}
            assert (fast.pages_stored, fast.same_pages, fast.huge_pages, fast.compr_data_size,
                    fast.counters.notify_free, fast.counters.huge_pages_since,
                    fast.counters.reject_compress_poor, len(fast.releasing)) == \
                (slow.pages_stored, slow.same_pages, slow.huge_pages, slow.compr_data_size,
                 slow.counters.notify_free, slow.counters.huge_pages_since,
                 slow.counters.reject_compress_poor, len(slow.releasing))
        # unaligned reads across every kind of page
        for _ in range(20):
            off = rng.randrange(0, pages * P - 1)
            length = rng.randrange(1, min(pages * P - off, 70 * P) + 1)
            assert fast.decode(fast.fetch(off, length)) == model[off:off + length]
            assert fast.read(off, length) == model[off:off + length]
    finally:
        fast.close()
        slow.close()


def test_random_payloads_round_trip_through_batch_read():
    dev = CompressedDevice(DeviceConfig(size=64 * P, pool=64 * P))
    try:
        data = os.urandom(8 * P) + mixed_pages(56)
        dev.commit_write(dev.prepare_write(0, data))
        assert dev.decode(dev.fetch(0, len(data))) == data
    finally:
        dev.close()


def test_a_reused_reply_buffer_gives_the_same_bytes():
    pages = 64
    dev = CompressedDevice(DeviceConfig(size=pages * P, pool=pages * P))
    try:
        data = mixed_pages(pages)
        dev.commit_write(dev.prepare_write(0, data))
        dev.commit_write(dev.prepare_write(5 * P, bytes(20 * P)))  # released: empty pages
        expect = data[:5 * P] + bytes(20 * P) + data[25 * P:]
        for off, length in ((0, pages * P), (P + 3, 40 * P)):
            size = dev.reply_size(off, length)
            stale = bytearray(b"\xa5" * size)
            plan = dev.fetch(off, length, stale, buffer=True)
            assert bytes(dev.decode(plan)) == expect[off:off + length]
            assert dev.decode(dev.fetch(off, length)) == expect[off:off + length]
    finally:
        dev.close()
