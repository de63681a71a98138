"""Replay: a trace recorded as the daemon records it reproduces the live device exactly;
variants, settings, determinism, the command line and the plot."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cramfs import PAGE_SIZE
from cramfs.codec import Codec
from cramfs.device import CompressedDevice, DeviceConfig
from cramfs.errors import DeviceError, InjectedFault
from cramfs.replay import (
    TIMING_KEYS,
    ExpectingCodec,
    ReplayError,
    ahead,
    parse_settings,
    plan_passes,
    prepare_chunk,
    render_table,
    replay,
    replay_all,
)
from cramfs.timing import TimingConfig
from cramfs.trace import OP_READ, OP_WRITE, RawRecord, TraceWriter, start_trace, status_of
from cramfs.watermarks import FailureMode, Policy
from cramfs.zswap import ZswapDevice
from daemon import replay_cli

P = PAGE_SIZE
LARGE = 64 * 1024  # daemon/fs.py THREAD_MIN_BYTES: the split path from here up


class Recorder:
    """Drives a device the way daemon/fs.py and daemon/main.py do, recording as they must:
    each request after the device answered (refused ones too: they change counters), with
    the status it got; flushes, writeback batches, compaction, max resets and tunable
    changes as events."""

    def __init__(self, device: CompressedDevice, writer: TraceWriter) -> None:
        self.device, self.writer = device, writer
        self.t = 0.0

    def tick(self, rng: random.Random) -> float:
        self.t += rng.expovariate(2000)
        return self.t

    def write(self, offset: int, data: bytes) -> None:
        device, exc = self.device, None
        try:
            if device.timing.active or len(data) >= LARGE:
                device.check_range(offset, len(data))
            if device.timing.active:
                try:
                    device.inject_fault("write")
                except InjectedFault:
                    self.writer.event(self.t, "fault", op="write")
                    return
            if len(data) < LARGE:
                device.write(offset, data)
            else:
                device.precheck_write(offset, data)
                device.commit_write(device.prepare_write(offset, data))
        except DeviceError as error:
            exc = error
        self.writer.write(self.t, offset, data, status_of(exc))

    def read(self, offset: int, length: int) -> None:
        device, exc = self.device, None
        length = max(0, min(length, device.size - offset))
        if not length:
            return
        try:
            if device.timing.active:
                try:
                    device.inject_fault("read")
                except InjectedFault:
                    self.writer.event(self.t, "fault", op="read")
                    return
            if length < LARGE:
                device.read(offset, length)
            else:
                device.decode(device.fetch(offset, length))
        except DeviceError as error:
            exc = error
        self.writer.read(self.t, offset, length, status_of(exc))

    def discard(self, offset: int, length: int) -> None:
        exc = None
        try:
            self.device.discard(offset, length)
        except DeviceError as error:
            exc = error
        self.writer.discard(self.t, offset, length, status_of(exc))

    def flush(self) -> None:
        if self.device.flush_releases():
            self.writer.event(self.t, "flush")

    def writeback(self) -> None:
        device = self.device
        assert isinstance(device, ZswapDevice)
        if device.needs_writeback():
            written = device.writeback(max_pages=64)
            self.writer.event(self.t, "writeback", max_pages=64, written=written)

    def set(self, **values: Any) -> None:
        device = self.device
        try:
            if "low" in values or "high" in values:
                device.set_watermarks(low=values.get("low"), high=values.get("high"))
            elif "policy" in values:
                device.set_policy(values["policy"])
            elif "no_alloc" in values:
                device.set_no_alloc(values["no_alloc"])
            elif "max_pool_percent" in values:
                assert isinstance(device, ZswapDevice)
                device.set_limits(max_pool_percent=values["max_pool_percent"])
            else:
                for key, value in values.items():
                    setattr(device, key, value)
        except ValueError:
            return  # refused (EINVAL): nothing changed, nothing recorded
        self.writer.event(self.t, "set", **values)


def page(rng: random.Random, i: int) -> bytes:
    kind = rng.random()
    if kind < 0.15:
        return bytes(P)
    if kind < 0.22:
        return bytes([rng.randrange(1, 256)]) * P
    if kind < 0.45:
        return rng.randbytes(P)
    if kind < 0.7:
        n = rng.randrange(600, 2800)
        return rng.randbytes(n) + bytes(P - n)
    line = f"{i:07d} swap page text {rng.random():.6f}\n".encode()
    return (line * (P // len(line) + 1))[:P]


def workload(rec: Recorder, rng: random.Random, steps: int, zswap: bool = False) -> None:
    """A random mix: writes of 1..32 pages (some unaligned), zero writes, reads, discards,
    flushes, tunable changes, compaction, max resets."""
    device = rec.device
    pages = device.pages
    for i in range(steps):
        rec.tick(rng)
        r = rng.random()
        first = rng.randrange(pages)
        if r < 0.50:
            count = rng.choice((1, 1, 1, 1, 2, 8, 17, 32))
            data = b"".join(page(rng, i) for _ in range(count))
            offset = min(first * P, device.size - len(data))
            if rng.random() < 0.1:
                offset = max(0, offset - rng.randrange(1, P))
            rec.write(offset, data)
        elif r < 0.56:
            rec.write(first * P, bytes(P))
        elif r < 0.80:
            rec.read(first * P + rng.choice((0, 0, 100)), rng.choice((P, P, 3 * P, 20 * P)))
        elif r < 0.88:
            rec.discard(first * P + rng.choice((0, 0, 512)), rng.randrange(1, 40) * P)
        elif r < 0.93:
            if zswap:
                rec.writeback()
            else:
                rec.flush()
        elif r < 0.95:
            rec.write(pages * P, text_page())  # outside the device: invalid_io
        else:
            tune(rec, rng, zswap)


def text_page() -> bytes:
    return (b"outside " * (P // 8))[:P]


def tune(rec: Recorder, rng: random.Random, zswap: bool) -> None:
    choice = rng.randrange(8)
    if choice == 0:
        low = rng.choice((0.5, 0.6, 0.7))
        rec.set(low=low, high=low + 0.2)
    elif choice == 1:
        rec.set(high=rng.choice((0.75, 0.85, 0.95)))
    elif choice == 2 and not zswap:
        rec.set(policy=rng.choice(list(Policy)))
    elif choice == 3 and not zswap:
        rec.set(failure_mode=rng.choice(list(FailureMode)))
    elif choice == 4 and not zswap:
        rec.set(no_alloc=rng.random() < 0.3)
    elif choice == 5:
        rec.device.compact()
        rec.writer.event(rec.t, "compact")
    elif choice == 6:
        rec.device.reset_max()
        rec.writer.event(rec.t, "reset_max")
    elif choice == 7 and zswap:
        rec.set(max_pool_percent=rng.choice((30, 50, 80)))
    else:
        rec.set(throttle_max_delay=rng.choice((0.01, 0.05)))


def live_numbers(device: CompressedDevice) -> dict[str, Any]:
    numbers: dict[str, Any] = {
        "mm_stat": device.mm_stat(), "io_stat": device.io_stat(),
        "counters": dataclasses.asdict(device.counters),
        "events": dict(device.watermarks.events), "state": device.watermarks.state.value,
        "poisoned": sorted(device.poisoned), "lost": sorted(device.lost)}
    if isinstance(device, ZswapDevice):
        numbers["debugfs"] = device.debugfs()
    return numbers


def replayed_numbers(result: dict[str, Any]) -> dict[str, Any]:
    numbers: dict[str, Any] = {
        "mm_stat": tuple(result["mm_stat"].values()),
        "io_stat": tuple(result["io_stat"].values()),
        "counters": result["counters"], "events": result["watermark_events"],
        "state": result["final_state"], "poisoned": result["poisoned_pages"],
        "lost": result["dropped_pages"]}
    if "zswap" in result:
        numbers["debugfs"] = result["zswap"]
    return numbers


def record_node(path: Path, seed: int = 7, steps: int = 1500,
                **config: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"size": 512 * P, "pool": 40 * P, "level": 1,
                                "zero_flush_interval": 0.05, "low": 0.6, "high": 0.8}
    settings.update(config)
    device = CompressedDevice(DeviceConfig(**settings))
    try:
        rec = Recorder(device, start_trace(path, "node0", "node", device))
        workload(rec, random.Random(seed), steps)
        rec.writer.close(rec.t)
        return live_numbers(device)
    finally:
        device.close()


def test_replay_as_recorded_reproduces_the_live_device(tmp_path: Path) -> None:
    path = tmp_path / "node.trace"
    live = record_node(path)
    result = replay(path)
    assert replayed_numbers(result) == live
    assert result["outcomes_changed"] == 0
    assert result["background"] == {"zero_flush": "recorded", "writeback": "none"}
    assert not result["relative_counters"]
    counters = live["counters"]
    # The workload did exercise what it is meant to.
    assert counters["failed_writes"] and counters["invalid_io"] and counters["notify_free"]
    assert sum(counters["rejected"].values()) and counters["discard_requests"]
    assert live["events"]["high"] and live["mm_stat"][8]


@pytest.mark.parametrize("policy", [Policy.NONE, Policy.THROTTLE])
def test_replay_reproduces_lost_pages_and_throttling(tmp_path: Path, policy: Policy) -> None:
    path = tmp_path / "node.trace"
    live = record_node(path, seed=11, steps=1000, policy=policy, pool=24 * P)
    result = replay(path)
    assert replayed_numbers(result) == live
    if policy is Policy.NONE:
        assert result["lost_pages"] > 0
    else:
        assert result["throttled_writes"] > 0 and result["throttle_seconds"] > 0


def test_replay_reproduces_injected_faults(tmp_path: Path) -> None:
    path = tmp_path / "node.trace"
    timing = TimingConfig(read_error_rate=0.05, write_error_rate=0.05, seed=3)
    live = record_node(path, seed=5, steps=600, timing=timing)
    assert live["counters"]["injected_errors"]["write"] > 0
    assert replayed_numbers(replay(path)) == live


def test_replay_reproduces_a_zswap_device_with_writeback(tmp_path: Path) -> None:
    path = tmp_path / "zswap.trace"
    config = DeviceConfig(size=512 * P, pool=64 * P, level=1)
    device = ZswapDevice(config, tmp_path / "backing.img", max_pool_percent=40,
                         accept_threshold_percent=70)
    try:
        rec = Recorder(device, start_trace(path, "zswap0", "zswap", device,
                                           backing_file=str(tmp_path / "backing.img")))
        workload(rec, random.Random(3), 1500, zswap=True)
        rec.writer.close(rec.t)
        live = live_numbers(device)
    finally:
        device.close()
    assert live["counters"]["written_back_pages"] > 0 and live["debugfs"]["pool_limit_hit"]
    result = replay(path)
    assert replayed_numbers(result) == live
    assert result["background"] == {"zero_flush": "none", "writeback": "recorded"}
    # A variant that changes pool use gets the shrinker on the trace clock instead.
    variant = replay(path, {"max_pool_percent": 20})
    assert variant["background"]["writeback"] == "synthesized"
    assert variant["synthesized_events"]["writeback"] > 0
    assert variant["written_back_pages"] > 0
    assert variant["peak_pool_bytes"] <= result["peak_pool_bytes"]


def test_smaller_pool_variant_rejects_more(tmp_path: Path) -> None:
    path = tmp_path / "node.trace"
    record_node(path, pool=64 * P)
    recorded, smaller = replay_all(path, [{}, parse_settings("pool=24K")], jobs=2)
    assert smaller["settings"] == {"pool": 24 * 1024}
    assert smaller["label"] == "pool=24K"
    assert sum(smaller["rejected_writes"].values()) > sum(recorded["rejected_writes"].values())
    assert smaller["outcomes_changed"] > 0
    assert smaller["mm_stat"]["mem_limit"] == 24 * 1024
    assert smaller["peak_pool_bytes"] <= 24 * 1024


def test_variants_sharing_a_pass_get_what_they_get_alone(tmp_path: Path) -> None:
    """Variants that encode alike share one pass over the trace (one compression of each
    page); each still gets exactly its own replay's numbers."""
    path = tmp_path / "node.trace"
    record_node(path, steps=800)
    variants: list[dict[str, Any]] = [{}, {"pool": 24 * P}, {"policy": Policy.THROTTLE},
                                      {"compressor": "deflate"}, {"huge_threshold": 2048}]
    together = replay_all(path, variants, jobs=1)
    assert [r["pass_variants"] for r in together] == [3, 3, 3, 1, 1]
    alone = [replay(path, settings) for settings in variants]
    assert [strip_timing(r) for r in together] == [strip_timing(r) for r in alone]
    assert together[1]["outcomes_changed"] > 0  # the smaller pool did change outcomes


def test_a_zswap_pass_gives_each_device_its_own_backing_file(tmp_path: Path) -> None:
    path = tmp_path / "zswap.trace"
    device = ZswapDevice(DeviceConfig(size=512 * P, pool=64 * P, level=1),
                         tmp_path / "backing.img", max_pool_percent=40)
    try:
        rec = Recorder(device, start_trace(path, "zswap0", "zswap", device))
        workload(rec, random.Random(8), 800, zswap=True)
        rec.writer.close(rec.t)
    finally:
        device.close()
    variants: list[dict[str, Any]] = [{}, {"max_pool_percent": 20}]
    together = replay_all(path, variants, jobs=1)
    assert together[0]["pass_variants"] == 2
    assert together[0]["written_back_pages"] and together[1]["written_back_pages"]
    assert [strip_timing(r) for r in together] == [
        strip_timing(replay(path, settings)) for settings in variants]


def test_plan_passes_groups_alike_variants_and_keeps_every_cpu_busy() -> None:
    zstd, lz4 = ("zstd", -1, 3264), ("lz4", None, 3264)
    assert plan_passes([zstd, zstd, lz4, zstd, lz4], 1) == [[0, 1, 3], [2, 4]]
    assert plan_passes([zstd, zstd, zstd], 2) == [[0, 1], [2]]
    assert plan_passes([zstd, zstd, zstd, zstd], 4) == [[0], [1], [2], [3]]
    assert plan_passes([zstd], 2) == [[0]]


def test_synthesized_zero_flush(tmp_path: Path) -> None:
    path = tmp_path / "node.trace"
    record_node(path, steps=800)
    result = replay(path, {"zero_flush_interval": 0.02})
    assert result["background"]["zero_flush"] == "synthesized"
    assert result["synthesized_events"]["flush"] > 0
    assert replay(path, {"zero_flush_interval": 0.0})["background"]["zero_flush"] == "none"


def strip_timing(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in TIMING_KEYS}


def test_replay_is_deterministic(tmp_path: Path) -> None:
    path = tmp_path / "node.trace"
    record_node(path, steps=800)
    for settings in ({}, {"pool": 32 * P, "policy": Policy.THROTTLE},
                     {"zero_flush_interval": 0.01}):
        first, second = replay(path, settings), replay(path, settings)
        assert json.dumps(strip_timing(first)) == json.dumps(strip_timing(second))
    parallel = replay_all(path, [{}, {"pool": 32 * P}], jobs=2)
    serial = replay_all(path, [{}, {"pool": 32 * P}], jobs=1)
    assert [strip_timing(r) for r in parallel] == [strip_timing(r) for r in serial]


def test_snapshot_start_replays_from_the_same_contents(tmp_path: Path) -> None:
    device = CompressedDevice(DeviceConfig(size=256 * P, pool=256 * P, level=1))
    rng = random.Random(2)
    try:
        for index in range(0, 200, 3):
            device.write(index * P, page(rng, index))
        before = dataclasses.asdict(device.counters)
        rec = Recorder(device, start_trace(tmp_path / "t.trace", "swap0", "swap", device))
        for i in range(200):
            rec.tick(rng)
            rec.write(rng.randrange(256) * P, page(rng, i))
            rec.read(rng.randrange(256) * P, P)
        rec.writer.close(rec.t)
        live_mm = device.mm_stat()
        delta = {k: v - before[k] for k, v in dataclasses.asdict(device.counters).items()
                 if isinstance(v, int)}
    finally:
        device.close()
    result = replay(tmp_path / "t.trace")
    assert result["relative_counters"] and result["trace"]["initial_pages"] > 0
    # The snapshot's restore is timed apart: pages_per_second is the requests' rate.
    assert 0 < result["initial_seconds"] < result["wall_seconds"]
    assert result["pages_per_second"] > 0
    replayed_mm = list(result["mm_stat"].values())
    for field in (0, 1, 5, 7):  # orig_data_size compr_data_size same_pages huge_pages
        assert replayed_mm[field] == live_mm[field]
    for key in ("write_requests", "read_requests", "written_bytes", "failed_writes"):
        assert result["counters"][key] == delta[key]
    assert "held" in render_table([result])


def test_truncated_trace_replays_up_to_its_last_chunk(tmp_path: Path) -> None:
    path = tmp_path / "node.trace"
    device = CompressedDevice(DeviceConfig(size=256 * P, pool=64 * P))
    try:
        writer = start_trace(path, "node0", "node", device, chunk_bytes=8 << 10)
        rec = Recorder(device, writer)
        workload(rec, random.Random(1), 300)
        writer.close(rec.t)
    finally:
        device.close()
    whole = replay(path)["trace"]["requests"]["write"]
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])
    result = replay(path)
    assert result["trace"]["truncated"]
    assert 0 < result["trace"]["requests"]["write"] < whole


def encoding(item: Any) -> tuple[int, int, bool, bytes]:
    return item.kind, item.fill, item.poor, bytes(item.payload)


@pytest.mark.parametrize("compressor", ["zstd", "deflate"])
def test_pages_encoded_ahead_are_what_the_device_would_make(compressor: str) -> None:
    """One encode_batch over a chunk's writes, split per write, gives each write's whole
    pages exactly as encode_page does them: kind, fill word, poor flag and bytes."""
    rng = random.Random(4)
    codec = Codec(1 if compressor == "zstd" else None, threads=2, compressor=compressor)
    records: list[RawRecord] = []
    for i in range(60):
        count = rng.choice((1, 1, 3, 17, 40))
        data = b"".join(page(rng, i) for _ in range(count))
        offset = rng.randrange(256) * P + rng.choice((0, 0, 0, 100))
        records.append((OP_WRITE, 0, i / 100, offset, len(data), memoryview(data)))
        records.append((OP_READ, 0, i / 100, offset, P, None))
    try:
        prepared, expects = prepare_chunk(list(records), codec)
        for (_, _, _, offset, length, body), expected in zip(prepared, expects, strict=True):
            if body is None:
                assert expected is None
                continue
            assert type(body) is bytes
            head = (P - offset % P) % P
            whole = body[head:head + (length - head) // P * P]
            if not whole:  # an unaligned page: two partial pages, merged by the device
                assert expected is None
                continue
            assert expected is not None and expected[0] == whole
            assert [encoding(e) for e in expected[1]] == [
                encoding(codec.encode_page(whole[i:i + P])) for i in range(0, len(whole), P)]
    finally:
        codec.close()


def test_the_device_thread_neither_compresses_nor_decompresses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Aligned writes, reads and discards: every page the device stores was encoded ahead,
    and no read is decompressed; the result is still the live device's."""
    path = tmp_path / "node.trace"
    device = CompressedDevice(DeviceConfig(size=512 * P, pool=64 * P, level=1, low=0.6,
                                           high=0.8))
    rng = random.Random(9)
    try:
        rec = Recorder(device, start_trace(path, "node0", "node", device, chunk_bytes=64 << 10))
        for i in range(800):
            rec.tick(rng)
            first, r = rng.randrange(480), rng.random()
            if r < 0.6:
                rec.write(first * P, b"".join(page(rng, i) for _ in range(rng.choice((1, 20)))))
            elif r < 0.9:
                rec.read(first * P, rng.choice((P, 20 * P)))
            else:
                rec.discard(first * P, rng.randrange(1, 8) * P)
        rec.writer.close(rec.t)
        live = live_numbers(device)
    finally:
        device.close()
    main = threading.current_thread()
    calls: list[str] = []

    def watch(name: str) -> None:
        original = getattr(Codec, name)

        def watched(self: Codec, *args: Any) -> Any:
            if isinstance(self, ExpectingCodec) and threading.current_thread() is main:
                calls.append(name)
            return original(self, *args)

        monkeypatch.setattr(Codec, name, watched)

    for name in ("encode_page", "encode_batch", "encode_pages", "decode_pages",
                 "decode_joined", "inflate_runs", "decompress"):
        watch(name)
    result = replay(path)
    assert replayed_numbers(result) == live
    assert live["counters"]["read_requests"] > 100 and live["counters"]["discard_requests"]
    assert calls == []


def test_ahead_keeps_order_raises_in_order_and_stops_early() -> None:
    assert list(ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("torn")

    got: list[int] = []
    with pytest.raises(ValueError, match="torn"):
        for item in ahead(failing()):
            got.append(item)
    assert got == [1, 2]
    made: list[int] = []

    def endless() -> Iterator[int]:
        n = 0
        while True:
            made.append(n)
            yield n
            n += 1

    stream = ahead(endless(), depth=2)
    assert next(stream) == 0
    stream.close()  # the consumer stops: so does the thread, a few items ahead at most
    assert len(made) <= 5
    assert not [t for t in threading.enumerate() if t.name == "cramfs-replay-ahead"]


def test_parse_settings() -> None:
    assert parse_settings("pool=64M, level=3,low=0.5,policy=throttle") == {
        "pool": 64 << 20, "level": 3, "low": 0.5, "policy": Policy.THROTTLE}
    assert parse_settings("level=-1,failure_mode=drop,no_alloc_on_full=yes") == {
        "level": -1, "failure_mode": FailureMode.DROP, "no_alloc_on_full": True}
    assert parse_settings("max_pool_percent=30,zero_flush_interval=0.5") == {
        "max_pool_percent": 30, "zero_flush_interval": 0.5}
    for text, message in (
            ("nope=1", "nope: unknown setting"),
            ("pool=12Q", "pool: not a size"),
            ("policy=maybe", "policy: must be one of reject, throttle, none"),
            ("low=high", "low: not a number"),
            ("low=nan", "low: not a finite number"),
            ("pool", "expected KEY=VALUE"),
            ("pool=1M,pool=2M", "pool: set twice"),
            ("size=1G", "size: cannot be changed in a replay"),
            ("timing=1", "timing: cannot be changed"),
            ("interrupts=1", "interrupts: cannot be set")):
        with pytest.raises(ReplayError, match=message):
            parse_settings(text)


def test_settings_the_device_refuses(tmp_path: Path) -> None:
    path = tmp_path / "node.trace"
    record_node(path, steps=50)
    for settings, message in (({"low": 0.95}, "low .* must be below high"),
                              ({"pool": 1000}, "pool must be a positive multiple"),
                              ({"max_pool_percent": 5}, "only for zswap devices"),
                              ({"huge_threshold": 0}, "huge_threshold")):
        with pytest.raises(ReplayError, match=message):
            replay_all(path, [{}, settings])


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = replay_cli.main(["replay", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.trace"
    record_node(path, steps=400)
    code, out, err = run_cli(capsys, str(path), "--json", "--set", "pool=32K",
                             "--set", "pool=32K,policy=throttle")
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == {"trace", "variants"}
    trace = report["trace"]
    assert trace["header"]["kind"] == "node" and trace["duration"] > 0
    assert trace["requests"]["write"] > 0 and trace["bytes"]["write"] > 0
    assert [v["settings"] for v in report["variants"]] == [
        {}, {"pool": 32768}, {"pool": 32768, "policy": "throttle"}]
    variant = report["variants"][1]
    for key in ("mm_stat", "rejected_writes", "lost_pages", "watermark_events",
                "time_in_state", "peak_pool_bytes", "final_pool_bytes", "effective_ratio",
                "compression_ratio", "throttle_seconds", "written_back_pages",
                "cpu_seconds_per_gib", "failed_reads", "failed_writes"):
        assert key in variant, key
    assert list(variant["mm_stat"]) == ["orig_data_size", "compr_data_size",
                                        "mem_used_total", "mem_limit", "mem_used_max",
                                        "same_pages", "pages_compacted", "huge_pages",
                                        "huge_pages_since"]
    assert set(variant["time_in_state"]) == {"ok", "pressure", "full"}
    assert abs(sum(variant["time_in_state"].values()) - trace["duration"]) < 1e-6
    assert set(variant["watermark_events"]) == {"high", "low", "full"}
    assert "timeline" not in variant


def test_cli_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.trace"
    record_node(path, steps=200)
    code, out, _ = run_cli(capsys, str(path), "--set", "pool=32K")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"trace {path}: node device node0")
    assert "as recorded" in lines[1] and "pool=32K" in lines[1]
    assert any(line.startswith("mem_used_total") for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["--set", "pool=nope"], "cramfs: pool: not a size"),
    (["--set", "color=blue"], "cramfs: color: unknown setting"),
    (["--set", "low=0.99"], "cramfs: low=0.99: watermark low"),
])
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 argv: list[str], message: str) -> None:
    path = tmp_path / "node.trace"
    record_node(path, steps=20)
    code, out, err = run_cli(capsys, str(path), *argv)
    assert code == 2 and not out
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_bad_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"\x00" * 100)
    code, _, err = run_cli(capsys, str(foreign))
    assert code == 2 and err == f"cramfs: {foreign}: not a cramfs trace (no trace magic) " \
        "at offset 0\n"
    code, _, err = run_cli(capsys, str(tmp_path / "missing"))
    assert code == 2 and "No such file" in err and err.count("\n") == 1


def test_cli_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.trace"
    record_node(path, steps=300)
    png = tmp_path / "pool.png"
    if importlib.util.find_spec("matplotlib") is None:
        code, _, err = run_cli(capsys, str(path), "--plot", str(png))
        assert code == 2 and err == "cramfs: --plot needs matplotlib: pip install matplotlib\n"
        pytest.skip("matplotlib not installed: only the error was checked")
    code, _, err = run_cli(capsys, str(path), "--set", "pool=32K", "--plot", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_new_device_field_is_settable_without_code_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lead adds fields to DeviceConfig (compressor next): settings and the header are
    mapped through the dataclass's own fields and type hints, so they just work."""
    import cramfs.replay as replay_module

    @dataclasses.dataclass
    class WithCompressor(DeviceConfig):
        compressor: str = "zstd"
        batch: int | None = None

    monkeypatch.setattr(replay_module, "DeviceConfig", WithCompressor)
    assert parse_settings("compressor=lz4,batch=16M") == {"compressor": "lz4",
                                                          "batch": 16 << 20}
    assert parse_settings("batch=none") == {"batch": None}
    config, unknown = replay_module.base_config(
        {"compressor": "lzo", "config": {"size": 8 * P, "pool": 4 * P, "policy": "none",
                                         "future_knob": 1}})
    assert isinstance(config, WithCompressor)
    assert config.compressor == "lzo" and config.policy is Policy.NONE
    assert unknown == ["future_knob"]
