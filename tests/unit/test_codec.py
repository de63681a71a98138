"""cramfs.codec: same-filled detection, compression classes, the huge cut-off, batches."""

import os
import struct

import pytest
import zstandard

from cramfs import PAGE_SIZE
from cramfs.codec import (
    COMPRESSED,
    DEFAULT_HUGE_THRESHOLD,
    HUGE,
    PARALLEL_BATCH_PAGES,
    SAME,
    Codec,
    fill_page,
    same_fill,
)


def word_page(word: int) -> bytes:
    return struct.pack("<Q", word) * (PAGE_SIZE // 8)


def text_page(seed: int = 0) -> bytes:
    line = f"line {seed}: the quick brown fox jumps over the lazy dog\n".encode()
    return (line * (PAGE_SIZE // len(line) + 1))[:PAGE_SIZE]


@pytest.fixture
def codec():
    return Codec()


@pytest.mark.parametrize(
    "word", [0, 1, 0xFF, 0xDEADBEEFCAFEBABE, (1 << 64) - 1, 0x0101010101010101])
def test_same_fill_detects_words(word):
    page = word_page(word)
    assert same_fill(page) == word
    assert fill_page(word) == page


def test_zero_page_is_same_filled_with_zero():
    assert same_fill(bytes(PAGE_SIZE)) == 0


@pytest.mark.parametrize("position", [8, 100, PAGE_SIZE - 1, PAGE_SIZE - 8])
def test_one_byte_off_is_not_same_filled(position):
    page = bytearray(word_page(0x1122334455667788))
    page[position] ^= 0x01
    assert same_fill(bytes(page)) is None
    zero = bytearray(PAGE_SIZE)
    zero[position] = 1
    assert same_fill(bytes(zero)) is None


def test_repeating_pattern_longer_than_a_word_is_not_same_filled():
    assert same_fill(b"0123456789abcdef" * (PAGE_SIZE // 16)) is None


def test_encode_same_filled(codec):
    pages = codec.encode_pages(bytes(PAGE_SIZE) + word_page(7))
    assert [(p.kind, p.payload, p.fill) for p in pages] == [(SAME, b"", 0), (SAME, b"", 7)]


def test_encode_compressible_round_trips(codec):
    page = text_page()
    (item,) = codec.encode_pages(page)
    assert item.kind == COMPRESSED
    assert 0 < len(item.payload) < DEFAULT_HUGE_THRESHOLD
    assert not item.poor
    assert codec.decompress(item.payload) == page


def test_raw_format_has_no_zstd_magic(codec):
    (item,) = codec.encode_pages(text_page())
    assert not item.payload.startswith(b"\x28\xb5\x2f\xfd")


def test_random_page_is_huge_and_poor(codec):
    page = os.urandom(PAGE_SIZE)
    (item,) = codec.encode_pages(page)
    assert item.kind == HUGE
    assert item.payload == page
    assert item.poor


def test_huge_cut_off_is_exact():
    page = bytes(range(256)) * 8 + os.urandom(PAGE_SIZE // 2)
    size = len(Codec().encode_pages(page)[0].payload)
    assert size < DEFAULT_HUGE_THRESHOLD
    # A threshold just above the compressed size keeps it compressed; at the size it is huge.
    assert Codec(huge_threshold=size + 1).encode_pages(page)[0].kind == COMPRESSED
    at = Codec(huge_threshold=size).encode_pages(page)[0]
    assert at.kind == HUGE and at.payload == page and not at.poor


@pytest.mark.parametrize("bad", [0, -1, PAGE_SIZE + 1])
def test_bad_huge_threshold(bad):
    with pytest.raises(ValueError):
        Codec(huge_threshold=bad)


@pytest.mark.parametrize("length", [1, PAGE_SIZE - 1, PAGE_SIZE + 1])
def test_encode_needs_whole_pages(codec, length):
    with pytest.raises(ValueError):
        codec.encode_pages(bytes(length))


def test_encode_empty(codec):
    assert codec.encode_pages(b"") == []


@pytest.mark.parametrize("count", [1, PARALLEL_BATCH_PAGES - 1, PARALLEL_BATCH_PAGES, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_batches_keep_order_and_round_trip(count, threads):
    codec = Codec(threads=threads)
    pages = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            pages.append(text_page(i))
        elif kind == 1:
            pages.append(os.urandom(PAGE_SIZE))
        elif kind == 2:
            pages.append(word_page(i))
        else:
            pages.append(bytes(PAGE_SIZE))
    data = b"".join(pages)
    out = codec.encode_pages(memoryview(data))
    assert len(out) == count
    for page, item in zip(pages, out, strict=True):
        if item.kind == SAME:
            assert fill_page(item.fill) == page
        elif item.kind == HUGE:
            assert item.payload == page
        else:
            assert codec.decompress(item.payload) == page


def test_decompress_rejects_garbage(codec):
    with pytest.raises(zstandard.ZstdError):
        codec.decompress(b"\x00\x01garbage")


def test_decompress_rejects_short_page(codec):
    short = zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(
            1, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=False,
            write_checksum=False)).compress(b"abc" * 10)
    with pytest.raises(zstandard.ZstdError):
        codec.decompress(short)


def _plan(codec: Codec, pages: list[bytes]) -> list:
    """A read plan as CompressedDevice.fetch builds it: (state, payload | fill | None)."""
    plan = []
    for item in codec.encode_pages(b"".join(pages)):
        if item.kind == SAME:
            plan.append((SAME, item.fill) if item.fill else (0, None))  # zero: empty entry
        else:
            plan.append((item.kind, item.payload))
    return plan


@pytest.mark.parametrize("compressed", [PARALLEL_BATCH_PAGES - 1, PARALLEL_BATCH_PAGES, 257])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_joined_matches_page_by_page(compressed, threads):
    """Large reads go through zstd's batch decoder; mixed plans keep their order."""
    codec = Codec(threads=threads)
    pages = []
    for i in range(compressed):
        pages.append(text_page(i))
        if i % 5 == 0:
            pages += [os.urandom(PAGE_SIZE), word_page(i + 1), bytes(PAGE_SIZE)]
    plan = _plan(codec, pages)
    assert codec.decode_joined(plan) == b"".join(codec.decode_pages(plan)) == b"".join(pages)
    only_compressed = [entry for entry in plan if entry[0] == COMPRESSED]
    assert codec.decode_joined(only_compressed) == b"".join(
        text_page(i) for i in range(compressed))


def test_decode_joined_reports_a_corrupt_frame():
    codec = Codec(threads=2)
    plan = _plan(codec, [text_page(i) for i in range(2 * PARALLEL_BATCH_PAGES)])
    state, payload = plan[7]
    plan[7] = (state, payload[:-3] + b"\xff\xff\xff")
    with pytest.raises(zstandard.ZstdError):
        codec.decode_joined(plan)
