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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import zstandard

from cramfs import PAGE_SHIFT, PAGE_SIZE, compressors
from cramfs import codec as enc
from cramfs import pagetable as pt
from cramfs.backing import BackingStore
from cramfs.books import RELEASED_OWNER as RELEASED_OWNER
from cramfs.books import Books
from cramfs.codec import (
    DEFAULT_HUGE_THRESHOLD,
    MIN_DEVICE_HUGE_THRESHOLD,
    Codec,
    Encoded,
    same_fill,
)
from cramfs.control import WriteControl
from cramfs.errors import BackingError, OutOfRange
from cramfs.faults import Faults, Mend
from cramfs.interrupts import InterruptConfig, InterruptLine
from cramfs.jobs import OFFLOAD_MIN_BYTES as OFFLOAD_MIN_BYTES
from cramfs.jobs import ReadJob, WriteJob
from cramfs.node import NodeView
from cramfs.stats import REJECT_FULL as REJECT_FULL
from cramfs.stats import REJECT_GATE as REJECT_GATE
from cramfs.stats import REJECT_REASONS as REJECT_REASONS
from cramfs.stats import REJECT_WATERMARK as REJECT_WATERMARK
from cramfs.stats import Counters as Counters
from cramfs.stats import Stats
from cramfs.tiers import PoolTier
from cramfs.timing import Timing, TimingConfig
from cramfs.watermarks import FailureMode, Policy, State, Watermarks
from cramfs.zspool import PoolExhausted, ZsPool

if TYPE_CHECKING:
    from cramfs.codec import PlanItem, Run

# The longest a throttled write is held, seconds: a minute per write is already a hung swap.
MAX_THROTTLE_DELAY = 60.0


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
        delay = self.throttle_max_delay
        if isinstance(delay, bool) or not isinstance(delay, int | float) \
                or not 0 <= delay <= MAX_THROTTLE_DELAY:
            raise ValueError(f"throttle_max_delay must be seconds in 0..{MAX_THROTTLE_DELAY:g}, "
                             f"got {delay!r}")
        huge = self.huge_threshold
        if isinstance(huge, bool) or not isinstance(huge, int) \
                or not MIN_DEVICE_HUGE_THRESHOLD <= huge <= PAGE_SIZE:
            raise ValueError(f"huge_threshold must be an integer in "
                             f"{MIN_DEVICE_HUGE_THRESHOLD}..{PAGE_SIZE}, got {huge!r}")
        self.level = compressors.validate(self.compressor, self.level)


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


_INPLACE = -1  # phase-1 marker: reuse the page's current slot
_FAILED = -2  # phase-1 marker: did not fit
_BACKING = -3  # phase-1 marker: the tier spilled it (zswap's backing file)


class CompressedDevice:
    """A zram-like device: page table + bounded pool + codec + watermarks."""

    # Keep a referenced bit per stored page (an LRU's second chance; zswap's writeback).
    TRACKS_REFERENCES = False
    # Write control may refuse a write (ENOSPC); zswap's backing file takes what the pool
    # does not, so it never does.
    REFUSES_WRITES = True

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.size = config.size
        self.pages = config.size >> PAGE_SHIFT
        self.codec = Codec(config.level, config.huge_threshold, config.threads,
                           config.compressor)
        self.pool = ZsPool(config.pool, largest_compressed=config.huge_threshold)
        self.pool.on_move = self._moved
        self.watermarks = Watermarks(self.pool.capacity, config.low, config.high)
        self.interrupts = InterruptLine(config.interrupts)
        self.stats = Stats()
        self.books = Books(pt.PageTable(self.pages, referenced=self.TRACKS_REFERENCES),
                           self.pool)
        self.faults = Faults(self.stats, config.timing, config.failure_mode)
        self.control = WriteControl(self.stats, self.watermarks, config.policy,
                                    config.throttle_max_delay, config.no_alloc_on_full,
                                    refuses=self.REFUSES_WRITES)
        self.node_view = NodeView(self.size, self.pool, self.books, self.watermarks,
                                  self.control)
        # Where pages go: the pool only; zswap plugs in the pool + backing file tier.
        self.tier: PoolTier = PoolTier()
        self._pending: dict[int, int] = {}
        # Seconds a released page keeps its slot before the batched media zero (0: none).
        self.zero_flush_interval = config.zero_flush_interval

    # -- the parts' state under the names the daemon and the tools read --------------------
    @property
    def table(self) -> pt.PageTable:
        return self.books.table

    @table.setter
    def table(self, table: pt.PageTable) -> None:
        """Replace the (empty) page table: tests use one with small chunks."""
        self.books.table = table

    @property
    def backing(self) -> BackingStore | None:
        """zswap (cramfs.zswap) plugs a backing file in; plain devices have none."""
        return self.books.backing

    @backing.setter
    def backing(self, backing: BackingStore | None) -> None:
        self.books.backing = backing

    @property
    def counters(self) -> Counters:
        return self.stats.counters

    @counters.setter
    def counters(self, counters: Counters) -> None:
        self.stats.counters = counters

    @property
    def pages_stored(self) -> int:
        return self.books.pages_stored

    @property
    def same_pages(self) -> int:
        return self.books.same_pages

    @property
    def huge_pages(self) -> int:
        return self.books.huge_pages

    @property
    def compr_data_size(self) -> int:
        return self.books.compr_data_size

    @property
    def backing_pages(self) -> int:
        return self.books.backing_pages

    @property
    def releasing(self) -> set[int]:
        return self.books.releasing

    @property
    def releasing_bytes(self) -> int:
        return self.books.releasing_bytes

    @property
    def poisoned(self) -> set[int]:
        return self.faults.poisoned

    @property
    def lost(self) -> set[int]:
        return self.faults.lost

    @property
    def mending(self) -> dict[int, tuple[bytes, bytes]]:
        return self.faults.mending

    @property
    def failure_mode(self) -> FailureMode:
        return self.faults.failure_mode

    @failure_mode.setter
    def failure_mode(self, mode: FailureMode) -> None:
        self.faults.failure_mode = FailureMode(mode)

    @property
    def timing(self) -> Timing:
        return self.faults.timing

    @timing.setter
    def timing(self, timing: Timing) -> None:
        self.faults.timing = timing

    @property
    def policy(self) -> Policy:
        return self.control.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.control.set_policy(policy)

    @property
    def no_alloc(self) -> bool:
        return self.control.no_alloc

    @no_alloc.setter
    def no_alloc(self, closed: bool) -> None:
        self.control.set_no_alloc(closed)

    @property
    def no_alloc_on_full(self) -> bool:
        return self.control.no_alloc_on_full

    @no_alloc_on_full.setter
    def no_alloc_on_full(self, on: bool) -> None:
        self.control.no_alloc_on_full = bool(on)

    @property
    def throttle_max_delay(self) -> float:
        return self.control.throttle_max_delay

    @throttle_max_delay.setter
    def throttle_max_delay(self, seconds: float) -> None:
        self.control.throttle_max_delay = seconds

    # -- ranges -------------------------------------------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        """The one range check: every entry point (write, read, discard, prepare_write,
        fetch, the request jobs) runs it before anything else, and every refusal counts in
        ``invalid_io`` as zram's does."""
        if offset < 0 or length < 0 or offset + length > self.size:
            self.stats.counters.invalid_io += 1
            raise OutOfRange(
                f"I/O of {length} bytes at offset {offset} is outside the device"
                f" ({self.size} bytes)")

    # -- requests: what an adapter (daemon/fs.py) calls -----------------------------------
    def submit_write(self, offset: int, data: bytes | memoryview) -> WriteJob:
        """Start a write request: the range checked (EFBIG before any injected error), an
        injected error drawn, and either the whole write done here (a small one) or the
        prechecks run and the compression left to ``job.offload``."""
        self.check_range(offset, len(data))
        shaped = self.faults.timing.active
        if shaped:
            self.faults.inject("write")
        job = WriteJob(self, offset, data, shaped)
        if len(data) < OFFLOAD_MIN_BYTES:
            job.result = self._write(offset, data)
            job.data = None
        else:
            self.precheck_write(offset, data)
        return job

    def submit_read(self, offset: int, length: int,
                    buffers: Callable[[int], bytearray | None] | None = None) -> ReadJob:
        """Start a read request: the range checked, an injected error drawn, then either the
        whole read done here (a small one: a swap-in page) or the pages copied out of the pool
        and their decompression left to ``job.offload``. ``buffers(size)`` may hand in a reply
        buffer of that size to decode into (see ``fetch``)."""
        shaped = self.faults.timing.active
        if shaped:
            self.check_range(offset, length)  # out of range is EINVAL, never a drawn error
            self.faults.inject("read")
        job = ReadJob(self, length, shaped)
        if length < OFFLOAD_MIN_BYTES:
            job.data = self.read(offset, length)
        else:
            self.check_range(offset, length)
            out = buffers(self.reply_size(offset, length)) if buffers is not None else None
            job.plan = self._fetch(offset, length, out, buffer=True)
        return job

    # -- writes -------------------------------------------------------------------------
    def prepare_write(self, offset: int, data: bytes | memoryview) -> WritePlan:
        """Compress the whole pages of a write. Pure apart from the range check; safe on any
        thread."""
        self.check_range(offset, len(data))
        return self._prepare(offset, data)

    def _prepare(self, offset: int, data: bytes | memoryview) -> WritePlan:
        length = len(data)
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
        control = self.control
        control.recheck_full(self.pool.used_bytes)
        if not data or not control.refuses_growth():
            return
        table = self.books.table
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
                control.refuse()

    def write(self, offset: int, data: bytes | memoryview) -> WriteResult:
        """Check, compress and commit on this thread. One whole aligned page while write
        control is idle (most of a swap-out, one page at a time) takes a short path, for the
        reason given in ``read``; anything else goes the general way."""
        control = self.control
        if len(data) == PAGE_SIZE and not offset & (PAGE_SIZE - 1) and 0 <= offset < self.size \
                and control.watermarks.state is State.OK and not control.no_alloc:  # idle
            return self._write_page(offset >> PAGE_SHIFT, bytes(data))
        self.check_range(offset, len(data))
        return self._write(offset, data)

    def _write(self, offset: int, data: bytes | memoryview) -> WriteResult:
        """``write`` for a range already checked."""
        if len(data) == PAGE_SIZE and not offset & (PAGE_SIZE - 1) and self.control.idle:
            return self._write_page(offset >> PAGE_SHIFT, bytes(data))
        self.precheck_write(offset, data)
        return self.commit_write(self._prepare(offset, data))

    def _write_page(self, index: int, page: bytes) -> WriteResult:
        """``commit_write(prepare_write(...))`` for one whole page with the state ok, so with
        no write control and nothing for check_range or precheck_write to refuse. The page is
        encoded once; on a device whose tier has nowhere else to put it, with room certain
        for it, the books place it in one pass (``place_run``) without commit_write's
        per-request steps; nearly full, phase 1 (_place_all) and phase 2 (_apply) run
        directly. A page that does not fit goes through commit_write (compaction, retry, the
        failure policy) already encoded; phase 1 left nothing behind for it to undo."""
        item = self.codec.encode_page(page)
        if not self.tier.spills:
            result = WriteResult()
            faults = self.faults
            if not (faults.poisoned or faults.lost or self.zero_flush_interval) \
                    and self.pool.certainly_fits(1):
                notify, huge, poor = self.books.place_run(index, [item], False)
                counters = self.stats.counters
                counters.notify_free += notify
                counters.huge_pages_since += huge
                counters.reject_compress_poor += poor
            else:
                placed = self._place_all(index, [item])
                if placed[0] == _FAILED:
                    return self.commit_write(WritePlan(index << PAGE_SHIFT, PAGE_SIZE, index,
                                                       [item]))
                self._apply(index, [item], placed, result)
                counters = self.stats.counters
            counters.write_requests += 1
            counters.written_bytes += PAGE_SIZE
            self._settle()
            return result
        return self.commit_write(WritePlan(index << PAGE_SHIFT, PAGE_SIZE, index, [item]))

    def commit_write(self, plan: WritePlan) -> WriteResult:
        """Place a prepared write. Raises WriteRejected (ENOSPC) or PoisonedPage (EIO)."""
        counters = self.stats.counters
        first, encoded, mends = self._merge_partials(plan)
        result = WriteResult()
        if not encoded:  # all of it is kept aside for a poisoned page (see _merge_partials)
            self._keep_mends(mends)
            counters.write_requests += 1
            counters.written_bytes += plan.length
            return result
        control, pool = self.control, self.pool
        control.recheck_full(pool.used_bytes)
        result.delay = control.admit(lambda: self._grows(first, encoded), pool.used_bytes)
        if control.idle and not self.tier.spills and self.pool.certainly_fits(len(encoded)):
            # Nothing can refuse this write and every page is certain to fit: one pass.
            faults = self.faults
            if faults.marked:
                faults.mended_range(first, first + len(encoded))
            notify, huge, poor = self.books.place_run(first, encoded,
                                                      bool(self.zero_flush_interval))
            counters.notify_free += notify
            counters.huge_pages_since += huge
            counters.reject_compress_poor += poor
            if mends:
                self._keep_mends(mends)
            counters.write_requests += 1
            counters.written_bytes += plan.length
            self._settle()
            return result
        peak = pool.max_used_frames
        try:
            placed = self._place_all(first, encoded)
        except OSError as exc:
            self._undo(peak)
            counters.backing_write_errors += 1
            counters.failed_writes += 1
            raise BackingError(f"backing file write failed: {exc.strerror}") from exc
        failed = [i for i, h in enumerate(placed) if h == _FAILED]
        if failed and self.control.policy is not Policy.NONE:
            self._undo(peak)
            pool.compact()
            placed = self._place_all(first, encoded)
            if any(h == _FAILED for h in placed):
                self._undo(peak)
                counters.reject_alloc_fail += 1
                counters.pool_limit_hit += 1
                self._settle(alloc_failed=True)
                control.reject(REJECT_FULL, "pool full: the write does not fit the real capacity")
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
        or an undo: moves would re-enter the books half-way), give back the page table's
        chunks the change emptied, then re-evaluate the watermarks."""
        pool = self.pool
        if pool.slack:
            pool.compact_pending()
        table = self.books.table
        if table.emptied:
            table.give_back()
        self.watermarks.update(pool.used_bytes, alloc_failed=alloc_failed)

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
        faults = self.faults
        mends: list[Mend] = []
        drop_first = drop_last = False
        for i in sorted({0, len(out) - 1}):
            item = out[i]
            if isinstance(item, Encoded):
                continue
            start, chunk = item
            index = first + i
            if index in faults.poisoned:
                mend = faults.mend(index, start, chunk)
                mends.append(mend)
                if mend[1] is not None:  # still partial: kept aside, not placed
                    drop_first, drop_last = drop_first or i == 0, drop_last or i == len(out) - 1
                    continue
                out[i] = self.codec.encode_pages(faults.mended_page(index, start, chunk))[0]
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
        self.faults.keep_mends(mends)

    def _grows(self, first: int, encoded: list[Encoded]) -> bool:
        """Does any page need a larger slot than it holds now (new pool space)?"""
        table, pool = self.books.table, self.pool
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
        pool, pending, table = self.pool, self._pending, self.books.table
        class_of, slot_size, alloc_in, write = (pool.class_of, pool.slot_size, pool.alloc_in,
                                                pool.write)
        same, shift, mask = enc.SAME, pt.STATE_SHIFT, table.chunk_mask
        tier = self.tier
        spills = tier.spills
        chunk = table.chunks.get(first >> table.chunk_shift) or table.absent
        placed = []
        for i, item in enumerate(encoded):
            index = first + i
            slot = index & mask
            if not slot:
                chunk = table.chunks.get(index >> table.chunk_shift) or table.absent
            if item.kind == same:
                placed.append(0)
                continue
            payload = item.payload
            cls = class_of(len(payload))
            state = chunk.meta[slot] >> shift
            old_size = slot_size(chunk.loc[slot]) if state == pt.COMPRESSED \
                or state == pt.HUGE else 0
            if spills and not tier.admits(item):
                tier.spill(index, item)
                placed.append(_BACKING)
                continue
            if old_size == cls.size:
                placed.append(_INPLACE)
                continue
            try:
                handle = alloc_in(cls, index)
            except PoolExhausted:
                if spills:
                    self.stats.counters.reject_alloc_fail += 1
                    tier.spill(index, item)
                    placed.append(_BACKING)
                    continue
                placed.append(_INPLACE if old_size >= len(payload) else _FAILED)
                continue
            write(handle, payload)
            pending[index] = handle
            placed.append(handle)
        return placed

    def _undo(self, peak: int) -> None:
        pending = self._pending
        for index in list(pending):
            self.pool.free(pending.pop(index))
        # Undone slots were never in use: like zram, a refused write leaves mem_used_max alone.
        self.pool.max_used_frames = max(peak, self.pool.used_frames)

    def _apply(self, first: int, encoded: list[Encoded], placed: list[int],
               result: WriteResult) -> None:
        """Phase 2: point the table at the new objects and free the old ones, through the
        books' install/forget pair."""
        books, faults, pool, pending = self.books, self.faults, self.pool, self._pending
        table, counters = books.table, self.stats.counters
        poisoned, lost = faults.poisoned, faults.lost  # changed in place, never replaced
        install, forget = books.install, books.forget
        mask = table.chunk_mask
        # Read through the chunk as it was when the request began: a store below may
        # allocate the chunk, but every page it did not hold yet reads as empty either way,
        # and each page of the request is visited once.
        chunk = table.chunks.get(first >> table.chunk_shift) or table.absent
        for i, item in enumerate(encoded):
            index = first + i
            slot = index & mask
            if not slot:
                chunk = table.chunks.get(index >> table.chunk_shift) or table.absent
            marker = placed[i]
            if marker == _FAILED:
                result.lost_pages += 1
                if faults.fail_page(index):  # poisoned: its old contents are gone
                    forget(index, free=True)
                continue
            kind = item.kind
            was_empty = chunk.meta[slot] == 0
            if marker == _BACKING:
                forget(index, free=True, keep_backing=True)
                install(index, pt.BACKING, PAGE_SIZE, 0)
                faults.mended(index)
                continue
            if marker == _INPLACE:
                handle = chunk.loc[slot]
                forget(index, free=False)
                pool.write(handle, item.payload)
            else:
                handle = pending.pop(index, 0)
                if not was_empty:
                    defer = bool(kind == enc.SAME and item.fill == 0
                                 and self.zero_flush_interval)
                    forget(index, free=not defer, defer=defer)
            if poisoned or lost:
                faults.mended(index)
            if kind == enc.SAME:
                if item.fill == 0:
                    # A zero page is a release (our discard): the entry stays empty.
                    counters.notify_free += not was_empty
                    continue
                install(index, pt.SAME, 0, item.fill)
            else:
                length = len(item.payload)
                install(index, pt.COMPRESSED if kind == enc.COMPRESSED else pt.HUGE, length,
                        handle)
                if kind == enc.HUGE:
                    counters.huge_pages_since += 1
                    if item.poor:
                        counters.reject_compress_poor += 1

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
        counters = self.stats.counters
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
            self.faults.check_partial_write(index)
            if self.books.table.entry(index) == 0:
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
                    self.stats.counters.pool_limit_hit += 1
                    self.control.reject(REJECT_FULL,
                                        "pool full: zeroing part of a page does not fit")
        except OSError as exc:
            self._undo(peak)
            self.stats.counters.backing_write_errors += 1
            self.stats.counters.failed_writes += 1
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
        table = self.books.table
        defer = bool(self.zero_flush_interval)
        released = 0
        forget = self.books.forget
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
        if self.faults.marked:
            self.faults.mended_range(first, stop)
        return released

    def flush_releases(self) -> int:
        """The device's batched media zero: free every parked slot; returns pages freed."""
        count = self.books.flush_releases()
        if count:
            self._settle()
        return count

    # -- timing and faults ----------------------------------------------------------------
    def inject_fault(self, op: str) -> None:
        """Fail this request (before it touches data) if the error rate says so."""
        self.faults.inject(op)

    def io_delay(self, op: str, nbytes: int) -> float:
        return self.faults.delay(op, nbytes)

    def _moved(self, owner: int, old: int, new: int) -> None:
        """The pool moved an object (compaction): follow it wherever it is referenced."""
        if owner == RELEASED_OWNER:
            self.books.moved(old, new)
        elif self._pending.get(owner) == old:
            self._pending[owner] = new
        else:
            self.books.table.set_location(owner, new)

    # -- reads --------------------------------------------------------------------------
    def fetch(self, offset: int, length: int, out: bytearray | None = None,
              buffer: bool = False) -> ReadPlan:
        """Copy what a read needs out of the pool (caller's thread, between commits).
        ``out``: a buffer of the read's whole pages (``reply_size``) the caller may hand in
        for a large read to be decoded into, instead of a new one (a fresh megabyte costs
        a page fault per page); its old contents do not matter. ``buffer``: decode may
        return that buffer (the plan's ``out``) or a view of it instead of bytes."""
        self.check_range(offset, length)
        return self._fetch(offset, length, out, buffer)

    def _fetch(self, offset: int, length: int, out: bytearray | None = None,
               buffer: bool = False) -> ReadPlan:
        table = self.books.table
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT if length else first - 1
        if last - first + 1 >= enc.PARALLEL_BATCH_PAGES and self.codec.batch_reads:
            plan = self._gather(offset, length, first, last + 1, out)
            plan.buffer = buffer
            return plan
        pages = []
        faults = self.faults
        for index in range(first, last + 1):
            faults.check_read(index)
            pages.append(self._page_item(index))
            table.reference(index)
        self.stats.counters.read_requests += 1
        self.stats.counters.read_bytes += length
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
        table, pool = self.books.table, self.pool
        chunk = table.chunks.get(first >> table.chunk_shift) or table.absent
        meta, loc, referenced = chunk.meta, chunk.loc, chunk.ref
        faults = self.faults
        poisoned = faults.poisoned
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
                faults.check_read(index)
            slot = index & chunk_mask
            if not slot:
                chunk = table.chunks.get(index >> table.chunk_shift) or table.absent
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
        self.stats.counters.read_requests += 1
        self.stats.counters.read_bytes += length
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
        poisoned = self.faults.poisoned
        if poisoned and index in poisoned:
            self.faults.check_read(index)
        table = self.books.table
        chunk = table.chunks.get(index >> table.chunk_shift) or table.absent
        slot = index & table.chunk_mask
        meta = chunk.meta[slot]
        if meta >> pt.STATE_SHIFT == pt.COMPRESSED:
            page = self.codec.decompress(self.pool.read(chunk.loc[slot], meta & pt.LENGTH_MASK))
        else:
            page = self.codec.decode_pages([self._page_item(index)])[0]
        if chunk.ref is not None:
            chunk.ref[slot] = 1
        counters = self.stats.counters
        counters.read_requests += 1
        counters.read_bytes += length
        if length == PAGE_SIZE:
            return page
        start = offset & (PAGE_SIZE - 1)
        return page[start:start + length]

    def _page_item(self, index: int) -> tuple[int, object]:
        """What decoding page ``index`` needs, copied out of the pool or the backing file:
        (state, payload bytes | fill word | None), as codec.decode_pages takes it."""
        table = self.books.table
        entry = table.entry(index)
        state = entry >> pt.STATE_SHIFT
        if state == pt.COMPRESSED or state == pt.HUGE:
            return state, self.pool.read(table.location(index), entry & pt.LENGTH_MASK)
        if state == pt.SAME:
            return state, table.location(index)
        if state == pt.BACKING:
            return pt.HUGE, self.tier.read_spilled(index)  # stored raw, like a huge page
        return pt.EMPTY, None

    def _page_bytes(self, index: int) -> bytes:
        return self.codec.decode_pages([self._page_item(index)])[0]

    # -- control ------------------------------------------------------------------------
    def set_policy(self, policy: Policy) -> None:
        """Raises ValueError for a policy this device cannot have (zswap: only none)."""
        self.control.set_policy(policy)

    def set_no_alloc(self, closed: bool) -> None:
        """Close (True) or open the allocation gate. A driver closes it on the high-threshold
        interrupt and opens it once it has made room; releases always pass."""
        self.control.set_no_alloc(closed)

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
        """zram's mm_stat fields, same order (stats.MM_STAT_FIELDS)."""
        return self.stats.mm_stat(self.books, self.pool)

    def io_stat(self) -> tuple[int, ...]:
        """zram's io_stat fields, same order (stats.IO_STAT_FIELDS)."""
        return self.stats.io_stat()

    def compression_ratio(self) -> float:
        """Compressed bytes per original byte (0..1; lower is better), pool-stored pages only."""
        stored = (self.pages_stored - self.same_pages) << PAGE_SHIFT
        return self.compr_data_size / stored if stored else 0.0

    def effective_ratio(self) -> float:
        """Original bytes per pool byte in use: the ratio the capacity lie depends on."""
        return self.node_view.effective_ratio()

    def allocator_efficiency(self) -> float:
        """Compressed bytes / pool bytes in use (1.0 when empty)."""
        used = self.pool.used_bytes
        return self.compr_data_size / used if used else 1.0

    # -- the node as its driver sees it (cramfs.node) ----------------------------------------
    def headroom(self) -> int:
        return self.node_view.headroom()

    def pressure(self) -> int:
        return self.node_view.pressure()

    def zratio(self) -> float:
        """The ratio the device promises: advertised over real capacity."""
        return self.node_view.zratio()

    def safe_pages(self) -> int:
        """Pages that still fit before usage crosses ``high`` (NodeView.safe_pages)."""
        return self.node_view.safe_pages()

    def balloon_pages(self) -> int:
        """Advertised pages the OS should withhold (NodeView.balloon_pages)."""
        return self.node_view.balloon_pages()

    def recount(self) -> dict[str, int]:
        """Recompute the gauges from the page table (slow; for tests and audits)."""
        return self.books.recount()

    def close(self) -> None:
        self.pool.close()
        self.codec.close()
        if self.backing is not None:
            self.backing.close()
