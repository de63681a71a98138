"""cramfs.compressors: zram's compressor set on single pages -- round trips at every level, sane
sizes, corrupt input, spec parsing, and identical output from several threads at once."""

from __future__ import annotations

import os
import random
import struct
import threading
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cramfs import PAGE_SIZE
from cramfs import compressors as comp
from cramfs.codec import Codec

REQUIRE_ENV = "CRAMFS_REQUIRE_E2E"


def need(name: str) -> None:
    """Skip a test of a compressor whose binding is not installed -- or fail it where CI
    requires every prerequisite (CRAMFS_REQUIRE_E2E=1), so a missing dependency is seen."""
    if comp.available(name):
        return
    reason = f"{name}: its Python binding is not installed"
    if os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0"):
        pytest.fail(f"{reason} and {REQUIRE_ENV}=1", pytrace=False)
    pytest.skip(reason)


def _text_page(seed: int) -> bytes:
    rng = random.Random(seed)
    words = ["page", "swap", "zram", "pool", "kernel", "memory", "compress", "the", "of",
             "and", "to", "struct", "int"]
    text = " ".join(rng.choice(words) for _ in range(1200)).encode()
    return text[:PAGE_SIZE]


def _realish_page(seed: int) -> bytes:
    """A heap-like page: small integers, pointers into one region, some zero padding."""
    rng = random.Random(seed)
    words = []
    for _ in range(PAGE_SIZE // 8):
        kind = rng.random()
        if kind < 0.4:
            words.append(0)
        elif kind < 0.7:
            words.append(0x7F3A_1200_0000 + rng.randrange(1 << 20) * 16)
        else:
            words.append(rng.randrange(1 << 16))
    return struct.pack(f"<{len(words)}Q", *words)


PAGES = {
    "zero": bytes(PAGE_SIZE),
    "same": struct.pack("<Q", 0xDEADBEEFCAFEBABE) * (PAGE_SIZE // 8),
    "text": _text_page(1),
    "realish": _realish_page(2),
    "half": random.Random(3).randbytes(PAGE_SIZE // 2) + bytes(PAGE_SIZE // 2),
    "random": random.Random(4).randbytes(PAGE_SIZE),
}


def _levels(name: str) -> list[int | None]:
    bounds = comp.LEVEL_RANGES[name]
    if bounds is None:
        return [None]
    low, high = bounds
    if high - low <= 40:
        return list(range(low, high + 1))
    return sorted({low, low + 1, 2, 8, 64, 1000, high})  # lz4's acceleration, 1..65537


CASES = [(name, level) for name in comp.NAMES for level in _levels(name)]


@pytest.mark.parametrize(("name", "level"), CASES)
def test_round_trip_every_level(name: str, level: int | None) -> None:
    need(name)
    compressor = comp.make(name, level)
    assert compressor.name == name
    assert compressor.level == comp.validate(name, level)
    for kind, page in PAGES.items():
        payload = compressor.compress(page)
        assert isinstance(payload, bytes)
        assert compressor.decompress(payload) == page, kind


@pytest.mark.parametrize("name", comp.NAMES)
def test_sizes_are_sane(name: str) -> None:
    need(name)
    compressor = comp.make(name)
    size = {kind: len(compressor.compress(page)) for kind, page in PAGES.items()}
    assert size["zero"] < 64
    assert size["same"] < 128
    assert size["text"] < PAGE_SIZE * 0.6
    assert size["realish"] < PAGE_SIZE * 0.9
    assert size["half"] < PAGE_SIZE * 0.6
    assert size["random"] >= PAGE_SIZE  # random pages do not shrink
    assert size["random"] < PAGE_SIZE + 64  # stored, with a little framing


@pytest.mark.parametrize("name", comp.NAMES)
@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=0, max_size=PAGE_SIZE), fill=st.integers(0, 255))
def test_round_trip_any_page(name: str, data: bytes, fill: int) -> None:
    need(name)
    page = data + bytes([fill]) * (PAGE_SIZE - len(data))
    compressor = comp.make(name)
    assert compressor.decompress(compressor.compress(page)) == page


def test_zstd_matches_the_device_codec() -> None:
    """Sizes must match what the devices store: the same page parameters."""
    for level in (-1, 1, 3):
        codec = Codec(level)
        compressor = comp.make("zstd", level)
        for page in (PAGES["text"], PAGES["realish"], PAGES["half"]):
            assert compressor.compress(page) == codec.encode_page(page).payload


def test_deflate_uses_zrams_parameters() -> None:
    """Raw deflate, 2 KiB window, memLevel 9: byte for byte what the kernel would store."""
    page = PAGES["text"]
    stream = zlib.compressobj(6, zlib.DEFLATED, -11, 9)
    assert comp.make("deflate").compress(page) == stream.compress(page) + stream.flush()


def test_lz4_stores_a_bare_block() -> None:
    need("lz4")
    import lz4.block

    page = PAGES["text"]
    payload = comp.make("lz4").compress(page)
    assert payload == lz4.block.compress(page, store_size=False)  # acceleration 1 = default
    assert lz4.block.decompress(payload, uncompressed_size=PAGE_SIZE) == page


def test_lzo_stores_lzo1x_1_without_a_header() -> None:
    need("lzo")
    import lzo

    page = PAGES["text"]
    payload = comp.make("lzo").compress(page)
    assert lzo.compress(page, 1, True)[5:] == payload


@pytest.mark.parametrize("name", comp.NAMES)
def test_corrupt_input_raises(name: str) -> None:
    need(name)
    compressor = comp.make(name)
    good = compressor.compress(PAGES["text"])
    short_page = compressor.compress(PAGES["text"][:3000] + bytes(1096))
    bad_inputs = [b"", b"\xff" * 50, random.Random(5).randbytes(300), good[: len(good) // 2]]
    for bad in bad_inputs:
        with pytest.raises(comp.CompressorError):
            compressor.decompress(bad)
    assert compressor.decompress(short_page)  # still a whole page: fine
    assert issubclass(comp.CompressorError, ValueError)


@pytest.mark.parametrize("name", comp.NAMES)
def test_wrong_sized_output_raises(name: str) -> None:
    """A valid stream of something other than one page is refused, larger or smaller."""
    need(name)
    compressor = comp.make(name)
    for length in (1000, PAGE_SIZE * 2):
        other = _foreign_stream(name, PAGES["text"][:1000] * 9, length)
        with pytest.raises(comp.CompressorError):
            compressor.decompress(other)


def _foreign_stream(name: str, data: bytes, length: int) -> bytes:
    """``length`` bytes of ``data`` compressed in ``name``'s stored format."""
    data = data[:length]
    if name == "zstd":
        import zstandard

        from cramfs.codec import page_parameters

        return zstandard.ZstdCompressor(compression_params=page_parameters(-1)).compress(data)
    if name in ("lz4", "lz4hc"):
        import lz4.block

        return bytes(lz4.block.compress(data, store_size=False))
    if name == "lzo":
        import lzo

        return bytes(lzo.compress(data, 1, False))
    stream = zlib.compressobj(6, zlib.DEFLATED, -11, 9)
    return stream.compress(data) + stream.flush()


def test_compress_takes_whole_pages() -> None:
    with pytest.raises(ValueError, match="4096-byte page"):
        comp.make("zstd").compress(b"x" * 100)


def test_defaults_and_ranges_cover_every_name() -> None:
    assert comp.NAMES == ("zstd", "lz4", "lz4hc", "lzo", "deflate")
    assert set(comp.DEFAULT_LEVELS) == set(comp.NAMES) == set(comp.LEVEL_RANGES)
    assert comp.DEFAULT_LEVELS["zstd"] == -1
    assert comp.DEFAULT_LEVELS["lz4hc"] == 9
    assert comp.DEFAULT_LEVELS["lzo"] is None
    for name in comp.NAMES:
        assert comp.validate(name, None) == comp.DEFAULT_LEVELS[name]


@pytest.mark.parametrize(("text", "expected"), [
    ("zstd", ("zstd", -1)),
    ("zstd:3", ("zstd", 3)),
    ("zstd:-7", ("zstd", -7)),
    ("ZSTD: 5", ("zstd", 5)),
    ("lz4", ("lz4", 1)),
    ("lz4:8", ("lz4", 8)),
    ("lz4hc", ("lz4hc", 9)),
    ("lz4hc:12", ("lz4hc", 12)),
    ("lzo", ("lzo", None)),
    ("deflate", ("deflate", 6)),
    ("deflate:1", ("deflate", 1)),
])
def test_parse_spec(text: str, expected: tuple[str, int | None]) -> None:
    assert comp.parse_spec(text) == expected
    assert comp.parse_spec(comp.format_spec(*expected)) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("lzo-rle", "unknown compressor 'lzo-rle'.*zstd, lz4, lz4hc, lzo, deflate"),
    ("", "unknown compressor ''"),
    ("zstd:fast", "bad level 'fast'.*levels -7..22"),
    ("zstd:", "bad level ''"),
    ("zstd:23", r"zstd level must be an integer in -7\.\.22, got 23"),
    ("lz4hc:0", r"lz4hc level must be an integer in 1\.\.12"),
    ("lz4:0", r"1\.\.65537"),
    ("deflate:10", r"1\.\.9"),
    ("lzo:1", "lzo takes no level"),
    ("lzo:x", "lzo takes no level"),
])
def test_bad_specs_name_the_valid_choices(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        comp.parse_spec(text)
    assert "\n" not in str(info.value)


def test_validate_rejects_bad_levels() -> None:
    with pytest.raises(ValueError, match="unknown compressor"):
        comp.validate("brotli", None)
    with pytest.raises(ValueError, match="takes no level"):
        comp.validate("lzo", 1)
    with pytest.raises(ValueError, match="integer"):
        comp.validate("zstd", True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown compressor"):
        comp.make("lzo-rle")


def test_missing_binding_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module

    def no_lzo(name: str, package: str | None = None) -> object:
        if name == "lzo":
            raise ImportError(name)
        return real(name, package)

    monkeypatch.setattr(comp.importlib, "import_module", no_lzo)
    with pytest.raises(comp.CompressorUnavailable, match="pip install python-lzo"):
        comp.make("lzo")


@pytest.mark.parametrize("name", comp.NAMES)
def test_threads_give_the_single_threaded_output(name: str) -> None:
    need(name)
    pages = [_realish_page(seed) for seed in range(48)] + list(PAGES.values())
    compressor = comp.make(name)
    expected = [compressor.compress(page) for page in pages]
    results: dict[int, tuple[list[bytes], list[bytes]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(index: int) -> None:
        try:
            start.wait()
            order = pages[index:] + pages[:index]  # each thread starts elsewhere
            out = [compressor.compress(page) for page in order]
            back = [compressor.decompress(payload) for payload in out]
            shift = len(pages) - index
            results[index] = (out[shift:] + out[:shift], back[shift:] + back[:shift])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for out, back in results.values():
        assert out == expected
        assert back == pages
