"""The compressed block device every device kind stands on (zram-like by itself).

A device is a page table over a bounded pool. Writes are split so the expensive part can run
on worker threads: ``prepare_write`` compresses whole pages (pure, thread-safe), and
``commit_write`` places them (must not run concurrently with another commit or fetch). A commit
is all-or-nothing under the reject and throttle policies: every new object is allocated before
any old one is freed (zram's order), and if one does not fit, the request's allocations are
undone and nothing changes. Reads likewise split into ``fetch`` (copy payloads out of the pool)
and ``decode`` (decompress, any thread).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import zstandard

from cramfs import PAGE_SHIFT, PAGE_SIZE, compressors
from cramfs import codec as enc
from cramfs import pagetable as pt
from cramfs.backing import BackingStore
from cramfs.codec import DEFAULT_HUGE_THRESHOLD, Codec, Encoded, same_fill
from cramfs.errors import BackingError, InjectedFault, OutOfRange, PoisonedPage, WriteRejected
from cramfs.interrupts import InterruptConfig, InterruptLine
from cramfs.timing import Timing, TimingConfig
from cramfs.watermarks import FailureMode, Policy, State, Watermarks
from cramfs.zspool import MAX_FRAMES_PER_BLOCK, PoolExhausted, ZsPool

if TYPE_CHECKING:
    from cramfs.codec import PlanItem, Run

REJECT_WATERMARK = "watermark"
REJECT_FULL = "full"
REJECT_GATE = "gate"  # the allocation gate (no_alloc) is closed
REJECT_REASONS = (REJECT_WATERMARK, REJECT_FULL, REJECT_GATE)
SAFE_RESERVE_BLOCKS = 4  # headroom safe_pages keeps back, in the allocator's largest blocks


@dataclass
class DeviceConfig:
    size: int  # advertised capacity, bytes
    pool: int  # real capacity, bytes
    level: int | None = None  # None: the compressor's default (zstd -1; lzo takes none)
    compressor: str = "zstd"  # one of cramfs.compressors.NAMES
    low: float = 0.80
    high: float = 0.90
    policy: Policy = Policy.REJECT
    failure_mode: FailureMode = FailureMode.POISON
    throttle_max_delay: float = 0.05  # seconds, at pressure 1000
    huge_threshold: int = DEFAULT_HUGE_THRESHOLD
    threads: int = 2
    # Seconds a released (zero-written) page keeps its pool space before the device's
    # batched "media zero" gives it back; 0 frees at once.
    zero_flush_interval: float = 0.0
    timing: TimingConfig = field(default_factory=TimingConfig)
    # Close the allocation gate by itself when the state becomes full (the driver reopens it).
    no_alloc_on_full: bool = False
    interrupts: InterruptConfig = field(default_factory=InterruptConfig)

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % PAGE_SIZE:
            raise ValueError(f"size must be a positive multiple of {PAGE_SIZE}, got {self.size}")
        if self.pool < PAGE_SIZE or self.pool % PAGE_SIZE:
            raise ValueError(f"pool must be a positive multiple of {PAGE_SIZE}, got {self.pool}")
        if self.size >> PAGE_SHIFT >= 1 << 32:
            raise ValueError("size must be below 16 TiB")
        if not 0 <= self.zero_flush_interval <= 3600:
            raise ValueError("zero_flush_interval must be 0..3600 seconds")
        self.level = compressors.validate(self.compressor, self.level)


@dataclass
class Counters:
    """Event counters (monotonic) kept as the device works, never recounted on read."""

    read_requests: int = 0
    write_requests: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    failed_reads: int = 0
    failed_writes: int = 0
    invalid_io: int = 0
    notify_free: int = 0  # pages released: zero writes that freed one, every discarded page
    discard_requests: int = 0  # fallocate(PUNCH_HOLE / ZERO_RANGE) requests served
    discarded_pages: int = 0  # whole pages those requests covered (the node's trim count)
    huge_pages_since: int = 0
    reject_compress_poor: int = 0
    reject_alloc_fail: int = 0
    pool_limit_hit: int = 0
    lost_writes: int = 0  # pages dropped by FailureMode.DROP
    poisoned_writes: int = 0  # pages poisoned by FailureMode.POISON
    throttled_writes: int = 0
    throttle_seconds: float = 0.0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))
    # zswap's debugfs counters (stay 0 on devices without a backing file)
    written_back_pages: int = 0
    reject_reclaim_fail: int = 0
    reject_compress_fail: int = 0
    decompress_fail: int = 0
    backing_write_errors: int = 0
    injected_errors: dict[str, int] = field(
        default_factory=lambda: {"read": 0, "write": 0})


@dataclass(slots=True)
class WritePlan:
    offset: int
    length: int
    first: int  # first page index
    # Encoded for a whole page, (offset in page, bytes) for a partial one (first or last)
    pages: list[Encoded | tuple[int, bytes]]


@dataclass(slots=True)
class WriteResult:
    delay: float = 0.0  # throttle: how long the caller should hold the reply
    lost_pages: int = 0  # FailureMode.DROP / POISON pages in this request


@dataclass(slots=True)
class ReadPlan:
    offset: int
    length: int
    pages: list[PlanItem] | None  # per page: (state, payload bytes | fill word | None)
    # A gathered read (large, zstd): the whole pages already in place in ``out`` except the
    # compressed ones, whose frames sit end to end in ``frames``, decompressed per run.
    out: bytearray | None = None
    frames: bytearray | None = None
    runs: list[Run] | None = None  # (frames start, frames end, out start, out end)
    first: int = 0  # first page index
    buffer: bool = False  # decode may return ``out`` (or a view of it) rather than bytes


Mend = tuple[int, bytes | None, bytes | None]  # page, bytes so far, coverage (None: done)

RELEASED_OWNER = 0xFFFFFFFE  # pool owner of a released slot awaiting the zero flush
_INPLACE = -1  # phase-1 marker: reuse the page's current slot
_FAILED = -2  # phase-1 marker: did not fit
_BACKING = -3  # phase-1 marker: written to the backing file (zswap)


class CompressedDevice:
    """A zram-like device: page table + bounded pool + codec + watermarks."""

    # Keep a referenced bit per stored page (an LRU's second chance; zswap's writeback).
    TRACKS_REFERENCES = False

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.size = config.size
        self.pages = config.size >> PAGE_SHIFT
        self.codec = Codec(config.level, config.huge_threshold, config.threads,
                           config.compressor)
        self.pool = ZsPool(config.pool, largest_compressed=config.huge_threshold)
        self.pool.on_move = self._moved
        self.table = pt.PageTable(self.pages, referenced=self.TRACKS_REFERENCES)
        self.watermarks = Watermarks(self.pool.capacity, config.low, config.high)
        self.interrupts = InterruptLine(config.interrupts)
        # The allocation gate: while closed, writes that need new pool space fail ENOSPC.
        self.no_alloc = False
        self.no_alloc_on_full = config.no_alloc_on_full
        self.watermarks.subscribe(self._state_changed)
        self.policy = config.policy
        self.failure_mode = config.failure_mode
        self.throttle_max_delay = config.throttle_max_delay
        self.counters = Counters()
        # Gauges kept exact on every change, so reading them is O(1).
        self.pages_stored = 0
        self.same_pages = 0
        self.huge_pages = 0
        self.compr_data_size = 0
        self.poisoned: set[int] = set()
        # Partial writes into poisoned pages, kept until the page's whole extent is written:
        # page -> (its bytes so far, one byte per byte: 1 where written).
        self.mending: dict[int, tuple[bytes, bytes]] = {}
        self.lost: set[int] = set()
        self._pending: dict[int, int] = {}
        self.zero_flush_interval = config.zero_flush_interval
        self.releasing: set[int] = set()  # pool handles of released pages awaiting the flush
        self.releasing_bytes = 0
        self.timing = Timing(config.timing)
        # zswap (cramfs.zswap) plugs a backing file in; plain devices have none.
        self.backing: BackingStore | None = None
        self.backing_pages = 0

    # -- ranges -------------------------------------------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.counters.invalid_io += 1
            raise OutOfRange(
                f"I/O of {length} bytes at offset {offset} is outside the device"
                f" ({self.size} bytes)")

    # -- writes -------------------------------------------------------------------------
    def prepare_write(self, offset: int, data: bytes | memoryview) -> WritePlan:
        """Compress the whole pages of a write. Pure; safe on any thread."""
        length = len(data)
        if offset < 0 or offset + length > self.size:
            raise OutOfRange(f"write of {length} bytes at offset {offset} is outside the device")
        first = offset >> PAGE_SHIFT
        pages: list[Encoded | tuple[int, bytes]] = []
        pos = 0
        head = offset & (PAGE_SIZE - 1)
        if head and length:
            take = min(PAGE_SIZE - head, length)
            pages.append((head, bytes(data[:take])))
            pos = take
        whole = (length - pos) // PAGE_SIZE * PAGE_SIZE
        if whole:
            pages.extend(self.codec.encode_batch(data[pos:pos + whole]))
            pos += whole
        if pos < length:
            pages.append((0, bytes(data[pos:])))
        return WritePlan(offset, length, first, pages)

    def precheck_write(self, offset: int, data: bytes | memoryview) -> None:
        """Refuse, before any compression, a write that write control is certain to refuse.

        Under the reject policy in pressure (or with the gate closed), a request is refused as
        soon as one of its pages needs new pool space: a whole page that is not same-filled,
        landing on a page that holds nothing in the pool, certainly does. A kernel retrying
        swap writes against a full device would otherwise pay zstd for every refusal (a
        refused 1 MiB request is ~1 ms of compression). Pages that already hold a slot might
        shrink into it, so they are left to the full way.
        """
        wm = self.watermarks
        self._recheck_full()
        if not data or not self.no_alloc and (self.policy is not Policy.REJECT
                                              or wm.state is State.OK):
            return
        table = self.table
        shift, mask = pt.STATE_SHIFT, table.chunk_mask
        start = -offset & (PAGE_SIZE - 1)
        index = (offset + start) >> PAGE_SHIFT
        meta = table.view(index).meta
        for pos in range(start, len(data) - PAGE_SIZE + 1, PAGE_SIZE):
            slot = index & mask
            if not slot:
                meta = table.view(index).meta
            state = meta[slot] >> shift
            index += 1
            if state == pt.COMPRESSED or state == pt.HUGE:
                continue  # it might shrink into its slot
            if same_fill(bytes(data[pos:pos + PAGE_SIZE])) is None:
                self._refuse()

    def write(self, offset: int, data: bytes | memoryview) -> WriteResult:
        """Check, compress and commit on this thread. One whole aligned page while write
        control is idle (most of a swap-out, one page at a time) takes a short path, for the
        reason given in ``read``; anything else goes the general way."""
        if len(data) == PAGE_SIZE and not offset & (PAGE_SIZE - 1) and 0 <= offset < self.size \
                and self.watermarks.state is State.OK and not self.no_alloc:
            return self._write_page(offset >> PAGE_SHIFT, bytes(data))
        self.check_range(offset, len(data))
        self.precheck_write(offset, data)
        return self.commit_write(self.prepare_write(offset, data))

    def _write_page(self, index: int, page: bytes) -> WriteResult:
        """``commit_write(prepare_write(...))`` for one whole page with the state ok, so with
        no write control and nothing for check_range or precheck_write to refuse. The page is
        encoded once; on a device without a backing file whose page fits, phase 1
        (_place_all) and phase 2 (_apply) run directly, without commit_write's per-request
        steps. A page that does not fit goes through commit_write (compaction, retry, the
        failure policy) already encoded; phase 1 left nothing behind for it to undo."""
        item = self.codec.encode_page(page)
        if self.backing is None:
            placed = self._place_all(index, [item])
            if placed[0] != _FAILED:
                result = WriteResult()
                self._apply(index, [item], placed, result)
                counters = self.counters
                counters.write_requests += 1
                counters.written_bytes += PAGE_SIZE
                self._settle()
                return result
        return self.commit_write(WritePlan(index << PAGE_SHIFT, PAGE_SIZE, index, [item]))

    def commit_write(self, plan: WritePlan) -> WriteResult:
        """Place a prepared write. Raises WriteRejected (ENOSPC) or PoisonedPage (EIO)."""
        counters = self.counters
        first, encoded, mends = self._merge_partials(plan)
        result = WriteResult()
        if not encoded:  # all of it is kept aside for a poisoned page (see _merge_partials)
            self._keep_mends(mends)
            counters.write_requests += 1
            counters.written_bytes += plan.length
            return result
        wm = self.watermarks
        self._recheck_full()
        if self.no_alloc and self._grows(first, encoded):
            self._refuse()
        pool = self.pool
        if (wm.state is State.OK and not self.no_alloc and self.backing is None
                and pool.total_frames - pool.used_frames
                >= len(encoded) + MAX_FRAMES_PER_BLOCK * min(len(encoded), len(pool.classes))):
            # Nothing can refuse this write and every page is certain to fit: one pass.
            self._place_fused(first, encoded)
            if mends:
                self._keep_mends(mends)
            counters.write_requests += 1
            counters.written_bytes += plan.length
            self._settle()
            return result
        if wm.state is not State.OK and self.policy is not Policy.NONE and self._grows(
                first, encoded):
            if self.policy is Policy.REJECT:
                self._refuse()
            result.delay = self.throttle_max_delay * wm.pressure(self.pool.used_bytes) / 1000
            counters.throttled_writes += 1
            counters.throttle_seconds += result.delay
        peak = self.pool.max_used_frames
        try:
            placed = self._place_all(first, encoded)
        except OSError as exc:
            self._undo(peak)
            counters.backing_write_errors += 1
            counters.failed_writes += 1
            raise BackingError(f"backing file write failed: {exc.strerror}") from exc
        failed = [i for i, h in enumerate(placed) if h == _FAILED]
        if failed and self.policy is not Policy.NONE:
            self._undo(peak)
            self.pool.compact()
            placed = self._place_all(first, encoded)
            if any(h == _FAILED for h in placed):
                self._undo(peak)
                counters.reject_alloc_fail += 1
                counters.pool_limit_hit += 1
                self._settle(alloc_failed=True)
                self._reject(REJECT_FULL, "pool full: the write does not fit the real capacity")
        if failed:
            counters.reject_alloc_fail += 1
            counters.pool_limit_hit += 1
        self._apply(first, encoded, placed, result)
        if mends:
            self._keep_mends(mends)
        counters.write_requests += 1
        counters.written_bytes += plan.length
        self._settle(alloc_failed=bool(failed))
        return result

    def _settle(self, alloc_failed: bool = False) -> None:
        """The end of every change: compact what frees left slack in (never inside a commit
        or an undo: moves would re-enter the books half-way), then re-evaluate the
        watermarks."""
        pool = self.pool
        if pool.slack:
            pool.compact_pending()
        self.table.give_back()
        self.watermarks.update(pool.used_bytes, alloc_failed=alloc_failed)

    def _recheck_full(self) -> None:
        """``full`` says one allocation failed; it must not outlive the usage that caused it.
        (One oversized write into a half-empty pool would otherwise block every later write
        until something was freed.) Re-evaluating lets it fall back to pressure or ok."""
        if self.watermarks.state is State.FULL:
            self.watermarks.update(self.pool.used_bytes)

    def _refuse(self) -> None:
        """Write control says no: the gate if it is closed, else the watermark state."""
        state = self.watermarks.state
        if self.no_alloc:
            self._reject(REJECT_GATE, "write control: the allocation gate (no_alloc) is closed")
        reason = REJECT_FULL if state is State.FULL else REJECT_WATERMARK
        self._reject(reason, f"write control: device in {state.value}")

    def _reject(self, reason: str, message: str) -> None:
        self.counters.rejected[reason] += 1
        self.counters.failed_writes += 1
        raise WriteRejected(reason, message)

    def _merge_partials(self, plan: WritePlan) -> tuple[int, list[Encoded], list[Mend]]:
        """The request's pages, all whole: a partial page is merged with what the page holds
        (read-modify-write). A partial write into a poisoned page has nothing to merge with:
        its bytes are kept aside until the page's whole extent has been written, however the
        kernel split it (an O_DIRECT buffer that is not page-aligned arrives as requests that
        end mid-page), and only then does the page take them and lose its poison. Returns
        the first page, the pages to place, and the mends to keep once the request is in."""
        pages = plan.pages
        first = plan.first
        if not pages or (isinstance(pages[0], Encoded) and isinstance(pages[-1], Encoded)):
            # a partial page is only ever first or last
            return first, cast("list[Encoded]", pages), []
        out = list(pages)
        mends: list[Mend] = []
        drop_first = drop_last = False
        for i in sorted({0, len(out) - 1}):
            item = out[i]
            if isinstance(item, Encoded):
                continue
            start, chunk = item
            index = first + i
            if index in self.poisoned:
                kept, kept_cover = self.mending.get(index, (bytes(PAGE_SIZE), bytes(PAGE_SIZE)))
                data, covered = bytearray(kept), bytearray(kept_cover)
                data[start:start + len(chunk)] = chunk
                covered[start:start + len(chunk)] = b"\1" * len(chunk)
                if covered.count(0):
                    mends.append((index, bytes(data), bytes(covered)))
                    drop_first, drop_last = drop_first or i == 0, drop_last or i == len(out) - 1
                    continue
                mends.append((index, None, None))  # complete: the page takes it whole
                out[i] = self.codec.encode_pages(bytes(data))[0]
                continue
            page = bytearray(self._page_bytes(index))
            page[start:start + len(chunk)] = chunk
            out[i] = self.codec.encode_pages(bytes(page))[0]
        if drop_last:
            out.pop()
        if drop_first and out:
            out.pop(0)
            first += 1
        return first, cast("list[Encoded]", out), mends

    def _keep_mends(self, mends: list[Mend]) -> None:
        for index, data, covered in mends:
            if data is None or covered is None:
                self.mending.pop(index, None)
            else:
                self.mending[index] = (data, covered)

    def _grows(self, first: int, encoded: list[Encoded]) -> bool:
        """Does any page need a larger slot than it holds now (new pool space)?"""
        table, pool = self.table, self.pool
        for i, item in enumerate(encoded):
            if item.kind == enc.SAME:
                continue
            index = first + i
            state = table.state(index)
            need = pool.class_of(len(item.payload)).size
            if state not in (pt.COMPRESSED, pt.HUGE) \
                    or pool.slot_size(table.location(index)) < need:
                return True
        return False

    def _place_all(self, first: int, encoded: list[Encoded]) -> list[int]:
        """Phase 1: allocate and fill new slots, touching nothing the table points at."""
        pool, pending, table = self.pool, self._pending, self.table
        class_of, slot_size, alloc_in, write = (pool.class_of, pool.slot_size, pool.alloc_in,
                                                pool.write)
        same, shift, mask = enc.SAME, pt.STATE_SHIFT, table.chunk_mask
        backing = self.backing
        chunk = table.view(first)
        placed = []
        for i, item in enumerate(encoded):
            index = first + i
            slot = index & mask
            if not slot:
                chunk = table.view(index)
            if item.kind == same:
                placed.append(0)
                continue
            payload = item.payload
            cls = class_of(len(payload))
            state = chunk.meta[slot] >> shift
            old_size = slot_size(chunk.loc[slot]) if state == pt.COMPRESSED \
                or state == pt.HUGE else 0
            if backing is not None and not self._pool_accepts(item):
                self._write_backing(index, item)
                placed.append(_BACKING)
                continue
            if old_size == cls.size:
                placed.append(_INPLACE)
                continue
            try:
                handle = alloc_in(cls, index)
            except PoolExhausted:
                if backing is not None:
                    self.counters.reject_alloc_fail += 1
                    self._write_backing(index, item)
                    placed.append(_BACKING)
                    continue
                placed.append(_INPLACE if old_size >= len(payload) else _FAILED)
                continue
            write(handle, payload)
            pending[index] = handle
            placed.append(handle)
        return placed

    def _place_fused(self, first: int, encoded: list[Encoded]) -> None:
        """Phase 1 and phase 2 in one pass over the pages, for a write that nothing can
        refuse and that is certain to fit (commit_write checks both: the state is ok, the gate
        open, no backing file, and the pool has a frame per page plus a fresh block per size
        class free). Each page gets its new object and then gives up its old one, as zram does
        page by page; the books end exactly as _place_all + _apply leave them."""
        table, pool, counters = self.table, self.pool, self.counters
        class_of, store, write, slot_size = pool.class_of, pool.store, pool.write, pool.slot_size
        forget = self._forget
        same_kind, huge_kind = enc.SAME, enc.HUGE
        compressed_state, huge_state = pt.COMPRESSED, pt.HUGE
        shift, mask = pt.STATE_SHIFT, table.chunk_mask
        same_meta = pt.SAME << shift
        defer_zero = bool(self.zero_flush_interval)
        marked = bool(self.poisoned or self.lost)
        chunk = table.writable(first)
        meta, loc, referenced = chunk.meta, chunk.loc, chunk.ref
        stored = same = huge = compr = notify = huge_since = poor = 0
        index = first
        for item in encoded:
            if marked:
                self.poisoned.discard(index)
                self.lost.discard(index)
            slot = index & mask
            if not slot:
                chunk = table.writable(index)
                meta, loc, referenced = chunk.meta, chunk.loc, chunk.ref
            m = meta[slot]
            if item.kind == same_kind:
                fill = item.fill
                if fill == 0:  # a release (our discard): the entry stays empty
                    if m:
                        forget(index, free=not defer_zero, defer=defer_zero)
                        notify += 1
                else:
                    if m:
                        forget(index, free=True)
                    meta[slot] = same_meta
                    loc[slot] = fill
                    same += 1
                    stored += 1
                index += 1
                continue
            payload = item.payload
            length = len(payload)
            cls = class_of(length)
            state = m >> shift
            if state in (compressed_state, huge_state):
                handle = loc[slot]
                if slot_size(handle) == cls.size:
                    forget(index, free=False)
                    write(handle, payload)
                else:
                    handle = store(cls, index, payload)
                    forget(index, free=True)
            else:
                if m:
                    forget(index, free=True)
                handle = store(cls, index, payload)
            if item.kind == huge_kind:
                meta[slot] = (huge_state << shift) | length
                huge += 1
                huge_since += 1
                poor += item.poor
            else:
                meta[slot] = (compressed_state << shift) | length
            loc[slot] = handle
            if referenced is not None:
                referenced[slot] = 1
            compr += length
            stored += 1
            index += 1
        self.pages_stored += stored
        self.same_pages += same
        self.huge_pages += huge
        self.compr_data_size += compr
        counters.notify_free += notify
        counters.huge_pages_since += huge_since
        counters.reject_compress_poor += poor

    def _pool_accepts(self, item: Encoded) -> bool:
        """May this page go to the pool? (zswap's limit and hysteresis live here.)"""
        return True

    def _write_backing(self, index: int, item: Encoded) -> None:
        assert self.backing is not None
        # From encode_batch the payload is a buffer (a memoryview slice, a zstd BufferSegment),
        # not bytes: zstd's decompress and os.pwrite take any buffer, though Codec.decompress
        # and BackingStore.write say bytes (other compressors' payloads are always bytes).
        payload = cast("bytes", item.payload)
        raw = payload if item.kind == enc.HUGE else self.codec.decompress(payload)
        self.backing.write(index, raw)

    def _undo(self, peak: int) -> None:
        pending = self._pending
        for index in list(pending):
            self.pool.free(pending.pop(index))
        # Undone slots were never in use: like zram, a refused write leaves mem_used_max alone.
        self.pool.max_used_frames = max(peak, self.pool.used_frames)

    def _apply(self, first: int, encoded: list[Encoded], placed: list[int],
               result: WriteResult) -> None:
        """Phase 2: point the table at the new objects and free the old ones."""
        table, pool, pending, counters = self.table, self.pool, self._pending, self.counters
        shift, mask = pt.STATE_SHIFT, table.chunk_mask
        chunk = table.writable(first)
        for i, item in enumerate(encoded):
            index = first + i
            slot = index & mask
            if not slot:
                chunk = table.writable(index)
            marker = placed[i]
            if marker == _FAILED:
                result.lost_pages += 1
                if self.failure_mode is FailureMode.DROP:
                    counters.lost_writes += 1
                    self.lost.add(index)
                    continue
                counters.poisoned_writes += 1
                self._forget(index, free=True)
                self.poisoned.add(index)
                self.mending.pop(index, None)  # freshly poisoned: nothing is kept for it yet
                continue
            kind = item.kind
            meta, loc = chunk.meta, chunk.loc
            was_empty = meta[slot] == 0
            if marker == _BACKING:
                self._forget(index, free=True, keep_backing=True)
                meta[slot] = (pt.BACKING << shift) | PAGE_SIZE
                loc[slot] = 0
                self.backing_pages += 1
                self.pages_stored += 1
                self.poisoned.discard(index)
                self.lost.discard(index)
                continue
            if marker == _INPLACE:
                handle = loc[slot]
                self._forget(index, free=False)
                pool.write(handle, item.payload)
            else:
                handle = pending.pop(index, 0)
                if not was_empty:
                    defer = bool(kind == enc.SAME and item.fill == 0
                                 and self.zero_flush_interval)
                    self._forget(index, free=not defer, defer=defer)
            if self.poisoned or self.lost:
                self.poisoned.discard(index)
                self.lost.discard(index)
            if kind == enc.SAME:
                if item.fill == 0:
                    # A zero page is a release (our discard): the entry stays empty.
                    counters.notify_free += not was_empty
                    continue
                meta[slot] = pt.SAME << shift
                loc[slot] = item.fill
                self.same_pages += 1
            else:
                length = len(item.payload)
                state = pt.COMPRESSED if kind == enc.COMPRESSED else pt.HUGE
                meta[slot] = (state << shift) | length
                loc[slot] = handle
                if chunk.ref is not None:
                    chunk.ref[slot] = 1
                self.compr_data_size += length
                if kind == enc.HUGE:
                    self.huge_pages += 1
                    counters.huge_pages_since += 1
                    if item.poor:
                        counters.reject_compress_poor += 1
            self.pages_stored += 1

    def _forget(self, index: int, free: bool, defer: bool = False,
                keep_backing: bool = False) -> None:
        """Drop a page's contents from the books; free its slot if ``free``, or park the slot
        for the next zero flush if ``defer`` (the slot is reused in place otherwise). A page
        leaving the backing file gets its block punched out, unless ``keep_backing`` (it was
        just rewritten there)."""
        table = self.table
        chunk = table.view(index)
        slot = index & table.chunk_mask
        entry = chunk.meta[slot]
        if not entry:
            return
        state = entry >> pt.STATE_SHIFT
        self.pages_stored -= 1
        if state == pt.SAME:
            self.same_pages -= 1
        elif state == pt.BACKING:
            self.backing_pages -= 1
            if not keep_backing and self.backing is not None:
                self.backing.punch(index)
        elif state in (pt.COMPRESSED, pt.HUGE):
            self.compr_data_size -= entry & pt.LENGTH_MASK
            if state == pt.HUGE:
                self.huge_pages -= 1
            handle = chunk.loc[slot]
            if defer:
                self.pool.set_owner(handle, RELEASED_OWNER)
                self.releasing.add(handle)
                self.releasing_bytes += self.pool.slot_size(handle)
            elif free:
                self.pool.free(handle)
        table.clear(index)

    # -- discard --------------------------------------------------------------------------
    def discard(self, offset: int, length: int) -> int:
        """Release ``[offset, offset + length)``: the kernel's discard, which reaches a file
        as fallocate(PUNCH_HOLE | KEEP_SIZE) or ZERO_RANGE (the loop driver turns a freed swap
        cluster into one). Afterwards the whole range reads back as zeros. As zram's
        discard, every whole page leaves the books and the pool (or, with
        ``zero_flush_interval``, waits for the next media zero, as a zero write does) and
        counts in notify_free; poison and loss go with the contents. Unlike zram, which skips
        them, the partial pages at the edges are zeroed in place: a file's hole must read as
        zeros. The edges are placed first and all-or-nothing, so a discard refused for want
        of pool space (ENOSPC; it can only happen when zeroing part of a page makes it
        compress worse) changes nothing. Write control never refuses a discard: it releases.
        Returns the number of pages that held data and were released."""
        self.check_range(offset, length)
        counters = self.counters
        end = offset + length
        first = -(-offset >> PAGE_SHIFT)  # first whole page
        stop = end >> PAGE_SHIFT  # one past the last whole page
        head, tail = offset & (PAGE_SIZE - 1), end & (PAGE_SIZE - 1)
        edges = []  # (page index, start, length) to zero in place
        if not length:
            pass
        elif first > stop:  # inside one page
            edges.append((stop, head, length))
        else:
            if head:
                edges.append((first - 1, head, PAGE_SIZE - head))
            if tail:
                edges.append((stop, 0, tail))
        self._zero_edges(edges)
        counters.discard_requests += 1
        released = 0
        if stop > first:
            released = self._release_pages(first, stop)
            counters.notify_free += stop - first
            counters.discarded_pages += stop - first
        self._settle()
        return released

    def _zero_edges(self, edges: list[tuple[int, int, int]]) -> None:
        """Zero part of each page in ``edges``, all or none (see ``discard``)."""
        todo = []
        for index, start, count in edges:
            if index in self.poisoned:  # as a partial write: its other bytes are gone
                self.counters.failed_writes += 1
                raise PoisonedPage(index)
            if self.table.entry(index) == 0:
                continue  # nothing stored: it reads as zeros already
            page = bytearray(self._page_bytes(index))
            page[start:start + count] = bytes(count)
            todo.append((index, self.codec.encode_page(bytes(page))))
        if not todo:
            return
        peak = self.pool.max_used_frames
        try:
            placed = self._place_edges(todo)
            if any(marker[0] == _FAILED for marker in placed):
                self._undo(peak)
                self.pool.compact()
                placed = self._place_edges(todo)
                if any(marker[0] == _FAILED for marker in placed):
                    self._undo(peak)
                    self.counters.pool_limit_hit += 1
                    self._reject(REJECT_FULL, "pool full: zeroing part of a page does not fit")
        except OSError as exc:
            self._undo(peak)
            self.counters.backing_write_errors += 1
            self.counters.failed_writes += 1
            raise BackingError(f"backing file write failed: {exc.strerror}") from exc
        result = WriteResult()
        for (index, item), marker in zip(todo, placed, strict=True):
            self._apply(index, [item], marker, result)

    def _place_edges(self, todo: list[tuple[int, Encoded]]) -> list[list[int]]:
        return [self._place_all(index, [item]) for index, item in todo]

    def _release_pages(self, first: int, stop: int) -> int:
        """Drop pages ``first .. stop - 1`` from the books: the whole-page half of discard.
        Only allocated chunks are visited (a discard can cover the whole advertised size:
        swapon discards the device)."""
        table = self.table
        defer = bool(self.zero_flush_interval)
        released = 0
        forget = self._forget
        for number in table.chunk_numbers(first, stop):
            meta = table.chunks[number].meta
            base = number << table.chunk_shift
            lo, hi = max(first - base, 0), min(stop - base, table.chunk_pages)
            if meta[lo:hi].count(0) == hi - lo:
                continue
            for slot in range(lo, hi):
                if meta[slot]:
                    forget(base + slot, free=not defer, defer=defer)
                    released += 1
        if self.poisoned or self.lost:
            for pages in (self.poisoned, self.lost):
                for index in [i for i in pages if first <= i < stop]:
                    pages.discard(index)
        return released

    def flush_releases(self) -> int:
        """The device's batched media zero: free every parked slot; returns pages freed."""
        count = len(self.releasing)
        while self.releasing:
            self.pool.free(self.releasing.pop())
        self.releasing_bytes = 0
        if count:
            self._settle()
        return count

    # -- timing and faults ----------------------------------------------------------------
    def inject_fault(self, op: str) -> None:
        """Fail this request (before it touches data) if the error rate says so."""
        if self.timing.should_fail(op):
            self.counters.injected_errors[op] += 1
            if op == "read":
                self.counters.failed_reads += 1
            else:
                self.counters.failed_writes += 1
            raise InjectedFault(f"injected {op} error")

    def io_delay(self, op: str, nbytes: int) -> float:
        return self.timing.delay(op, nbytes)

    def _moved(self, owner: int, old: int, new: int) -> None:
        if owner == RELEASED_OWNER:
            self.releasing.discard(old)
            self.releasing.add(new)
        elif self._pending.get(owner) == old:
            self._pending[owner] = new
        else:
            self.table.set_location(owner, new)

    # -- reads --------------------------------------------------------------------------
    def fetch(self, offset: int, length: int, out: bytearray | None = None,
              buffer: bool = False) -> ReadPlan:
        """Copy what a read needs out of the pool (caller's thread, between commits).
        ``out``: a buffer of the read's whole pages (``reply_size``) the caller may hand in
        for a large read to be decoded into, instead of a new one (a fresh megabyte costs
        a page fault per page); its old contents do not matter. ``buffer``: decode may
        return that buffer (the plan's ``out``) or a view of it instead of bytes."""
        self.check_range(offset, length)
        table = self.table
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT if length else first - 1
        if last - first + 1 >= enc.PARALLEL_BATCH_PAGES and self.codec.batch_reads:
            plan = self._gather(offset, length, first, last + 1, out)
            plan.buffer = buffer
            return plan
        pages = []
        for index in range(first, last + 1):
            if index in self.poisoned:
                self.counters.failed_reads += 1
                raise PoisonedPage(index)
            pages.append(self._page_item(index))
            table.reference(index)
        self.counters.read_requests += 1
        self.counters.read_bytes += length
        return ReadPlan(offset, length, pages)

    @staticmethod
    def reply_size(offset: int, length: int) -> int:
        """Bytes of the whole pages a read of ``length`` at ``offset`` touches."""
        if length <= 0:
            return 0
        return (((offset + length - 1) >> PAGE_SHIFT) - (offset >> PAGE_SHIFT) + 1) << PAGE_SHIFT

    def _gather(self, offset: int, length: int, first: int, stop: int,
                out: bytearray | None = None) -> ReadPlan:
        """fetch for a large read: every page that needs no decompression is written straight
        into the reply buffer (empty pages are its zeros), and the compressed ones are copied
        out of the pool end to end, one run per stretch of consecutive compressed pages (cut
        in the middle so two threads can share them)."""
        table, pool = self.table, self.pool
        chunk = table.view(first)
        meta, loc, referenced = chunk.meta, chunk.loc, chunk.ref
        poisoned = self.poisoned
        shift, mask, chunk_mask = pt.STATE_SHIFT, pt.LENGTH_MASK, table.chunk_mask
        compressed_state, huge_state = pt.COMPRESSED, pt.HUGE
        reused = out is not None and len(out) == (stop - first) << PAGE_SHIFT
        if not reused:
            out = bytearray((stop - first) << PAGE_SHIFT)
        assert out is not None
        zero = enc.ZERO_PAGE
        handles: list[int] = []  # the compressed pages, copied out in one pool call at the end
        sizes: list[int] = []
        filled = 0  # bytes of compressed frames so far
        runs = []
        run_start = run_at = -1  # frames offset and out offset of the open run
        middle = first + (stop - first) // 2
        at = 0
        for index in range(first, stop):
            if poisoned and index in poisoned:
                self.counters.failed_reads += 1
                raise PoisonedPage(index)
            slot = index & chunk_mask
            if not slot:
                chunk = table.view(index)
                meta, loc, referenced = chunk.meta, chunk.loc, chunk.ref
            m = meta[slot]
            state = m >> shift
            if state == compressed_state:
                if run_start >= 0 and index == middle:
                    runs.append((run_start, filled, run_at, at))
                    run_start = -1
                if run_start < 0:
                    run_start, run_at = filled, at
                size = m & mask
                handles.append(loc[slot])
                sizes.append(size)
                filled += size
            else:
                if run_start >= 0:
                    runs.append((run_start, filled, run_at, at))
                    run_start = -1
                if state == huge_state:
                    out[at:at + PAGE_SIZE] = pool.read(loc[slot], PAGE_SIZE)
                elif state:
                    item_state, value = self._page_item(index)
                    out[at:at + PAGE_SIZE] = enc._uncompressed(item_state, value)
                elif reused:
                    out[at:at + PAGE_SIZE] = zero
            if referenced is not None:
                referenced[slot] = 1
            at += PAGE_SIZE
        if run_start >= 0:
            runs.append((run_start, filled, run_at, at))
        frames = pool.gather(handles, sizes)
        self.counters.read_requests += 1
        self.counters.read_bytes += length
        return ReadPlan(offset, length, None, out, frames, runs, first)

    def _inflate_plan(self, plan: ReadPlan) -> bytearray:
        """The whole pages of a gathered plan. A run that fails to decompress is retried
        page by page from the frames, so the error names the corrupt page as before."""
        assert plan.out is not None and plan.runs is not None and plan.frames is not None
        try:
            self.codec.inflate_runs(plan.frames, plan.runs, plan.out)
        except (zstandard.ZstdError, ValueError):
            self.codec.check_frames(plan.frames, plan.runs)  # raises the page's error
            raise
        return plan.out

    def decode(self, plan: ReadPlan) -> bytes:
        """Decompress a fetched read. Pure; safe on any thread. For a plan fetched with
        ``buffer=True`` the result may be the plan's reply buffer (a bytearray) or a
        memoryview of it, without the copy into bytes."""
        if plan.out is not None:
            data = self._inflate_plan(plan)
            start = plan.offset & (PAGE_SIZE - 1)
            if not plan.buffer:
                return bytes(memoryview(data)[start:start + plan.length])
            if start == 0 and len(data) == plan.length:
                return data  # type: ignore[return-value]  # bytes-like, as asked
            return memoryview(data)[start:start + plan.length]  # type: ignore[return-value]
        assert plan.pages is not None  # fetch sets pages or out
        joined = self.codec.decode_joined(plan.pages)
        start = plan.offset & (PAGE_SIZE - 1)
        if start == 0 and len(joined) == plan.length:
            return joined
        return joined[start:start + plan.length]

    def read(self, offset: int, length: int) -> bytes:
        """``decode(fetch(offset, length))``, on this thread. A read inside one page (swap-in
        asks for one 4 KiB page at a time) takes a short cut with the same checks, counters
        and bytes: in the daemon, the kernel's and the client's work between two requests
        leaves the CPU caches cold, and every extra Python call then costs far more than in a
        loop (measured through FUSE: the general path made a 4 KiB read ~20% slower)."""
        index = offset >> PAGE_SHIFT
        if offset < 0 or length <= 0 or offset + length > self.size \
                or (offset + length - 1) >> PAGE_SHIFT != index:
            return self.decode(self.fetch(offset, length))
        if self.poisoned and index in self.poisoned:
            self.counters.failed_reads += 1
            raise PoisonedPage(index)
        table = self.table
        chunk = table.view(index)
        slot = index & table.chunk_mask
        meta = chunk.meta[slot]
        if meta >> pt.STATE_SHIFT == pt.COMPRESSED:
            page = self.codec.decompress(self.pool.read(chunk.loc[slot], meta & pt.LENGTH_MASK))
        else:
            page = self.codec.decode_pages([self._page_item(index)])[0]
        if chunk.ref is not None:
            chunk.ref[slot] = 1
        counters = self.counters
        counters.read_requests += 1
        counters.read_bytes += length
        if length == PAGE_SIZE:
            return page
        start = offset & (PAGE_SIZE - 1)
        return page[start:start + length]

    def _page_item(self, index: int) -> tuple[int, object]:
        """What decoding page ``index`` needs, copied out of the pool or the backing file:
        (state, payload bytes | fill word | None), as codec.decode_pages takes it."""
        table = self.table
        entry = table.entry(index)
        state = entry >> pt.STATE_SHIFT
        if state == pt.COMPRESSED or state == pt.HUGE:
            return state, self.pool.read(table.location(index), entry & pt.LENGTH_MASK)
        if state == pt.SAME:
            return state, table.location(index)
        if state == pt.BACKING:
            assert self.backing is not None
            return pt.HUGE, self.backing.read(index)  # stored raw, like a huge page
        return pt.EMPTY, None

    def _page_bytes(self, index: int) -> bytes:
        return self.codec.decode_pages([self._page_item(index)])[0]

    # -- control ------------------------------------------------------------------------
    def set_policy(self, policy: Policy) -> None:
        self.policy = Policy(policy)

    def set_no_alloc(self, closed: bool) -> None:
        """Close (True) or open the allocation gate. A driver closes it on the high-threshold
        interrupt and opens it once it has made room; releases always pass."""
        self.no_alloc = bool(closed)

    def _state_changed(self, old: State, new: State) -> None:
        if new is State.FULL and self.no_alloc_on_full:
            self.no_alloc = True

    def set_watermarks(self, low: float | None = None, high: float | None = None) -> None:
        wm = self.watermarks
        wm.set_marks(wm.low if low is None else low, wm.high if high is None else high,
                     self.pool.used_bytes)

    def compact(self) -> int:
        freed = self.pool.compact()
        self.watermarks.update(self.pool.used_bytes)
        return freed

    def reset_max(self) -> None:
        self.pool.reset_max()

    # -- reports ------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self.pool.used_bytes

    def mm_stat(self) -> tuple[int, ...]:
        """zram's mm_stat fields, same order."""
        pool = self.pool
        return (self.pages_stored << PAGE_SHIFT, self.compr_data_size, pool.used_bytes,
                pool.capacity, pool.max_used_bytes, self.same_pages, pool.pages_compacted,
                self.huge_pages, self.counters.huge_pages_since)

    def io_stat(self) -> tuple[int, ...]:
        """zram's io_stat fields, same order."""
        c = self.counters
        return (c.failed_reads, c.failed_writes, c.invalid_io, c.notify_free)

    def compression_ratio(self) -> float:
        """Compressed bytes per original byte (0..1; lower is better), pool-stored pages only."""
        stored = (self.pages_stored - self.same_pages) << PAGE_SHIFT
        return self.compr_data_size / stored if stored else 0.0

    def effective_ratio(self) -> float:
        """Original bytes per pool byte in use: the ratio the capacity lie depends on."""
        used = self.pool.used_bytes
        return (self.pages_stored << PAGE_SHIFT) / used if used else 0.0

    def allocator_efficiency(self) -> float:
        """Compressed bytes / pool bytes in use (1.0 when empty)."""
        used = self.pool.used_bytes
        return self.compr_data_size / used if used else 1.0

    def headroom(self) -> int:
        return self.watermarks.headroom(self.pool.used_bytes)

    # -- the node as its driver sees it ------------------------------------------------------
    def zratio(self) -> float:
        """The ratio the device promises: advertised over real capacity."""
        return self.size / self.pool.capacity

    def safe_pages(self) -> int:
        """Pages of the present average compressibility that still fit before usage crosses
        ``high`` (with nothing in the pool, at the promised ratio): what a driver asks before
        placing a batch. 0 at or above high, or while the gate is closed."""
        if self.no_alloc:
            return 0
        # The pool grows a block at a time (up to MAX_FRAMES_PER_BLOCK frames), not an object
        # at a time: keep a few largest blocks of the headroom back, or a batch that opens new
        # blocks near the line crosses it (measured: 16 of 58 batches sized at half of an
        # unreserved estimate crossed high on a 16 MiB node).
        headroom = max(0, self.headroom() - SAFE_RESERVE_BLOCKS * MAX_FRAMES_PER_BLOCK
                       * PAGE_SIZE)
        ratio = self.effective_ratio() if self.pool.used_bytes else self.zratio()
        return int(headroom * ratio) >> PAGE_SHIFT

    def balloon_pages(self) -> int:
        """Pages of advertised capacity the OS should withhold so what remains is backed at
        the ratio achieved so far (never above the promised one); 0 with nothing stored."""
        if not self.pool.used_bytes:
            return 0
        backed = self.pool.capacity * min(self.effective_ratio(), self.zratio())
        return max(0, int(self.size - backed)) >> PAGE_SHIFT

    def pressure(self) -> int:
        return self.watermarks.pressure(self.pool.used_bytes)

    def recount(self) -> dict[str, int]:
        """Recompute the gauges from the page table (slow; for tests and audits)."""
        table = self.table
        counts = {"pages_stored": 0, "same_pages": 0, "huge_pages": 0, "compr_data_size": 0,
                  "backing_pages": 0}
        handles = {}
        for index in table.stored_indices():
            state = table.state(index)
            counts["pages_stored"] += 1
            if state == pt.SAME:
                counts["same_pages"] += 1
            elif state == pt.BACKING:
                counts["backing_pages"] += 1
            elif state in (pt.COMPRESSED, pt.HUGE):
                counts["compr_data_size"] += table.length(index)
                counts["huge_pages"] += state == pt.HUGE
                handles[table.location(index)] = index
        table.check()
        handles.update(dict.fromkeys(self.releasing, RELEASED_OWNER))
        assert handles == self.pool.live_objects(), "pool objects differ from the page table"
        return counts

    def close(self) -> None:
        self.pool.close()
        self.codec.close()
        if self.backing is not None:
            self.backing.close()
