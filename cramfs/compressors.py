"""zram's compressor set behind one small interface: compress and decompress one 4 KiB page.

Each compressor stores the minimal stream, as zram does (its page table knows the length and
the page size is fixed): zstd magicless frames with no size or checksum, lz4 blocks without
python-lz4's size prefix, lzo1x streams without python-lzo's header, raw deflate. Levels mean
what they mean to zram's backends (``algorithm_params level=N``):

=========  =====================================  ========  ============  ===================
name       binding                                default   range         GIL released
=========  =====================================  ========  ============  ===================
zstd       python-zstandard (a dependency)        -1        -7..22        yes
lz4        python-lz4, ``lz4.block`` fast mode    1         1..65537      yes
lz4hc      python-lz4, ``high_compression``       9         1..12         yes
lzo        python-lzo, lzo1x_1 (no level)         none      none          yes
deflate    the standard library's zlib            6         1..9          yes
=========  =====================================  ========  ============  ===================

zstd's default is the project's (see daemon/config.py), not the kernel's 3, and its tables are
sized for a page (``cramfs.codec.page_parameters``) so sizes match what the devices store. lz4's
level is its acceleration, as in zram (``LZ4_compress_fast``). deflate uses the kernel's own
parameters (raw stream, 2 KiB window, memLevel 9) so compressed sizes match zram's byte for
byte; the standard library's zlib is used rather than libdeflate for exactly that reason.

Every compressor is safe to call from several threads at once: zstd keeps one context pair per
thread (zstandard's objects are not thread-safe), deflate copies a per-thread primed stream,
and lz4 and lzo are stateless calls (their state lives on the C stack or is allocated per
call). All five bindings release the GIL while they compress or decompress (read in their C
sources); deflate's per-page stream copy (~260 KB of zlib state) runs under it. lz4 and lzo
are imported only when asked for, so a machine without them still has zstd and deflate.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import zlib
from abc import ABC, abstractmethod
from types import ModuleType
from typing import Any

import zstandard

from cramfs import PAGE_SIZE
from cramfs.codec import page_parameters

NAMES: tuple[str, ...] = ("zstd", "lz4", "lz4hc", "lzo", "deflate")

DEFAULT_LEVELS: dict[str, int | None] = {
    "zstd": -1,  # the project's default (daemon/config.py DEFAULT_LEVEL)
    "lz4": 1,  # acceleration: zram's LZ4_ACCELERATION_DEFAULT
    "lz4hc": 9,  # LZ4HC_CLEVEL_DEFAULT
    "lzo": None,  # lzo1x_1 has no level
    "deflate": 6,  # Z_DEFAULT_COMPRESSION
}

# Inclusive (low, high) per name; None: the compressor takes no level.
LEVEL_RANGES: dict[str, tuple[int, int] | None] = {
    "zstd": (-7, 22),  # the range daemon/config.py accepts
    "lz4": (1, 65537),  # LZ4_ACCELERATION_MAX
    "lz4hc": (1, 12),  # LZ4HC_CLEVEL_MAX
    "lzo": None,
    "deflate": (1, 9),
}

# What to install when a binding is missing: (import name, pip name, note).
_BINDINGS = {
    "lz4": ("lz4.block", "lz4", ""),
    "lz4hc": ("lz4.block", "lz4", ""),
    "lzo": ("lzo", "python-lzo", "; it builds against liblzo2-dev"),
}

# zram's deflate backend: raw deflate, 2^11-byte window, the largest memLevel.
DEFLATE_WBITS = -11
DEFLATE_MEMLEVEL = 9


class CompressorError(ValueError):
    """A payload that does not decompress to exactly one page."""


class CompressorUnavailable(RuntimeError):
    """The Python binding a compressor needs is not installed."""


def _names() -> str:
    return ", ".join(NAMES)


def _range_text(name: str) -> str:
    bounds = LEVEL_RANGES[name]
    return "no level" if bounds is None else f"levels {bounds[0]}..{bounds[1]}"


def validate(name: str, level: int | None) -> int | None:
    """The effective level of ``name`` at ``level`` (None: its default); ValueError naming the
    valid names or range otherwise."""
    if name not in NAMES:
        raise ValueError(f"unknown compressor {name!r}: use one of {_names()}")
    bounds = LEVEL_RANGES[name]
    if level is None:
        return DEFAULT_LEVELS[name]
    if bounds is None:
        raise ValueError(f"{name} takes no level, got {level}")
    if isinstance(level, bool) or not isinstance(level, int) or not \
            bounds[0] <= level <= bounds[1]:
        raise ValueError(f"{name} level must be an integer in {bounds[0]}..{bounds[1]}, "
                         f"got {level!r}")
    return level


def parse_spec(text: str) -> tuple[str, int | None]:
    """``"NAME"`` or ``"NAME:LEVEL"`` -> (name, effective level), validated."""
    name, sep, level_text = text.strip().partition(":")
    name = name.strip().lower()
    if name not in NAMES:
        raise ValueError(f"unknown compressor {name!r} in {text!r}: use one of {_names()}, "
                         "optionally as NAME:LEVEL")
    if not sep:
        return name, validate(name, None)
    try:
        level = int(level_text.strip())
    except ValueError:
        raise ValueError(f"bad level {level_text!r} in {text!r}: {name} takes "
                         f"{_range_text(name)}") from None
    return name, validate(name, level)


def format_spec(name: str, level: int | None) -> str:
    """The spec parse_spec reads back: ``NAME`` or ``NAME:LEVEL``."""
    return name if level is None else f"{name}:{level}"


def _binding(name: str) -> ModuleType:
    module, package, note = _BINDINGS[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CompressorUnavailable(f"{name} needs the Python package {package} "
                                    f"(pip install {package}{note})") from None


def _check_page(name: str, page: Any) -> bytes:
    if len(page) != PAGE_SIZE:
        raise CompressorError(f"{name}: decompressed to {len(page)} bytes, not a "
                              f"{PAGE_SIZE}-byte page")
    return bytes(page)


class PageCompressor(ABC):
    """One compressor at one level, on whole 4 KiB pages. Safe for concurrent use."""

    name: str
    level: int | None

    def __init__(self, level: int | None) -> None:
        self.level = level

    def compress(self, page: bytes) -> bytes:
        """The stored form of one whole page: the bare compressed stream."""
        if len(page) != PAGE_SIZE:
            raise ValueError(f"{self.name}: compress takes one {PAGE_SIZE}-byte page, got "
                             f"{len(page)} bytes")
        return self._compress(page)

    @abstractmethod
    def _compress(self, page: bytes) -> bytes:
        """compress() after the size check."""

    @abstractmethod
    def decompress(self, payload: bytes) -> bytes:
        """Exactly one page back; CompressorError on a corrupt or wrong-sized payload."""

    @property
    def spec(self) -> str:
        return format_spec(self.name, self.level)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


class _ZstdContexts(threading.local):
    """One context pair per thread: zstandard's compressor objects are not thread-safe."""

    def __init__(self, params: zstandard.ZstdCompressionParameters) -> None:
        self.compressor = zstandard.ZstdCompressor(compression_params=params)
        self.decompressor = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)


class ZstdPage(PageCompressor):
    """zstd with the device codec's page parameters: magicless frames, no content size.
    Bytes after a complete frame are ignored, as the device codec ignores them."""

    name = "zstd"

    def __init__(self, level: int | None) -> None:
        super().__init__(level)
        assert level is not None
        self._local = _ZstdContexts(page_parameters(level))

    def _compress(self, page: bytes) -> bytes:
        return self._local.compressor.compress(page)

    def decompress(self, payload: bytes) -> bytes:
        try:
            page = self._local.decompressor.decompress(payload, max_output_size=PAGE_SIZE)
        except zstandard.ZstdError as exc:
            raise CompressorError(f"zstd: {exc}") from None
        return _check_page(self.name, page)


class Lz4Page(PageCompressor):
    """lz4 block format without the size prefix; stateless calls (state on the C stack)."""

    name = "lz4"

    def __init__(self, level: int | None) -> None:
        super().__init__(level)
        self._block = _binding(self.name)
        self._options: dict[str, Any] = {"mode": "fast", "acceleration": level}

    def _compress(self, page: bytes) -> bytes:
        out: bytes = self._block.compress(page, store_size=False, **self._options)
        return out

    def decompress(self, payload: bytes) -> bytes:
        try:
            page = self._block.decompress(payload, uncompressed_size=PAGE_SIZE)
        except (self._block.LZ4BlockError, ValueError) as exc:
            raise CompressorError(f"{self.name}: {exc}") from None
        return _check_page(self.name, page)


class Lz4hcPage(Lz4Page):
    """lz4's high-compression mode; the same block format, so the same decompressor."""

    name = "lz4hc"

    def __init__(self, level: int | None) -> None:
        super().__init__(level)
        self._options = {"mode": "high_compression", "compression": level}


class LzoPage(PageCompressor):
    """lzo1x_1 (zram's "lzo") without python-lzo's 5-byte header; stateless calls."""

    name = "lzo"

    def __init__(self, level: int | None) -> None:
        super().__init__(level)
        self._lzo = _binding(self.name)

    def _compress(self, page: bytes) -> bytes:
        out: bytes = self._lzo.compress(page, 1, False)  # level 1: lzo1x_1_compress
        return out

    def decompress(self, payload: bytes) -> bytes:
        try:
            page = self._lzo.decompress(payload, False, PAGE_SIZE)
        except self._lzo.error as exc:
            raise CompressorError(f"lzo: {exc}") from None
        return _check_page(self.name, page)


class _DeflatePrimed(threading.local):
    """A fresh deflate stream per thread, copied for each page: copying is ~1.8x faster than
    deflateInit2 with memLevel 9 (measured), and a stream object is not shared across
    threads."""

    def __init__(self, level: int) -> None:
        self.stream = zlib.compressobj(level, zlib.DEFLATED, DEFLATE_WBITS, DEFLATE_MEMLEVEL)


class DeflatePage(PageCompressor):
    """Raw deflate with zram's parameters (2 KiB window, memLevel 9)."""

    name = "deflate"

    def __init__(self, level: int | None) -> None:
        super().__init__(level)
        assert level is not None
        self._local = _DeflatePrimed(level)

    def _compress(self, page: bytes) -> bytes:
        stream = self._local.stream.copy()
        return stream.compress(page) + stream.flush()

    def decompress(self, payload: bytes) -> bytes:
        stream = zlib.decompressobj(DEFLATE_WBITS)
        try:
            page = stream.decompress(payload, PAGE_SIZE + 1)
        except zlib.error as exc:
            raise CompressorError(f"deflate: {exc}") from None
        if not stream.eof or stream.unused_data:
            raise CompressorError("deflate: not exactly one stream of one page")
        return _check_page(self.name, page)


_CLASSES: dict[str, type[PageCompressor]] = {
    "zstd": ZstdPage, "lz4": Lz4Page, "lz4hc": Lz4hcPage, "lzo": LzoPage,
    "deflate": DeflatePage,
}


def make(name: str, level: int | None = None) -> PageCompressor:
    """A ready compressor; ValueError on a bad name or level, CompressorUnavailable when its
    binding is not installed."""
    effective = validate(name, level)
    return _CLASSES[name](effective)


def available(name: str) -> bool:
    """Is the binding ``name`` needs installed?"""
    if name not in _BINDINGS:
        return name in NAMES
    return importlib.util.find_spec(_BINDINGS[name][0].split(".")[0]) is not None
