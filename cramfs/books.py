"""The books: the page table and the gauges that summarise it, changed only here.

Every path that stores or drops a page -- a write's commit, a release (zero write, discard),
zswap's writeback, a failed page that is poisoned -- goes through one pair: :meth:`install`
(a page now holds this) and :meth:`forget` (a page holds nothing; its slot freed, parked for
the batched media zero, or reused in place). The gauges (``pages_stored``, ``same_pages``,
``huge_pages``, ``compr_data_size``, ``backing_pages``) are therefore exact after every change
and O(1) to read, as zram's ``mm_stat`` needs; :meth:`recount` recomputes them from the table
and checks the pool against it (tests and audits).

:meth:`place_run` is install + forget fused over a run of pages for the write path that
nothing can refuse (one pass, no per-page call): it ends with the same books.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cramfs import codec as enc
from cramfs import pagetable as pt

if TYPE_CHECKING:
    from cramfs.backing import BackingStore
    from cramfs.codec import Encoded
    from cramfs.zspool import ZsPool

RELEASED_OWNER = 0xFFFFFFFE  # pool owner of a released slot awaiting the zero flush


class Books:
    __slots__ = ("table", "pool", "backing", "pages_stored", "same_pages", "huge_pages",
                 "compr_data_size", "backing_pages", "releasing", "releasing_bytes")

    def __init__(self, table: pt.PageTable, pool: ZsPool) -> None:
        self.table = table
        self.pool = pool
        self.backing: BackingStore | None = None  # zswap's backing file, when there is one
        self.pages_stored = 0
        self.same_pages = 0
        self.huge_pages = 0
        self.compr_data_size = 0
        self.backing_pages = 0
        self.releasing: set[int] = set()  # pool handles of released pages awaiting the flush
        self.releasing_bytes = 0

    # -- the pair ----------------------------------------------------------------------
    def install(self, index: int, state: int, length: int, loc: int) -> None:
        """Page ``index`` (EMPTY: forget it first) now holds ``state``: ``loc`` is the pool
        handle (COMPRESSED, HUGE), the fill word (SAME) or 0 (BACKING)."""
        table = self.table
        chunk = table.chunks.get(index >> table.chunk_shift) or table.writable(index)
        slot = index & table.chunk_mask
        chunk.meta[slot] = (state << pt.STATE_SHIFT) | length
        chunk.loc[slot] = loc
        self.pages_stored += 1
        if state == pt.SAME:
            self.same_pages += 1
        elif state == pt.BACKING:
            self.backing_pages += 1
        else:
            self.compr_data_size += length
            if state == pt.HUGE:
                self.huge_pages += 1
            if chunk.ref is not None:
                chunk.ref[slot] = 1

    def forget(self, index: int, free: bool, defer: bool = False,
               keep_backing: bool = False) -> None:
        """Drop a page's contents from the books; free its slot if ``free``, or park the slot
        for the next zero flush if ``defer`` (the slot is reused in place otherwise). A page
        leaving the backing file gets its block punched out, unless ``keep_backing`` (it was
        just rewritten there)."""
        table = self.table
        number = index >> table.chunk_shift
        chunk = table.chunks.get(number)
        if chunk is None:
            return  # nothing stored in this chunk
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
        chunk.meta[slot] = 0  # table.clear, with the chunk in hand
        chunk.loc[slot] = 0
        table.emptied[number] = slot

    # -- both, over a run --------------------------------------------------------------
    def place_run(self, first: int, encoded: list[Encoded], defer_zero: bool) -> tuple[
            int, int, int]:
        """Phase 1 and phase 2 in one pass over the pages, for a write that nothing can
        refuse and that is certain to fit (the caller checks both). Each page gets its new
        object and then gives up its old one, as zram does page by page; the books end as
        ``install``/``forget`` per page would leave them. Returns the pages released (zero
        pages that held something), the huge pages stored, and those that were poor."""
        table, pool = self.table, self.pool
        class_of, store, write, slot_size = pool.class_of, pool.store, pool.write, pool.slot_size
        forget = self.forget
        same_kind, huge_kind = enc.SAME, enc.HUGE
        compressed_state, huge_state = pt.COMPRESSED, pt.HUGE
        shift, mask = pt.STATE_SHIFT, table.chunk_mask
        same_meta = pt.SAME << shift
        chunk = table.writable(first)
        meta, loc, referenced = chunk.meta, chunk.loc, chunk.ref
        stored = same = huge = compr = notify = poor = 0
        index = first
        for item in encoded:
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
        return notify, huge, poor

    # -- the batched media zero ----------------------------------------------------------
    def flush_releases(self) -> int:
        """Free every parked slot; returns slots freed."""
        count = len(self.releasing)
        while self.releasing:
            self.pool.free(self.releasing.pop())
        self.releasing_bytes = 0
        return count

    def moved(self, old: int, new: int) -> None:
        """A parked slot was moved by compaction."""
        self.releasing.discard(old)
        self.releasing.add(new)

    # -- audit -------------------------------------------------------------------------
    def recount(self) -> dict[str, int]:
        """Recompute the gauges from the page table (slow; for tests and audits) and check
        the pool holds exactly the objects the table and the parked releases point at."""
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

    def gauges(self) -> dict[str, int]:
        return {"pages_stored": self.pages_stored, "same_pages": self.same_pages,
                "huge_pages": self.huge_pages, "compr_data_size": self.compr_data_size,
                "backing_pages": self.backing_pages}
