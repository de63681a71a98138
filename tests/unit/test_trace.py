"""Trace files: the writer's records come back from the reader; torn and foreign files."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from cramfs import PAGE_SIZE
from cramfs.device import CompressedDevice, DeviceConfig
from cramfs.errors import BackingError, OutOfRange, PoisonedPage, WriteRejected
from cramfs.trace import (
    CHUNK_MAGIC,
    FILE_HEAD,
    FORMAT_VERSION,
    FRAME_HEAD,
    STATUS_INVALID,
    STATUS_IO_ERROR,
    STATUS_OK,
    STATUS_REJECTED,
    Record,
    TraceError,
    TraceReader,
    TraceWriter,
    start_trace,
    status_of,
)
from cramfs.watermarks import Policy

P = PAGE_SIZE
HEADER = {"kind": "swap", "name": "swap0", "config": {"size": 1 << 20, "pool": 1 << 18}}


def text_page(i: int) -> bytes:
    line = f"{i:08d} the quick brown fox jumps over the lazy dog\n".encode()
    return (line * (P // len(line) + 1))[:P]


def frame_offsets(path: Path) -> list[int]:
    """File offsets of every frame (chunks and the end frame), read from the frame heads."""
    data = path.read_bytes()
    _, _, _, length, _ = FILE_HEAD.unpack_from(data)
    offset = FILE_HEAD.size + length
    offsets = []
    while offset < len(data):
        assert data[offset:offset + 4] == CHUNK_MAGIC
        offsets.append(offset)
        payload = FRAME_HEAD.unpack_from(data, offset)[4]
        offset += FRAME_HEAD.size + payload
    return offsets


def many_records(path: Path, count: int = 600, chunk_bytes: int = 16 << 10) -> list[Record]:
    """A closed trace of ``count`` writes spread over many chunks; the records written."""
    expected = []
    with TraceWriter(path, HEADER, chunk_bytes=chunk_bytes) as writer:
        for i in range(count):
            t = i * 0.001
            writer.write(t, (i % 64) * P, text_page(i))
            expected.append(Record("write", t, (i % 64) * P, P, STATUS_OK, text_page(i)))
        writer.close(count * 0.001)
    return expected


def test_round_trip_every_record_type(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    page = text_page(1)
    with TraceWriter(path, HEADER) as writer:
        writer.initial(0, page + page)
        writer.write(0.5, 8192, page)
        writer.write(0.6, 12288, bytearray(page), STATUS_REJECTED)
        writer.write(0.7, 16384, memoryview(page)[:100])
        writer.read(1.0, 4096, 8192)
        writer.read(1.1, 1 << 40, 4096, STATUS_INVALID)
        writer.discard(2.0, 0, 1 << 33)
        writer.event(3.0, "set", policy=Policy.THROTTLE, high=0.85)
        writer.event(3.5, "writeback", max_pages=64, written=3)
        writer.event(4.0, "flush")
        writer.close(5.0)
    with TraceReader(path) as reader:
        assert reader.header["kind"] == "swap"
        assert reader.header["format_version"] == FORMAT_VERSION
        records = list(reader)
        assert reader.complete and not reader.truncated
        assert reader.end_time == 5.0
    assert records == [
        Record("init", 0.0, 0, 2 * P, STATUS_OK, page + page),
        Record("write", 0.5, 8192, P, STATUS_OK, page),
        Record("write", 0.6, 12288, P, STATUS_REJECTED, page),
        Record("write", 0.7, 16384, 100, STATUS_OK, page[:100]),
        Record("read", 1.0, 4096, 8192, STATUS_OK),
        Record("read", 1.1, 1 << 40, 4096, STATUS_INVALID),
        Record("discard", 2.0, 0, 1 << 33, STATUS_OK),
        Record("event", 3.0, 0, records[7].length, STATUS_OK, None, "set",
               {"policy": "throttle", "high": 0.85}),
        Record("event", 3.5, 0, records[8].length, STATUS_OK, None, "writeback",
               {"max_pages": 64, "written": 3}),
        Record("event", 4.0, 0, records[9].length, STATUS_OK, None, "flush", {}),
    ]


def test_many_chunks_read_twice_and_compressed(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    expected = many_records(path)
    assert len(frame_offsets(path)) > 10
    assert path.stat().st_size < 600 * P // 10  # compressed, not raw pages
    with TraceReader(path) as reader:
        assert list(reader) == expected
        assert list(reader) == expected  # each iteration starts over


def test_a_chunk_of_large_and_small_records_round_trips(tmp_path: Path) -> None:
    """Large bodies go to zstd as they are, the small records around them joined: the
    records come back in order either way, one chunk or several."""
    large = b"".join(text_page(i) for i in range(64))  # 256 KiB: streamed as it is
    for chunk_bytes in (4 << 20, 100 << 10):
        path = tmp_path / f"t{chunk_bytes}.trace"
        with TraceWriter(path, HEADER, chunk_bytes=chunk_bytes) as writer:
            for i in range(6):
                writer.write(i, i * P, text_page(i))
                writer.write(i + 0.5, 1 << 20, large)
                writer.read(i + 0.7, 0, P)
            writer.close(9.0)
        with TraceReader(path) as reader:
            records = list(reader)
        assert [(r.op, r.t, len(r.data or b"")) for r in records] == [
            item for i in range(6) for item in (("write", i, P), ("write", i + 0.5, len(large)),
                                                ("read", i + 0.7, 0))]
        assert all(r.data == large for r in records if r.op == "write" and r.length > P)


def test_writer_copies_data_the_caller_reuses(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    buffer = bytearray(text_page(1))
    with TraceWriter(path, HEADER) as writer:
        writer.write(0.0, 0, buffer)
        buffer[:] = bytes(P)
    with TraceReader(path) as reader:
        assert next(iter(reader)).data == text_page(1)


def test_torn_tail_is_readable_up_to_the_last_complete_chunk(tmp_path: Path) -> None:
    whole = tmp_path / "whole.trace"
    expected = many_records(whole, count=200, chunk_bytes=8 << 10)
    data = whole.read_bytes()
    frames = frame_offsets(whole)
    per_chunk = []  # records readable when the file ends at each frame start
    with TraceReader(whole) as reader:
        count = 0
        for _offset, chunk in zip(frames, reader.chunks(), strict=False):
            per_chunk.append(count)
            count += len(chunk)
    cut_path = tmp_path / "cut.trace"
    start = frames[-3]
    for cut in range(start, len(data), 7):
        cut_path.write_bytes(data[:cut])
        with TraceReader(cut_path) as reader:
            records = list(reader)
            assert reader.truncated and not reader.complete
        complete_frames = sum(1 for f in frames[1:] if f <= cut)
        assert records == expected[:per_chunk[complete_frames]] \
            if complete_frames < len(per_chunk) else expected


def test_a_crash_keeps_what_was_flushed(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    writer = TraceWriter(path, HEADER)
    for i in range(10):
        writer.write(i * 0.1, i * P, text_page(i))
    writer.flush(sync=True)
    writer.write(2.0, 0, text_page(99))  # not flushed: lost in the "crash"
    crashed = tmp_path / "crashed.trace"
    shutil.copyfile(path, crashed)
    writer.close()
    with TraceReader(crashed) as reader:
        records = list(reader)
        assert reader.truncated and reader.end_time is None
    assert [r.offset for r in records] == [i * P for i in range(10)]


def test_a_quiet_writer_still_reaches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    with TraceWriter(path, HEADER, interval=0.05) as writer:
        writer.read(0.0, 0, P)
        deadline = time.monotonic() + 5
        while len(frame_offsets(path)) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with TraceReader(path) as reader:
            assert [r.op for r in reader] == ["read"]


def test_zero_filled_tail_counts_as_torn(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    expected = many_records(path, count=50)
    with open(path, "r+b") as file:
        file.seek(frame_offsets(path)[-1])
        file.truncate()
        file.write(bytes(5000))
    with TraceReader(path) as reader:
        assert list(reader) == expected
        assert reader.truncated


def test_foreign_empty_and_newer_files(tmp_path: Path) -> None:
    foreign = tmp_path / "notes.txt"
    foreign.write_text("hello, this is not a trace\n")
    with pytest.raises(TraceError, match=r"notes.txt: not a cramfs trace .* at offset 0$"):
        TraceReader(foreign)
    empty = tmp_path / "empty.trace"
    empty.write_bytes(b"")
    with pytest.raises(TraceError, match="not a cramfs trace"):
        TraceReader(empty)
    newer = tmp_path / "newer.trace"
    many_records(newer, count=3)
    data = bytearray(newer.read_bytes())
    data[8] = FORMAT_VERSION + 1
    newer.write_bytes(bytes(data))
    with pytest.raises(TraceError, match=f"version {FORMAT_VERSION + 1} is not supported"):
        TraceReader(newer)
    with pytest.raises(TraceError, match="missing.trace: No such file"):
        TraceReader(tmp_path / "missing.trace")


def test_corrupt_header_and_middle_chunk(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    many_records(path)
    data = path.read_bytes()
    header = bytearray(data)
    header[FILE_HEAD.size + 3] ^= 0xFF
    path.write_bytes(bytes(header))
    with pytest.raises(TraceError, match=f"corrupt trace header .* at offset {FILE_HEAD.size}"):
        TraceReader(path)
    path.write_bytes(data)
    frames = frame_offsets(path)
    payload = bytearray(data)
    payload[frames[1] + FRAME_HEAD.size + 10] ^= 0x01
    path.write_bytes(bytes(payload))
    with TraceReader(path) as reader, \
            pytest.raises(TraceError, match=f"corrupt chunk .* at offset {frames[1]}$"):
        list(reader)
    head = bytearray(data)
    head[frames[2] + 9] ^= 0x01  # the payload length: caught by the head's own CRC
    path.write_bytes(bytes(head))
    with TraceReader(path) as reader, \
            pytest.raises(TraceError, match=f"corrupt chunk header at offset {frames[2]}$"):
        list(reader)


def test_background_failure_surfaces_on_the_next_call(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.trace", HEADER, chunk_bytes=8192)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, writer._fd)  # the disk is full from now on
    os.close(full)
    with pytest.raises(TraceError, match="writing the trace failed: No space left"):
        for i in range(1000):
            writer.write(i * 0.01, 0, text_page(i))
        writer.flush()
    with pytest.raises(TraceError, match="No space left"):
        writer.read(99.0, 0, P)  # sticky
    writer.close()  # already reported: close does not raise it again


def test_close_raises_an_unreported_failure(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.trace", HEADER)
    writer.write(0.0, 0, text_page(0))
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, writer._fd)
    os.close(full)
    with pytest.raises(TraceError, match="No space left"):
        writer.close()
    with pytest.raises(TraceError, match="No space left"):
        writer.write(1.0, 0, text_page(0))


def test_closed_writer_refuses(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.trace", HEADER)
    writer.close()
    writer.close()
    with pytest.raises(TraceError, match="closed"):
        writer.read(0.0, 0, P)


def test_unwritable_path(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot create the trace"):
        TraceWriter(tmp_path / "no" / "such" / "dir.trace", HEADER)


def test_status_of_device_errors() -> None:
    assert status_of(None) == STATUS_OK
    assert status_of(WriteRejected("full", "x")) == STATUS_REJECTED
    assert status_of(OutOfRange("x")) == STATUS_INVALID
    assert status_of(PoisonedPage(3)) == STATUS_IO_ERROR
    assert status_of(BackingError("x")) == STATUS_IO_ERROR


def test_start_trace_snapshots_a_device_that_holds_data(tmp_path: Path) -> None:
    device = CompressedDevice(DeviceConfig(size=1024 * P, pool=256 * P, policy=Policy.NONE))
    try:
        for index in (3, 4, 5, 700):
            device.write(index * P, text_page(index))
        device.write(900 * P, b"\x07" * P)  # same-filled: stored without pool space
        device.set_watermarks(low=0.5, high=0.6)
        writer = start_trace(tmp_path / "t.trace", "swap0", "swap", device)
        writer.write(writer.now(), 0, text_page(0))
        writer.close()
    finally:
        device.close()
    with TraceReader(tmp_path / "t.trace") as reader:
        header = reader.header
        records = list(reader)
    assert header["config"]["policy"] == "none" and header["config"]["high"] == 0.6
    assert header["initial"]["pages"] == 5 and header["initial"]["requests_before"] == 5
    inits = [r for r in records if r.op == "init"]
    assert [(r.offset // P, r.length // P) for r in inits] == [(3, 3), (700, 1), (900, 1)]
    assert inits[0].data == text_page(3) + text_page(4) + text_page(5)
    assert records[-1].op == "write"


def test_the_daemon_records_each_answer_with_its_status(tmp_path: Path) -> None:
    """daemon.recording.request: an answer with its status, an injected fault as an event
    (it never reached the device), and nothing for an exception that is not the device's."""
    from cramfs.errors import InjectedFault
    from daemon import recording
    from daemon.devices import DeviceEntry

    path = tmp_path / "t.trace"
    device = CompressedDevice(DeviceConfig(size=1 << 20, pool=1 << 18))
    entry = DeviceEntry("swap0", "swap", device, trace=TraceWriter(path, HEADER))
    try:
        request = recording.request
        request(entry, "write", 0, text_page(1), None)
        request(entry, "write", P, text_page(2), WriteRejected("full", "no room"))
        request(entry, "read", 2 * P, P, PoisonedPage(2))
        request(entry, "discard", 0, P, None)
        request(entry, "read", 0, P, InjectedFault("injected read error"))
        request(entry, "read", 0, P, RuntimeError("a bug"))
        recording.stop(entry)
    finally:
        device.close()
    with TraceReader(path) as reader:
        got = [(r.op, r.offset, r.status, r.event, r.fields) for r in reader]
    assert got == [("write", 0, STATUS_OK, None, None),
                   ("write", P, STATUS_REJECTED, None, None),
                   ("read", 2 * P, STATUS_IO_ERROR, None, None),
                   ("discard", 0, STATUS_OK, None, None),
                   ("event", 0, STATUS_OK, "fault", {"op": "read"})]


def test_a_trace_path_inside_the_daemons_own_mount_is_recognised_without_looking_in_it(
        tmp_path: Path) -> None:
    """recording.inside never stats under the mountpoint (that would be a request the daemon
    must answer itself), but follows symlinks outside it that lead in."""
    from daemon.recording import inside

    mount = tmp_path / "mnt"
    mount.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "into").symlink_to(mount / "swap0")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert inside(mount / "swap0" / "data", mount)
    assert inside(mount, mount)
    assert inside(tmp_path / "elsewhere" / ".." / "mnt" / "x", mount)
    assert inside(tmp_path / "into" / "data", mount)
    assert inside(tmp_path / "loop" / "x", mount)  # a loop is refused, not followed forever
    assert not inside(tmp_path / "elsewhere" / "t.trace", mount)
    assert not inside(tmp_path / "mnt2" / "t.trace", mount)
