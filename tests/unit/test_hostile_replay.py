"""Hostile replays: every cut of a trace, bit flips, empty and foreign files, bad --set values,
and the same variant's numbers wherever it sits among others (shared passes, processes)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cramfs import PAGE_SIZE
from cramfs.device import CompressedDevice, DeviceConfig
from cramfs.replay import replay, replay_all
from cramfs.trace import start_trace
from cramfs.watermarks import Policy
from daemon import replay_cli

from .test_replay import Recorder, live_numbers, record_node, replayed_numbers, strip_timing

P = PAGE_SIZE
TiB = 1 << 40


@pytest.fixture(scope="module")
def trace_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("hostile") / "node.trace"
    record_node(path, steps=300)
    return path.read_bytes()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = replay_cli.main(["replay", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_refusal_or_result(code: int, out: str, err: str) -> None:
    assert code in (0, 2), (code, err)
    if code == 2:
        assert not out and err.startswith("cramfs: ") and err.count("\n") == 1, err
        assert "Traceback" not in err
    else:
        assert out and "Traceback" not in err


def test_every_cut_of_a_trace_replays_or_is_refused_in_one_line(
        tmp_path: Path, trace_bytes: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cut.trace"
    n = len(trace_bytes)
    cuts = sorted({*range(0, min(n, 300)), *range(0, n, max(1, n // 60)), n - 1})
    outcomes = set()
    for cut in cuts:
        path.write_bytes(trace_bytes[:cut])
        code, out, err = cli(capsys, str(path), "--json")
        assert_one_line_refusal_or_result(code, out, err)
        outcomes.add(code)
    assert outcomes == {0, 2}  # a bare header refuses; a cut after a chunk replays


@pytest.mark.parametrize("content", [b"", b"\n", b"CRAMFS", b"\xff" * 4096,
                                     b"PK\x03\x04" + bytes(200)])
def test_empty_and_foreign_files_are_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    path = tmp_path / "foreign.trace"
    path.write_bytes(content)
    code, out, err = cli(capsys, str(path))
    assert code == 2 and not out and err.count("\n") == 1 and err.startswith("cramfs: ")


def test_a_directory_is_refused_in_one_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, str(tmp_path))
    assert code == 2 and not out and err.count("\n") == 1


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_a_bit_flipped_trace_replays_or_is_refused_in_one_line(
        tmp_path: Path, trace_bytes: bytes, capsys: pytest.CaptureFixture[str],
        where: float, bit: int) -> None:
    data = bytearray(trace_bytes)
    data[int(where * len(data))] ^= 1 << bit
    path = tmp_path / "flipped.trace"
    path.write_bytes(bytes(data))
    code, out, err = cli(capsys, str(path), "--json")
    assert_one_line_refusal_or_result(code, out, err)


@pytest.mark.parametrize("text", [
    "", "=", "pool=", "=64M", "pool==64M", "pool=64M,", ",pool=64M", "pool=64M,,low=0.5",
    "pool=1.5G", "pool=-4K", "pool=0", "pool=4097", "level=abc",
    "level=1.5", "low=0.9,high=0.8", "low=inf", "high=-1", "policy=", "policy=REJECT ",
    "compressor=gzip", "huge_threshold=-1", "huge_threshold=99999",
    "zero_flush_interval=-1", "zero_flush_interval=1e9", "throttle_max_delay=nan",
    "no_alloc_on_full=2", "size=15T", "kind=zswap", "max_pool_percent=50",
    "POOL=64M", " pool = 64M x",
    "pool=99999999T", "pool=64T"])
def test_bad_set_values_are_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], trace_bytes: bytes,
        text: str) -> None:
    path = tmp_path / "node.trace"
    path.write_bytes(trace_bytes)
    code, out, err = cli(capsys, str(path), "--set", text)
    assert code == 2, (text, out[:200])
    assert not out and err.startswith("cramfs: ") and err.count("\n") == 1, (text, err)


def test_a_variant_gets_the_same_numbers_wherever_it_sits(tmp_path: Path) -> None:
    """Run for run, alone, repeated, first or last among variants that share its pass or
    not, in one process or several: the same numbers."""
    path = tmp_path / "node.trace"
    record_node(path, steps=600, pool=32 * P)
    target: dict[str, Any] = {"pool": 24 * P, "policy": Policy.THROTTLE}
    others: list[dict[str, Any]] = [{}, {"pool": 48 * P}, {"low": 0.3, "high": 0.5},
                                    {"compressor": "lz4"}, {"level": 3}]
    alone = strip_timing(replay(path, target))
    assert strip_timing(replay(path, target)) == alone
    rng = random.Random(3)
    for jobs in (1, 2):
        for _ in range(3):
            variants = [dict(v) for v in others]
            rng.shuffle(variants)
            at = rng.randrange(len(variants) + 1)
            variants.insert(at, dict(target))
            variants.insert(rng.randrange(len(variants) + 1), dict(target))  # twice
            results = replay_all(path, [{}, *variants], jobs=jobs)
            mine = [strip_timing(r) for r, v in zip(results[1:], variants, strict=True)
                    if v == target]
            assert len(mine) == 2
            for result in mine:
                assert {k: v for k, v in result.items() if k != "pass_variants"} == {
                    k: v for k, v in alone.items() if k != "pass_variants"}


@pytest.mark.parametrize("snapshot", [False, True])
def test_a_15_tib_node_replays_as_recorded(tmp_path: Path, snapshot: bool) -> None:
    """Far offsets, the last pages, discards across 512-page chunks and past the end, from an
    empty device or from a snapshot of pages stored at its far end: the replay ends with the
    live device's numbers."""
    device = CompressedDevice(DeviceConfig(size=15 * TiB, pool=2 << 20, level=1, low=0.5,
                                           high=0.7))
    rng = random.Random(1)
    try:
        if snapshot:
            for i in range(50):
                device.write(device.size - P * (i * 7 + 1), rng.randbytes(1500) + bytes(2596))
        rec = Recorder(device, start_trace(tmp_path / "t.trace", "node0", "node", device))
        for _ in range(800):
            rec.tick(rng)
            off = rng.choice([0, 7 * TiB, device.size - 256 * P]) + rng.randrange(600) * P
            r = rng.random()
            if r < 0.6:
                rec.write(off, rng.randbytes(1500) + bytes(2596))
            elif r < 0.8:
                rec.read(off, P)
            else:
                rec.discard(off, rng.choice([P, 4 * P, 700 * P]))
        rec.writer.close(rec.t)
        live = live_numbers(device)
    finally:
        device.close()
    replayed = replayed_numbers(replay(tmp_path / "t.trace"))
    if snapshot:  # counters are relative to the snapshot
        live.pop("counters")
        replayed.pop("counters")
    assert replayed == live


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["write", "read", "discard", "event", "flush"]),
                              st.sampled_from([0, 1, 4095, 4096, 65535, 65536, 70000, 200000]),
                              st.integers(0, 255)), min_size=1, max_size=60),
       chunk_kib=st.sampled_from([1, 8, 64, 300]))
def test_the_trace_writer_keeps_each_record_as_it_was_when_recorded(
        tmp_path: Path, ops: list[tuple[str, int, int]], chunk_kib: int) -> None:
    """The writer copies bodies into reused chunk buffers: a caller's buffer reused at once
    (as FUSE reuses its request buffers), bodies around the gathering threshold, chunks
    smaller than one body and flushes in between must all read back exactly."""
    from cramfs.trace import TraceReader, TraceWriter

    path = tmp_path / "w.trace"
    writer = TraceWriter(path, {"device": {}}, chunk_bytes=chunk_kib << 10)
    scratch = bytearray(200000)
    expected: list[tuple[str, int, int, bytes | None]] = []
    t = 0.0
    for i, (op, size, fill) in enumerate(ops):
        t += 0.001
        if op == "write":
            scratch[:size] = bytes([fill]) * size
            if size:
                scratch[size // 2] = (fill + 1) % 256
            body = bytes(scratch[:size])
            kind = i % 3  # a bytearray, a memoryview of it, or bytes
            given_body = (scratch[:size], memoryview(scratch)[:size], body)[kind]
            writer.write(t, i * P, given_body)
            scratch[:size] = bytes(size)  # the caller reuses its buffer at once
            expected.append(("write", i * P, size, body))
        elif op == "read":
            writer.read(t, i * P, size)
            expected.append(("read", i * P, size, None))
        elif op == "discard":
            writer.discard(t, i * P, size)
            expected.append(("discard", i * P, size, None))
        elif op == "event":
            writer.event(t, "set", note="x" * size)
            expected.append(("event", 0, -1, None))
        else:
            writer.flush()
    writer.close(t + 1)
    with TraceReader(path) as reader:
        got = list(reader)
    assert len(got) == len(expected)
    for record, (op, offset, length, body) in zip(got, expected, strict=True):
        assert record.op == op
        if op == "event":
            assert record.event == "set" and record.fields is not None
            continue
        assert (record.offset, record.length, record.data) == (offset, length, body)


def test_a_plot_into_a_directory_is_refused_in_one_line(
        tmp_path: Path, trace_bytes: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "node.trace"
    path.write_bytes(trace_bytes)
    target = tmp_path / "plots"
    target.mkdir()
    code, out, err = cli(capsys, str(path), "--plot", str(target))
    assert not (tmp_path / "plots.png").exists(), "wrote a file the user did not name"
    assert code == 2 and not out and err.count("\n") == 1
