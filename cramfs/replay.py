"""What-if replay: run a recorded trace through the device model under other settings.

No mount, no root: a replay is the device model fed the trace's records in order, on the
trace's clock. Time-based behaviour (the zero flush, zswap's shrinker, time spent in each
watermark state) follows the recorded times, and throttle delays are counted, never slept, so
the same trace and settings give the same numbers every time.

What does not depend on the device's state runs ahead on a thread of its own: reading and
decompressing the trace's chunks, and compressing the written pages (a pure function of their
bytes and the codec's settings, so the device takes the very encodings it would have made).
The device itself is driven on one thread, in the trace's order. A recorded read is fetched
(checks, counters, poison) but not decompressed: nothing in a replay uses its bytes.

Variant 1 is the device as recorded; there the flushes and writeback batches the daemon
logged are replayed where they happened, which reproduces the live device's final state
exactly. A variant that changes what they depend on gets them synthesized on the trace clock
instead, as the daemon's tasks would have run them. A key a variant sets is pinned: the
trace's own changes to that key are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import importlib
import math
import os
import queue
import tempfile
import threading
import time
import types
import typing
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cramfs import PAGE_SHIFT, PAGE_SIZE
from cramfs.codec import Codec, Encoded
from cramfs.device import CompressedDevice, Counters, DeviceConfig
from cramfs.errors import BackingError, OutOfRange, PoisonedPage, WriteRejected
from cramfs.sizes import format_size, format_size_approx, parse_size
from cramfs.trace import (
    OP_DISCARD,
    OP_EVENT,
    OP_INIT,
    OP_NAMES,
    OP_READ,
    OP_WRITE,
    STATUS_OK,
    RawRecord,
    TraceError,
    TraceReader,
    decode_event,
    status_of,
)
from cramfs.watermarks import EVENT_NAMES, State, validate_marks
from cramfs.zswap import (
    DEFAULT_ACCEPT_THRESHOLD_PERCENT,
    DEFAULT_MAX_POOL_PERCENT,
    ZswapDevice,
    validate_percents,
)

Settings = dict[str, Any]

ZSWAP_KEYS = ("max_pool_percent", "accept_threshold_percent")
# Not settable: the trace's offsets are for the recorded size; media shaping is not replayed
# (the trace's times already include whatever delays the live device imposed).
FIXED_KEYS = {"size": "the trace's offsets are for the recorded size",
              "timing": "media timing is not replayed (the trace's times include it)"}
# Tunables the trace may record that do not change what the device stores (how requests
# and wake-ups are delayed): a replay skips them.
NOT_REPLAYED = frozenset({"timing", "interrupts"})
# Keys that leave pool use alone: a variant changing only these keeps the recorded
# flushes and writeback batches. Anything else changes what those depend on.
WRITE_CONTROL_KEYS = frozenset({"low", "high", "policy", "failure_mode",
                                "throttle_max_delay"})
WRITEBACK_BATCH = 64  # pages per shrinker call, as daemon/main.py's _shrinker
SHRINKER_IDLE = 0.02  # seconds the daemon's shrinker sleeps when it has nothing to do
# Trace seconds one writeback batch is taken to last when synthesized: bounds how many
# batches fit between two records (64 pages decompressed and written to a file, ~1 ms).
BATCH_SECONDS = 0.001
MAX_POINTS = 2000  # timeline length bound; the sampling step doubles to stay under it
FIRST_STEP = 0.01  # seconds of trace time between timeline points, to begin with
GIB = 1 << 30
MM_STAT_FIELDS = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit",
                  "mem_used_max", "same_pages", "pages_compacted", "huge_pages",
                  "huge_pages_since")
IO_STAT_FIELDS = ("failed_reads", "failed_writes", "invalid_io", "notify_free")
TIMING_KEYS = ("cpu_seconds", "cpu_seconds_per_gib", "wall_seconds", "pages_per_second",
               "pass_variants", "initial_seconds")


class ReplayError(Exception):
    """Bad settings or a trace replay cannot use; one line, naming the key or file."""


# -- settings ---------------------------------------------------------------------------------
def setting_types() -> dict[str, Any]:
    """Every settable key and its type: DeviceConfig's fields of a type a command line can
    spell (found at run time, so a field added later is settable without a change here) and
    zswap's percentages."""
    hints = typing.get_type_hints(DeviceConfig)
    types_ = {f.name: hints[f.name] for f in dataclasses.fields(DeviceConfig)
              if f.name not in FIXED_KEYS and _spellable(hints[f.name])}
    types_.update(dict.fromkeys(ZSWAP_KEYS, int))
    return types_


def _spellable(kind: Any) -> bool:
    """Can parse_value read this type from text?"""
    if isinstance(kind, types.UnionType):
        options = [m for m in typing.get_args(kind) if m is not type(None)]
        return len(options) == 1 and _spellable(options[0])
    return kind in (bool, int, float, str) or (isinstance(kind, type)
                                               and issubclass(kind, enum.Enum))


def parse_value(key: str, text: str, kind: Any) -> Any:
    """A value as the config file would take it: sizes with K/M/G/T, numbers, enum names
    (and ``none`` for a field that may be None)."""
    members = typing.get_args(kind) if isinstance(kind, types.UnionType) else ()
    if members:
        if type(None) in members and text.lower() == "none":
            return None
        options = [m for m in members if m is not type(None)]
        if len(options) != 1:
            raise ReplayError(f"{key}: cannot be set in a replay")
        kind = options[0]
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ReplayError(f"{key}: not a boolean: {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return parse_size(text)
        except ValueError as exc:
            raise ReplayError(f"{key}: {exc}") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ReplayError(f"{key}: not a number: {text!r}") from None
        if not math.isfinite(value):
            raise ReplayError(f"{key}: not a finite number: {text!r}")
        return value
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(text)
        except ValueError:
            names = ", ".join(str(member.value) for member in kind)
            raise ReplayError(f"{key}: must be one of {names}, got {text!r}") from None
    if kind is str:
        return text
    raise ReplayError(f"{key}: cannot be set in a replay")


def parse_settings(text: str) -> Settings:
    """``"pool=64M,level=3"`` -> ``{"pool": 67108864, "level": 3}``; one variant."""
    types = setting_types()
    settings: Settings = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise ReplayError(f"--set {text!r}: expected KEY=VALUE[,KEY=VALUE...]")
        if key in FIXED_KEYS:
            raise ReplayError(f"{key}: cannot be changed in a replay: {FIXED_KEYS[key]}")
        if key not in types and key in {f.name for f in dataclasses.fields(DeviceConfig)}:
            raise ReplayError(f"{key}: cannot be set in a replay (not a single value)")
        if key not in types:
            raise ReplayError(f"{key}: unknown setting (known: {', '.join(sorted(types))})")
        if key in settings:
            raise ReplayError(f"{key}: set twice in one variant")
        settings[key] = parse_value(key, value, types[key])
    return settings


def settings_json(settings: Settings) -> dict[str, Any]:
    return {key: value.value if isinstance(value, enum.Enum) else value
            for key, value in settings.items()}


def label(settings: Settings) -> str:
    """A variant's name in tables and plots."""
    if not settings:
        return "as recorded"
    parts = []
    for key, value in settings.items():
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 4096 \
                and value % 1024 == 0:
            value = format_size(value)
        parts.append(f"{key}={value}")
    return ",".join(parts)


# -- building the device ----------------------------------------------------------------------
def from_json(kind: Any, raw: Any) -> Any:
    """A recorded JSON value back as the field's type: enums from their value, dataclasses
    from their dict; a union (``int | None``) is taken as recorded."""
    if raw is None or not isinstance(kind, type):
        return raw
    if dataclasses.is_dataclass(kind):
        return kind(**raw) if isinstance(raw, dict) else raw
    return kind(raw)


def base_config(header: dict[str, Any]) -> tuple[DeviceConfig, list[str]]:
    """The recorded DeviceConfig (tunables as they were when the trace began), and the
    recorded keys this build does not know. Media timing is left out (see FIXED_KEYS)."""
    recorded = header.get("config")
    if not isinstance(recorded, dict):
        raise ReplayError("the trace header has no device configuration")
    hints = typing.get_type_hints(DeviceConfig)
    names = {f.name for f in dataclasses.fields(DeviceConfig)}
    values: dict[str, Any] = {}
    for name in sorted(names - {"timing"}):
        raw = recorded.get(name, header.get(name))
        if raw is None:
            continue
        try:
            values[name] = from_json(hints[name], raw)
        except (TypeError, ValueError):
            raise ReplayError(f"the trace header's {name} is not valid: {raw!r}") from None
    try:
        config = DeviceConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ReplayError(f"the trace header's configuration is not valid: {exc}") from None
    return config, sorted(set(recorded) - names)


def _split(settings: Settings) -> tuple[Settings, Settings]:
    device = {k: v for k, v in settings.items() if k not in ZSWAP_KEYS}
    zswap = {k: v for k, v in settings.items() if k in ZSWAP_KEYS}
    return device, zswap


def build_device(header: dict[str, Any], settings: Settings,
                 workdir: Path) -> CompressedDevice:
    """The device a variant runs on: the recorded one, changed by ``settings``; zswap's
    backing file goes in ``workdir``."""
    kind = header.get("kind")
    device_settings, zswap_settings = _split(settings)
    if zswap_settings and kind != "zswap":
        key = next(iter(zswap_settings))
        raise ReplayError(f"{key}: only for zswap devices (this trace is of a {kind} device)")
    config, _ = base_config(header)
    if "compressor" in device_settings and "level" not in device_settings:
        device_settings["level"] = None  # another compressor: its own default level
    try:
        config = dataclasses.replace(config, **device_settings)
        validate_marks(config.low, config.high)
    except (TypeError, ValueError) as exc:
        raise ReplayError(f"{label(settings)}: {exc}") from None
    if kind != "zswap":
        return _construct(lambda: CompressedDevice(config), settings)
    recorded = header.get("zswap") or {}
    percents = {"max_pool_percent": recorded.get("max_pool_percent",
                                                 DEFAULT_MAX_POOL_PERCENT),
                "accept_threshold_percent": recorded.get("accept_threshold_percent",
                                                         DEFAULT_ACCEPT_THRESHOLD_PERCENT)}
    percents.update(zswap_settings)
    try:
        validate_percents(percents["max_pool_percent"], percents["accept_threshold_percent"])
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    backing = workdir / "backing.img"
    return _construct(lambda: ZswapDevice(config, backing, **percents), settings)


def _construct(make: typing.Callable[[], CompressedDevice],
               settings: Settings) -> CompressedDevice:
    try:
        return make()
    except (ValueError, TypeError, LookupError) as exc:  # the device refused a value
        raise ReplayError(f"{label(settings)}: {exc}") from None


CodecKey = tuple[str, int | None, int]  # compressor, level, huge threshold


def check_settings(header: dict[str, Any], settings: Settings) -> CodecKey:
    """Build (and drop) the variant's device: every value the device would refuse is
    refused here, before any replay starts. Returns what its pages' encodings depend on."""
    with tempfile.TemporaryDirectory(prefix="cramfs-replay-") as workdir:
        device = build_device(header, settings, Path(workdir))
        codec = device.codec
        device.close()
    return codec.compressor, codec.level, codec.huge_threshold


# -- the replay -------------------------------------------------------------------------------
def _after(start: float, step: float, horizon: float) -> float:
    """The first ``start + k * step`` (k >= 1) past ``horizon``."""
    if horizon < start + step:
        return start + step
    return start + step * (math.floor((horizon - start) / step) + 1)


# -- work done ahead of the device ------------------------------------------------------------
AHEAD_CHUNKS = 2  # prepared chunks waiting for the device: memory stays a few chunks' worth
Expected = tuple[bytes, list[Encoded]]  # a write's whole pages and their encodings


class ExpectingCodec(Codec):
    """A device codec that takes the encodings of the next write's whole pages as made ahead
    (``expected``), when it is asked for exactly those bytes; anything else it encodes itself.
    Encoding is a pure function of the bytes and the settings, and the encodings were made by
    a Codec of the same settings with the same call the device would make (encode_batch gives
    encode_page's kinds, fills and bytes per page), so the device stores the same thing."""

    expected: Expected | None = None

    def encode_page(self, page: bytes) -> Encoded:
        expected = self.expected
        if expected is not None and len(expected[1]) == 1 and (
                page is expected[0] or page == expected[0]):
            self.expected = None
            return expected[1][0]
        return super().encode_page(page)

    def encode_batch(self, data: bytes | memoryview) -> list[Encoded]:
        expected = self.expected
        if expected is not None and len(data) == len(expected[0]):
            if type(data) is not bytes:
                data = bytes(data)  # what Codec.encode_batch would copy; compared by memcmp
            if data is expected[0] or data == expected[0]:
                self.expected = None
                return list(expected[1])
        return super().encode_batch(data)


def expecting_codec(device: CompressedDevice) -> tuple[ExpectingCodec, Codec]:
    """Give ``device`` an ExpectingCodec of its codec's settings, and return it with a plain
    one of the same settings for the read-ahead thread (zstd contexts are per thread, and the
    device's codec must not see the thread's calls)."""
    own = device.codec
    settings = (own.level, own.huge_threshold, own.threads, own.compressor)
    own.close()
    codec = device.codec = ExpectingCodec(*settings)
    return codec, Codec(*settings)


Prepared = tuple[list[RawRecord], list[Expected | None]]


def prepare_chunk(records: list[RawRecord], codec: Codec) -> Prepared:
    """A chunk's records with each write's data as bytes (what the daemon hands the device)
    and the encodings of its whole pages: one encode_batch call for the whole chunk, split
    per write afterwards (each page is encoded on its own, so the split changes nothing)."""
    expects: list[Expected | None] = [None] * len(records)
    parts: list[bytes] = []
    spans: list[tuple[int, bytes, int]] = []  # record index, its whole pages, their count
    for index, (op, status, t, offset, length, body) in enumerate(records):
        if body is None or (op != OP_WRITE and op != OP_INIT):
            continue
        data = bytes(body)
        records[index] = (op, status, t, offset, length, data)
        head = offset & (PAGE_SIZE - 1)
        start = min(PAGE_SIZE - head, length) if head else 0
        count = (length - start) >> PAGE_SHIFT
        if count:
            whole = data if start == 0 and count << PAGE_SHIFT == length \
                else data[start:start + (count << PAGE_SHIFT)]
            parts.append(whole)
            spans.append((index, whole, count))
    if parts:
        encoded = codec.encode_batch(parts[0] if len(parts) == 1 else b"".join(parts))
        at = 0
        for index, whole, count in spans:
            expects[index] = (whole, encoded[at:at + count])
            at += count
    return records, expects


def prepared_chunks(reader: TraceReader, codec: Codec) -> Iterator[Prepared]:
    for records in reader.chunks():
        yield prepare_chunk(records, codec)


_DONE = object()


_T = typing.TypeVar("_T")


def ahead(items: Iterator[_T], depth: int = AHEAD_CHUNKS) -> Iterator[_T]:
    """``items``, made on a thread of their own up to ``depth`` ahead of the consumer. An
    exception the thread meets is raised here, in order; a consumer that stops early stops
    the thread.

    What it buys, measured (trace_bench's round, alternating runs on a 2-CPU host): for one
    variant, nothing beyond noise (42.0k against 41.0k pages/s with the pages compressed on
    the device's thread): the thread's Python (parsing, copies, the codec's per-page loop)
    holds the GIL the device model needs, ~0.45 s of a 1.5 s replay. For a pass of several
    variants it compresses each page once while they run: 4 variants 6.1-6.6 s against
    6.0-8.7 s."""
    made: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                made.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put((False, exc))
            return
        put((True, _DONE))

    thread = threading.Thread(target=run, name="cramfs-replay-ahead", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = made.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class _Replay:
    """One variant's run: the device, the trace clock and what the report needs."""

    def __init__(self, device: CompressedDevice, header: dict[str, Any],
                 settings: Settings, path: str | os.PathLike[str] = "<trace>") -> None:
        self.path = os.fspath(path)
        self.device = device
        # set by run_chunk before each write: its pages as encoded ahead (see ExpectingCodec)
        self.codec = device.codec if isinstance(device.codec, ExpectingCodec) else None
        self.replies: dict[int, bytearray] = {}  # large reads' buffers, reused (see _read)
        self.pool = device.pool
        self.watermarks = device.watermarks
        self.pinned = set(settings)
        logged = bool(header.get("background_events"))
        self.flushes_recorded = logged and "zero_flush_interval" not in settings
        self.writeback_recorded = logged and set(settings) <= WRITE_CONTROL_KEYS
        self.zswap = device if isinstance(device, ZswapDevice) else None
        self.flush_every = 0.0 if self.flushes_recorded else device.zero_flush_interval
        self.next_flush = self.flush_every or math.inf
        self.next_shrink = 0.0 if self.zswap and not self.writeback_recorded else math.inf
        self.next_tick = min(self.next_flush, self.next_shrink)
        self.now = 0.0
        self.state_time = dict.fromkeys(State, 0.0)
        self.state_since = 0.0
        self.watermarks.subscribe(self._state_changed)
        self.timeline: list[tuple[float, int]] = []
        self.step = FIRST_STEP
        self.next_sample = 0.0
        self.next_due = 0.0  # min(next_tick, next_sample)
        self.window_peak = 0  # frames
        self.peak_frames = 0  # the pool's peak across mem_used_max resets
        # requests per op code, and bytes per op code under -op
        self.counts = dict.fromkeys((OP_READ, OP_WRITE, OP_DISCARD, -OP_READ, -OP_WRITE,
                                     -OP_DISCARD), 0)
        self.events: Counter[str] = Counter()
        self.ignored: Counter[str] = Counter()
        self.synthesized: Counter[str] = Counter()
        self.changed = 0  # requests whose outcome differs from the recorded one
        self.cpu = 0.0
        self.initial_pages = 0
        self.initial_seconds = 0.0  # restoring the snapshot: not the trace's requests
        self.initial_refused = 0  # snapshot pages this variant's device would not take
        self.initial_done = False
        self.relative = False  # counters count from the trace's start, not the device's
        self.initial_state = header.get("initial") or {}

    # -- the loop ---------------------------------------------------------------------------
    def run_chunk(self, records: list[RawRecord],
                  expects: list[Expected | None] | None = None) -> None:
        """Apply one chunk's records (``expects``: each write's pages as encoded ahead, see
        prepare_chunk). Kept lean: the clock is only looked after when a tick or a timeline
        point is due; state time is kept by a watermark listener."""
        if expects is None or self.codec is None:
            expects = [None] * len(records)
        if not self.initial_done:
            began = time.perf_counter()
            records, expects = self._initial(records, expects)
            self.initial_seconds += time.perf_counter() - began
        device, pool, codec = self.device, self.pool, self.codec
        write, read, discard = self._write, self._read, self._discard
        counts = self.counts
        changed = 0
        started = time.process_time()
        for (op, status, t, offset, length, body), expected in zip(records, expects,
                                                                    strict=True):
            if t > self.now:
                if t >= self.next_due:
                    self._advance(t)
                else:
                    self.now = t
            if op == OP_WRITE:
                if codec is not None:
                    codec.expected = expected
                got = write(device, offset, body)
            elif op == OP_READ:
                got = read(device, offset, length)
            elif op == OP_DISCARD:
                got = discard(device, offset, length)
            elif op == OP_EVENT:
                assert body is not None
                self._event(decode_event(body))
                continue
            else:
                raise TraceError(f"{self.path}: corrupt trace (an initial-state record after "
                                 "the first request)")
            counts[op] += 1
            counts[-op] += length
            if got != status:
                changed += 1
            if pool.used_frames > self.window_peak:
                self.window_peak = pool.used_frames
        self.cpu += time.process_time() - started
        self.changed += changed

    @staticmethod
    def _write(device: CompressedDevice, offset: int, body: bytes | memoryview | None) -> int:
        assert body is not None
        return _outcome(device.write, offset, body)

    def _read(self, device: CompressedDevice, offset: int, length: int) -> int:
        """A read as the device serves it (range, poison, counters, second-chance bits:
        ``fetch``), without ``decode``: decompression changes nothing and nothing here
        reads the bytes. A large read's buffer is reused, as the daemon reuses its replies."""
        size = device.reply_size(offset, length)
        reply = self.replies.pop(size, None)
        try:
            plan = device.fetch(offset, length, reply)
        except (WriteRejected, OutOfRange, PoisonedPage, BackingError) as exc:
            return status_of(exc)
        if plan.out is not None:
            self.replies[size] = plan.out
        return STATUS_OK

    @staticmethod
    def _discard(device: CompressedDevice, offset: int, length: int) -> int:
        return _outcome(device.discard, offset, length)

    def _initial(self, records: list[RawRecord], expects: list[Expected | None]
                 ) -> tuple[list[RawRecord], list[Expected | None]]:
        """Apply the leading snapshot records (the device's contents when the trace began);
        once a request follows, start the counters afresh: they are relative from here."""
        for index, (op, _status, _t, offset, length, body) in enumerate(records):
            if op != OP_INIT:
                self._initial_end()
                return records[index:], expects[index:]
            if self.codec is not None:
                self.codec.expected = expects[index]
            if self._write(self.device, offset, body) != STATUS_OK:
                self.initial_refused += length >> PAGE_SHIFT
            self.initial_pages += length >> PAGE_SHIFT
        return [], []

    def _initial_end(self) -> None:
        """Restore what writes cannot (poisoned and dropped pages, the allocation gate, the
        watermark state as recorded, or as this variant's usage makes it), and make the
        counters relative if the device had served requests before the trace began."""
        self.initial_done = True
        device, state = self.device, self.initial_state
        device.poisoned.update(state.get("poisoned", ()))
        device.lost.update(state.get("lost", ()))
        if state.get("no_alloc"):
            device.no_alloc = True
        if self.zswap is not None:
            self.zswap.limit_reached = bool(state.get("limit_reached", False))
        recorded = state.get("watermark_state")
        if not self.pinned and recorded in {s.value for s in State}:
            self.watermarks.state = State(recorded)
        else:
            self.watermarks.update(self.pool.used_bytes)
        self.relative = bool(self.initial_pages or state.get("requests_before"))
        if self.relative:
            device.counters = Counters()
            self.watermarks.events = dict.fromkeys(EVENT_NAMES, 0)
            self.pool.pages_compacted = 0
            device.reset_max()

    # -- the trace clock --------------------------------------------------------------------
    def _advance(self, t: float) -> None:
        """Move the clock to ``t``, running the synthesized flush and shrinker ticks due by
        then at their own times, and take a timeline point if one is due."""
        while self.next_tick <= t:
            self.now = max(self.now, self.next_tick)
            self._tick(t)
        self.now = t
        if t >= self.next_sample:
            self._sample(t)
        self.next_due = min(self.next_tick, self.next_sample)

    def _state_changed(self, old: State, new: State) -> None:
        """Watermark listener: the state ``old`` lasted from its start until now."""
        self.state_time[old] += self.now - self.state_since
        self.state_since = self.now

    def _tick(self, t: float) -> None:
        """Run what is due at ``next_tick``, with the device as the records before ``t`` left
        it; nothing else changes it before ``t``, so ticks that could only repeat the same
        no-op are skipped."""
        tick = self.next_tick
        if tick >= self.next_flush:
            self.device.flush_releases()
            self.synthesized["flush"] += 1
            # Nothing is parked again before the record at t: skip the empty flushes.
            self.next_flush = _after(tick, self.flush_every, t)
        if tick >= self.next_shrink:
            self.next_shrink = self._shrink(tick, t)
        self.next_tick = min(self.next_flush, self.next_shrink)

    def _shrink(self, tick: float, t: float) -> float:
        """One step of zswap's shrink worker (daemon/main.py's _shrinker) on the trace clock:
        a batch of WRITEBACK_BATCH pages when the pool is above the accept threshold, the
        next one BATCH_SECONDS later; otherwise it checks again SHRINKER_IDLE later. Returns
        when it runs next."""
        zswap = self.zswap
        assert zswap is not None
        if zswap.needs_writeback():
            self.synthesized["writeback"] += 1
            if zswap.writeback(max_pages=WRITEBACK_BATCH):
                return tick + BATCH_SECONDS
        return _after(tick, SHRINKER_IDLE, t)

    def _sample(self, t: float) -> None:
        """One timeline point: the pool's peak since the last point. The step doubles (pairs
        of points merged) whenever the timeline would pass MAX_POINTS."""
        used = self.pool.used_frames
        self.timeline.append((t, max(self.window_peak, used) << PAGE_SHIFT))
        self.window_peak = used
        self.next_sample = t + self.step
        if len(self.timeline) > MAX_POINTS:
            points = self.timeline
            self.timeline = [(points[i][0], max(points[i][1], points[i + 1][1]))
                             for i in range(0, len(points) - 1, 2)]
            self.step *= 2

    # -- control records --------------------------------------------------------------------
    def _event(self, fields: dict[str, Any]) -> None:
        kind = str(fields.pop("kind", ""))
        self.events[kind] += 1
        device = self.device
        if kind == "flush":
            if self.flushes_recorded:
                device.flush_releases()
        elif kind == "writeback":
            if self.writeback_recorded and self.zswap is not None:
                self.zswap.writeback(max_pages=int(fields.get("max_pages", WRITEBACK_BATCH)))
        elif kind == "compact":
            device.compact()
        elif kind == "reset_max":
            self.peak_frames = max(self.peak_frames, self.pool.max_used_frames)
            device.reset_max()
        elif kind == "set":
            self._set(fields)
        elif kind == "fault":
            self._fault(str(fields.get("op", "")))
        else:
            self.ignored[kind] += 1

    def _set(self, fields: dict[str, Any]) -> None:
        """A tunable changed on the live device (attribute file or SIGHUP), applied as the
        daemon applies it: the watermarks together, zswap's limits, a ``set_<key>`` method
        where the device has one, else the attribute. Keys the variant pins are skipped."""
        device = self.device
        todo = {k: v for k, v in fields.items() if k not in self.pinned}
        low, high = todo.pop("low", None), todo.pop("high", None)
        hints = typing.get_type_hints(DeviceConfig)
        try:
            if low is not None or high is not None:
                device.set_watermarks(low=low, high=high)
            for key, raw in todo.items():
                value = from_json(hints[key], raw) if key in hints else raw
                setter = getattr(device, f"set_{key}", None)
                if key in ZSWAP_KEYS and self.zswap is not None:
                    self.zswap.set_limits(**{key: int(value)})
                elif key in NOT_REPLAYED:
                    self.ignored[f"set {key}"] += 1
                elif callable(setter):
                    setter(value)
                elif hasattr(device, key) and type(getattr(device, key)) is type(value):
                    setattr(device, key, value)
                else:
                    self.ignored[f"set {key}"] += 1
        except (TypeError, ValueError):
            self.ignored["set (refused)"] += 1  # e.g. a recorded low above a pinned high

    def _fault(self, op: str) -> None:
        """An injected fault failed a request before it touched the device: count it."""
        counters = self.device.counters
        if op not in counters.injected_errors:
            self.ignored[f"fault {op}"] += 1
            return
        counters.injected_errors[op] += 1
        if op == "read":
            counters.failed_reads += 1
        else:
            counters.failed_writes += 1

    # -- the end ----------------------------------------------------------------------------
    def finish(self, end: float | None) -> None:
        if not self.initial_done:
            self._initial_end()
        final = max(self.now, end or 0.0)
        self._advance(final)
        self.state_time[self.watermarks.state] += final - self.state_since
        self.state_since = final
        self.timeline.append((final, self.pool.used_bytes))


def _outcome(call: typing.Callable[[int, Any], object], offset: int, arg: Any) -> int:
    """The trace status of one request to the device, as the recorder would write it."""
    try:
        call(offset, arg)
    except (WriteRejected, OutOfRange, PoisonedPage, BackingError) as exc:
        return status_of(exc)
    return STATUS_OK


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector off for a replay: a replay makes no cycles worth collecting
    while it runs, but allocates enough for the collector to walk the pool's objects over and
    over. Measured on trace_bench's round (71k pages): 2.77-3.28 s of CPU with it, 2.56-3.01 s
    without, run for run."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def replay(path: str | os.PathLike[str], settings: Settings | None = None) -> dict[str, Any]:
    """One variant: the trace at ``path`` through a device built from its header and
    ``settings``. Deterministic but for the CPU figures (TIMING_KEYS)."""
    return replay_pass(path, [settings or {}])[0]


def replay_pass(path: str | os.PathLike[str], variants: list[Settings]) -> list[dict[str, Any]]:
    """Several variants in one pass over the trace: it is read, decompressed and its pages
    encoded once (ahead, with the first variant's codec), and each chunk goes to every
    variant's device in turn. Only for variants whose devices encode alike (check_settings'
    key): then the encodings are theirs too. Each result is what ``replay`` gives alone, but
    for the timing keys, which are the pass's: its wall time, and the pages of the trace's
    requests it put through all its devices (``pass_variants`` of them) per second of the
    time not spent restoring the snapshot (``initial_seconds``)."""
    wall = time.perf_counter()
    variants = [dict(settings) for settings in variants]
    devices: list[CompressedDevice] = []
    with TraceReader(path) as reader, collector_paused(), \
            tempfile.TemporaryDirectory(prefix="cramfs-replay-") as workdir:
        header = reader.header
        ahead_codec: Codec | None = None
        try:
            runs = []
            for index, settings in enumerate(variants):
                home = Path(workdir) / str(index)  # zswap's backing file, one per device
                home.mkdir()
                devices.append(build_device(header, settings, home))
                _, own_ahead = expecting_codec(devices[-1])
                if ahead_codec is None:
                    ahead_codec = own_ahead
                else:
                    own_ahead.close()
                runs.append(_Replay(devices[-1], header, settings, path))
            assert ahead_codec is not None
            for records, expects in ahead(prepared_chunks(reader, ahead_codec)):
                for run in runs:
                    run.run_chunk(records, expects)
            results = []
            for run, settings in zip(runs, variants, strict=True):
                run.finish(reader.end_time)
                result = _report(run, settings)
                result["trace"] = _trace_summary(reader, run)
                results.append(result)
        finally:
            for device in devices:
                device.close()
            if ahead_codec is not None:
                ahead_codec.close()
    seconds = time.perf_counter() - wall
    # The rate of the trace's requests, as the live device's is: the time spent restoring a
    # snapshot (pages the device held before the trace began) is left out.
    requests_seconds = seconds - sum(run.initial_seconds for run in runs)
    for result, run in zip(results, runs, strict=True):
        moved = run.counts[-OP_WRITE] + run.counts[-OP_READ]
        result["wall_seconds"] = seconds
        result["initial_seconds"] = run.initial_seconds
        result["pages_per_second"] = (moved >> PAGE_SHIFT) * len(runs) / requests_seconds
        result["pass_variants"] = len(runs)
    return results


def _report(run: _Replay, settings: Settings) -> dict[str, Any]:
    device = run.device
    counters = device.counters
    mm_stat = dict(zip(MM_STAT_FIELDS, device.mm_stat(), strict=True))
    written = run.counts[-OP_WRITE]
    result: dict[str, Any] = {
        "label": label(settings),
        "settings": settings_json(settings),
        "mm_stat": mm_stat,
        "io_stat": dict(zip(IO_STAT_FIELDS, device.io_stat(), strict=True)),
        "rejected_writes": dict(counters.rejected),
        "lost_pages": counters.lost_writes + counters.poisoned_writes,
        "lost_pages_by_mode": {"drop": counters.lost_writes, "poison": counters.poisoned_writes},
        "poisoned_pages": sorted(device.poisoned),  # what <dev>/lost_pages would list
        "dropped_pages": sorted(device.lost),
        "watermark_events": dict(device.watermarks.events),
        "final_state": device.watermarks.state.value,
        "time_in_state": {state.value: seconds for state, seconds in run.state_time.items()},
        "peak_pool_bytes": max(run.peak_frames, device.pool.max_used_frames) << PAGE_SHIFT,
        "final_pool_bytes": device.used_bytes,
        "pool_capacity_bytes": device.pool.capacity,
        "low_bytes": device.watermarks.low_bytes(),
        "high_bytes": device.watermarks.high_bytes(),
        "effective_ratio": device.effective_ratio(),
        "compression_ratio": device.compression_ratio(),
        "throttled_writes": counters.throttled_writes,
        "throttle_seconds": counters.throttle_seconds,
        "written_back_pages": counters.written_back_pages,
        "failed_reads": counters.failed_reads,
        "failed_writes": counters.failed_writes,
        "outcomes_changed": run.changed,
        "relative_counters": run.relative,
        "background": _background(run),
        "synthesized_events": dict(run.synthesized),
        "ignored_events": dict(run.ignored),
        "counters": dataclasses.asdict(counters),
        "cpu_seconds": run.cpu,
        "cpu_seconds_per_gib": run.cpu / (written / GIB) if written else None,
        "timeline": run.timeline,
    }
    if run.zswap is not None:
        result["zswap"] = run.zswap.debugfs()
    return result


def _background(run: _Replay) -> dict[str, str]:
    """Where the zero flushes and writeback batches came from: the trace, or the trace
    clock."""
    flush = "none" if not run.device.zero_flush_interval else \
        "recorded" if run.flushes_recorded else "synthesized"
    writeback = "none" if run.zswap is None else \
        "recorded" if run.writeback_recorded else "synthesized"
    return {"zero_flush": flush, "writeback": writeback}


def _trace_summary(reader: TraceReader, run: _Replay) -> dict[str, Any]:
    _, unknown = base_config(reader.header)
    return {
        "path": str(reader.path),
        "header": reader.header,
        "duration": max(run.now, reader.end_time or 0.0),
        "requests": {name: run.counts[op] for op, name in OP_NAMES.items()
                     if op in run.counts and run.counts[op]},
        "bytes": {name: run.counts[-op] for op, name in OP_NAMES.items()
                  if op in run.counts and run.counts[op]},
        "events": dict(run.events),
        "initial_pages": run.initial_pages,
        "initial_refused_pages": run.initial_refused,
        "truncated": reader.truncated,
        "complete": reader.complete,
        "unknown_settings": unknown,
    }


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    with TraceReader(path) as reader:
        return reader.header


def replay_all(path: str | os.PathLike[str], variants: list[Settings],
               jobs: int | None = None) -> list[dict[str, Any]]:
    """Every variant, checked first (a bad value fails before anything runs), then run in
    parallel processes (at most ``jobs`` and the CPU count), each streaming the trace.
    Variants whose pages encode alike share a pass (replay_pass), as long as that leaves a
    process for each CPU: a pool or policy sweep then compresses each page once per process,
    not once per variant. Results in the order of ``variants``."""
    header = read_header(path)
    keys = [check_settings(header, settings) for settings in variants]
    cpus = os.cpu_count() or 1
    workers = max(1, min(len(variants), jobs or cpus, cpus))
    passes = plan_passes(keys, workers)
    work = [[variants[i] for i in indices] for indices in passes]
    if workers == 1:
        done = [replay_pass(path, group) for group in work]
    else:
        with ProcessPoolExecutor(max_workers=workers) as executor:
            done = list(executor.map(replay_pass, [path] * len(work), work))
    results: list[dict[str, Any]] = [{} for _ in variants]
    for indices, group in zip(passes, done, strict=True):
        for index, result in zip(indices, group, strict=True):
            results[index] = result
    return results


def plan_passes(keys: list[CodecKey], workers: int) -> list[list[int]]:
    """Variant indices grouped into passes: variants of one codec key together, the largest
    group halved while there are fewer passes than ``workers`` (so every CPU has one)."""
    groups: dict[CodecKey, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    passes = list(groups.values())
    while len(passes) < workers:
        largest = max(passes, key=len)
        if len(largest) < 2:
            break
        passes.remove(largest)
        half = (len(largest) + 1) // 2
        passes += [largest[:half], largest[half:]]
    return sorted(passes)


# -- output -----------------------------------------------------------------------------------
def public(result: dict[str, Any]) -> dict[str, Any]:
    """A variant's result for --json: without the timeline and the trace summary."""
    return {k: v for k, v in result.items() if k not in ("timeline", "trace")}


def as_json(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"trace": results[0]["trace"], "variants": [public(r) for r in results]}


def _size(value: int) -> str:
    return format_size_approx(value)


def _seconds(value: float) -> str:
    return f"{value:.3f}"


Cell = typing.Callable[[dict[str, Any]], str]
COUNT_FIELDS = ("same_pages", "pages_compacted", "huge_pages", "huge_pages_since")


def _cell(section: str, key: str, show: typing.Callable[[Any], str] = str) -> Cell:
    return lambda result: show(result[section][key])


def _top(key: str, show: typing.Callable[[Any], str] = str) -> Cell:
    return lambda result: show(result[key])


def _per_gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row_cells(results: list[dict[str, Any]]) -> list[tuple[str, Cell]]:
    cells: list[tuple[str, Cell]] = [
        (name, _cell("mm_stat", name, str if name in COUNT_FIELDS else _size))
        for name in MM_STAT_FIELDS]
    cells += [("peak pool", _top("peak_pool_bytes", _size)),
              ("final pool", _top("final_pool_bytes", _size)),
              ("effective ratio", _top("effective_ratio", "{:.2f}".format)),
              ("compression ratio", _top("compression_ratio", "{:.3f}".format))]
    cells += [(f"time {state.value} (s)", _cell("time_in_state", state.value, _seconds))
              for state in State]
    cells += [(f"events {edge}", _cell("watermark_events", edge)) for edge in EVENT_NAMES]
    cells += [(f"rejected {reason}", _cell("rejected_writes", reason))
              for reason in results[0]["rejected_writes"]]
    cells += [("lost pages", _top("lost_pages")),
              ("throttled writes", _top("throttled_writes")),
              ("throttle (s)", _top("throttle_seconds", _seconds)),
              ("written back pages", _top("written_back_pages")),
              ("failed reads", _top("failed_reads")),
              ("failed writes", _top("failed_writes")),
              ("outcomes changed", _top("outcomes_changed")),
              ("final state", _top("final_state")),
              ("CPU s/GiB", _top("cpu_seconds_per_gib", _per_gib))]
    return cells


def render_table(results: list[dict[str, Any]]) -> str:
    """The variants side by side, one column each, under a line about the trace."""
    trace = results[0]["trace"]
    header = trace["header"]
    requests = ", ".join(f"{n} {op}s" for op, n in sorted(trace["requests"].items()))
    lines = [f"trace {trace['path']}: {header.get('kind')} device {header.get('name')}, "
             f"{trace['duration']:.3f} s, {requests or 'no requests'}, "
             f"{_size(trace['bytes'].get('write', 0))} written"]
    if trace["initial_pages"]:
        lines.append(f"note: the device held {trace['initial_pages']} pages when the trace "
                     "began; counters count from the trace's start")
    if trace["truncated"]:
        lines.append("note: the trace ends early (torn or not closed); replayed up to its "
                     "last complete chunk")
    rows = [("", [r["label"] for r in results])]
    rows += [(name, [cell(r) for r in results]) for name, cell in _row_cells(results)]
    width = max(len(name) for name, _ in rows)
    widths = [max(len(values[i]) for _, values in rows) for i in range(len(results))]
    for name, values in rows:
        cells = "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))
        lines.append(f"{name.ljust(width)}  {cells}".rstrip())
    return "\n".join(lines) + "\n"


def load_pyplot() -> Any:
    """matplotlib's pyplot on a file backend, imported only when a plot is asked for."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise ReplayError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def check_plot_path(path: str | os.PathLike[str]) -> None:
    """Refuse a plot target that would not end up where the user said: a directory, or a
    name without ``.png`` (matplotlib would append the format and write beside it)."""
    if os.path.isdir(path):
        raise ReplayError(f"{os.fspath(path)}: is a directory; --plot takes FILE.png")
    if not os.fspath(path).lower().endswith(".png"):
        raise ReplayError(f"{os.fspath(path)}: --plot writes a PNG: name it FILE.png")


def plot(results: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Pool use over trace time, one line per variant, with its low and high watermarks."""
    check_plot_path(path)
    plt = load_pyplot()
    figure, axes = plt.subplots(figsize=(10, 5))
    mib = float(1 << 20)
    for index, result in enumerate(results):
        color = f"C{index % 10}"
        points = result["timeline"]
        axes.plot([p[0] for p in points], [p[1] / mib for p in points], color=color,
                  label=result["label"])
        axes.axhline(result["high_bytes"] / mib, color=color, linestyle="--", linewidth=0.8)
        axes.axhline(result["low_bytes"] / mib, color=color, linestyle=":", linewidth=0.8)
    # Scale to the data: a watermark far above every variant's peak (a pool as large as the
    # device) would flatten all the lines; such a line is left off the visible range.
    peak = max((p[1] for result in results for p in result["timeline"]), default=0) / mib
    marks = [result["high_bytes"] / mib for result in results]
    top = max([peak] + [mark for mark in marks if mark <= 2 * peak])
    axes.set_ylim(0, max(1.0, top * 1.15))
    header = results[0]["trace"]["header"]
    axes.set_title(f"{header.get('name')} ({header.get('kind')}): pool use; "
                   "dashed = high, dotted = low watermark")
    axes.set_xlabel("trace time (s)")
    axes.set_ylabel("pool used (MiB)")
    axes.legend(loc="best")
    figure.tight_layout()
    try:
        figure.savefig(os.fspath(path), dpi=100)
    except OSError as exc:
        raise ReplayError(f"{path}: {exc.strerror}") from None
    finally:
        plt.close(figure)
