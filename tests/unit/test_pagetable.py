"""The page table's memory follows what is stored: chunks come with the first store into them
and go when a change leaves them empty; every page reads as a flat per-page table would."""

from __future__ import annotations

import os
import time

import hypothesis.strategies as st
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cramfs import PAGE_SIZE
from cramfs import pagetable as pt
from cramfs.device import CompressedDevice, DeviceConfig

P = PAGE_SIZE
TiB = 1 << 40
PAGES = 64


class TableModel(RuleBasedStateMachine):
    """A table of 8-page chunks against a dict of the pages that are not EMPTY."""

    def __init__(self) -> None:
        super().__init__()
        self.table = pt.PageTable(PAGES, referenced=True, chunk_shift=3)
        self.model: dict[int, tuple[int, int, int]] = {}  # index -> (state, length, loc)

    @rule(index=st.integers(0, PAGES - 1), state=st.integers(1, 4),
          length=st.integers(0, P), loc=st.integers(0, 2**64 - 1))
    def set(self, index: int, state: int, length: int, loc: int) -> None:
        self.table.set(index, state, length, loc)
        self.model[index] = (state, length, loc)

    @rule(index=st.integers(0, PAGES - 1))
    def clear(self, index: int) -> None:
        self.table.clear(index)
        self.model.pop(index, None)

    @rule(index=st.integers(0, PAGES - 1))
    def open_without_storing(self, index: int) -> None:
        """A store that opened a chunk and then kept nothing in it (a zero write)."""
        self.table.writable(index)

    @rule()
    def give_back(self) -> None:
        self.table.give_back()
        self.table.check()
        used = {i >> 3 for i in self.model}
        assert set(self.table.chunks) == used

    @rule(index=st.integers(0, PAGES - 1))
    def move(self, index: int) -> None:
        if index in self.model:
            state, length, loc = self.model[index]
            self.table.set_location(index, loc ^ 1)
            self.model[index] = (state, length, loc ^ 1)

    @rule(first=st.integers(0, PAGES), count=st.integers(0, PAGES))
    def stored_range(self, first: int, count: int) -> None:
        stop = min(PAGES, first + count)
        assert list(self.table.stored_indices(first, stop)) == sorted(
            i for i in self.model if first <= i < stop)

    @invariant()
    def pages_match(self) -> None:
        table = self.table
        for index in range(PAGES):
            state, length, loc = self.model.get(index, (pt.EMPTY, 0, 0))
            assert (table.state(index), table.length(index), table.location(index)) == (
                state, length, loc)
            assert (table.entry(index) == 0) == (index not in self.model)
        assert list(table.stored_indices()) == sorted(self.model)
        assert table.entries() == [(i, (s << pt.STATE_SHIFT) | n, lc)
                                   for i, (s, n, lc) in sorted(self.model.items())]

    @invariant()
    def chunks_cover_the_stored_pages(self) -> None:
        assert {i >> 3 for i in self.model} <= set(self.table.chunks)


TestTableModel = TableModel.TestCase
TestTableModel.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


def test_memory_follows_what_is_stored() -> None:
    table = pt.PageTable(15 * TiB // P)
    empty = table.metadata_bytes
    assert empty <= pt.fixed_bytes(15 * TiB // P) < 64 << 10  # nothing per advertised page
    for index in range(4 * pt.CHUNK_PAGES):  # four full chunks, far out
        table.set(10 * TiB // P + index, pt.COMPRESSED, 100, index)
    grown = table.metadata_bytes - empty
    per_page = grown / (4 * pt.CHUNK_PAGES)
    assert 10 <= per_page <= 16, per_page
    for index in range(4 * pt.CHUNK_PAGES):
        table.clear(10 * TiB // P + index)
    assert table.give_back() == 4
    assert table.metadata_bytes - empty < 1024  # what remains: the directory's own table


def test_fixed_bytes_does_not_grow_with_the_size() -> None:
    assert pt.fixed_bytes(1) == pt.fixed_bytes(15 * TiB // P) < 1 << 20


def test_chunks_are_found_by_the_directory_when_the_range_is_wide() -> None:
    table = pt.PageTable(15 * TiB // P)
    far = [3, 5 * TiB // P, 15 * TiB // P - 1]
    for index in far:
        table.set(index, pt.SAME, 0, 7)
    started = time.perf_counter()
    assert list(table.stored_indices()) == far
    assert table.chunk_numbers(0, table.pages) == [i >> pt.CHUNK_SHIFT for i in far]
    assert time.perf_counter() - started < 0.5  # not a walk over 7.8 million chunk numbers


@given(first=st.integers(0, 3 * pt.CHUNK_PAGES), count=st.integers(1, 2 * pt.CHUNK_PAGES))
@settings(max_examples=30, deadline=None)
def test_device_requests_across_chunk_boundaries(first: int, count: int) -> None:
    """A write, a gathered read and a discard straddling default-size chunks, on a device
    whose advertised size is far beyond its pool."""
    dev = CompressedDevice(DeviceConfig(size=15 * TiB, pool=16 << 20, threads=1))
    try:
        data = b"".join(os.urandom(64) * (P // 64) for _ in range(count))
        dev.write(first * P, data)
        assert dev.read(first * P, len(data)) == data
        assert dev.pages_stored == count
        assert dev.read(0, (first + count + 3) * P)[first * P:first * P + len(data)] == data
        dev.recount()
        dev.discard(0, dev.size)  # swapon discards the whole device
        assert dev.pages_stored == 0 and not dev.table.chunks
        assert dev.read(first * P, len(data)) == bytes(len(data))
        dev.recount()
    finally:
        dev.close()


def test_zero_writes_and_released_pages_give_chunks_back() -> None:
    dev = CompressedDevice(DeviceConfig(size=TiB, pool=16 << 20, threads=1))
    try:
        base = (TiB // P) // 2
        dev.write(base * P, bytes(P) * 8)  # zeros: nothing stored, nothing kept
        assert not dev.table.chunks
        dev.write(base * P, os.urandom(P) * 2)
        assert len(dev.table.chunks) == 1
        dev.write(base * P, bytes(2 * P))  # released by a zero write
        assert not dev.table.chunks
        assert dev.table.metadata_bytes < 64 << 10
    finally:
        dev.close()


def test_a_15_tib_device_starts_at_once() -> None:
    started = time.perf_counter()
    dev = CompressedDevice(DeviceConfig(size=15 * TiB, pool=1 << 20, threads=1))
    try:
        assert time.perf_counter() - started < 0.5
        assert dev.table.metadata_bytes < 64 << 10
        assert dev.read(dev.size - P, P) == bytes(P)
    finally:
        dev.close()
