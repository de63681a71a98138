"""cramfs.estimate and `cramfs estimate` on files: exact page counts, zram's compr_data_size
rules, pool bytes that a real ZsPool agrees with, the JSON shape and the one-line errors."""

from __future__ import annotations

import json
import os
import random
import struct
from array import array
from pathlib import Path

import pytest

from cramfs import PAGE_SIZE
from cramfs import compressors as comp
from cramfs import estimate as est
from cramfs.codec import DEFAULT_HUGE_THRESHOLD
from cramfs.zspool import ZsPool
from daemon import estimate_cli

ZERO, SAME, TEXT, HALF, RANDOM = 37, 23, 61, 29, 19
TAIL = 1000  # bytes of text after the last whole page
SPECS = [("zstd", -1), ("deflate", 6)]  # always installed; the others have their own tests

JSON_KEYS = ["pages", "zero_pages", "same_pages", "results"]
RESULT_KEYS = ["compressor", "level", "compressed_bytes", "pool_bytes", "huge_pages", "ratio",
               "compress_mb_s", "decompress_mb_s"]


def _text(rng: random.Random, size: int) -> bytes:
    words = ["alloc", "page", "0x7f3a", "return", "struct", "swap", "node", "=", ";", "{", "}"]
    out = " ".join(rng.choice(words) for _ in range(size // 3)).encode()
    return out[:size]


def mixed_pages(seed: int = 1) -> list[bytes]:
    """Known pages in a shuffled order: ZERO zero, SAME same-filled (non-zero words), TEXT
    text, HALF half random, RANDOM random."""
    rng = random.Random(seed)
    pages = [bytes(PAGE_SIZE)] * ZERO
    pages += [struct.pack("<Q", rng.randrange(1, 1 << 64)) * (PAGE_SIZE // 8)
              for _ in range(SAME)]
    pages += [_text(rng, PAGE_SIZE) for _ in range(TEXT)]
    pages += [rng.randbytes(PAGE_SIZE // 2) + bytes(PAGE_SIZE // 2) for _ in range(HALF)]
    pages += [rng.randbytes(PAGE_SIZE) for _ in range(RANDOM)]
    rng.shuffle(pages)
    return pages


@pytest.fixture(scope="module")
def pages() -> list[bytes]:
    return mixed_pages()


@pytest.fixture(scope="module")
def tail() -> bytes:
    return _text(random.Random(9), TAIL)


@pytest.fixture(scope="module")
def page_file(tmp_path_factory: pytest.TempPathFactory, pages: list[bytes],
              tail: bytes) -> Path:
    path = tmp_path_factory.mktemp("estimate") / "pages.bin"
    path.write_bytes(b"".join(pages) + tail)
    return path


def all_pages(pages: list[bytes], tail: bytes) -> list[bytes]:
    return pages + [tail + bytes(PAGE_SIZE - len(tail))]


def stored(compressor: comp.PageCompressor, page: bytes) -> int:
    """zram's compr_data_size share of one page, computed here page by page."""
    if page == page[:8] * (PAGE_SIZE // 8):
        return 0
    length = len(compressor.compress(page))
    return PAGE_SIZE if length >= DEFAULT_HUGE_THRESHOLD else length


def test_counts_are_exact(page_file: Path) -> None:
    report = est.estimate_file(str(page_file), SPECS)
    assert report.pages == ZERO + SAME + TEXT + HALF + RANDOM + 1  # the padded tail page
    assert report.zero_pages == ZERO
    assert report.same_pages == SAME
    assert report.unreadable_bytes == 0
    assert report.sources == [{"file": str(page_file), "pages": report.pages}]


def test_compressed_bytes_follow_zram(page_file: Path, pages: list[bytes], tail: bytes) -> None:
    report = est.estimate_file(str(page_file), SPECS)
    for result in report.results:
        compressor = comp.make(result.compressor, result.level)
        every = all_pages(pages, tail)
        assert result.compressed_bytes == sum(stored(compressor, page) for page in every)
        huge = [p for p in every if stored(compressor, p) == PAGE_SIZE]
        assert result.huge_pages == len(huge) >= RANDOM  # random pages never shrink enough


def test_pool_bytes_match_a_real_pool(page_file: Path, pages: list[bytes], tail: bytes) -> None:
    """Allocating every object in a real ZsPool uses exactly the estimate's bytes."""
    report = est.estimate_file(str(page_file), SPECS)
    for result in report.results:
        compressor = comp.make(result.compressor, result.level)
        pool = ZsPool(16 << 20, largest_compressed=DEFAULT_HUGE_THRESHOLD)
        try:
            for owner, page in enumerate(all_pages(pages, tail)):
                size = stored(compressor, page)
                if size:
                    pool.alloc(size, owner)
            assert result.pool_bytes == pool.used_bytes
        finally:
            pool.close()
        assert result.ratio == round(report.pages * PAGE_SIZE / result.pool_bytes, 3)
        assert result.compress_mb_s is not None and result.compress_mb_s > 0
        assert result.decompress_mb_s is not None and result.decompress_mb_s > 0


def test_pool_classes_round_up_and_pack() -> None:
    classes = est.PoolClasses()
    assert classes.sizes[classes.index[1]] == 32  # the smallest class
    assert classes.sizes[classes.index[100]] == 112
    assert classes.sizes[classes.index[DEFAULT_HUGE_THRESHOLD - 1]] == DEFAULT_HUGE_THRESHOLD
    huge = classes.index[PAGE_SIZE]
    assert classes.sizes[huge] == PAGE_SIZE
    objects = [0] * len(classes.sizes)
    objects[huge] = 3
    assert classes.pool_bytes(objects) == 3 * PAGE_SIZE
    one = classes.index[100]
    objects = [0] * len(classes.sizes)
    objects[one] = classes.slots_per_block[one] + 1  # one full block and one more
    assert classes.pool_bytes(objects) == 2 * classes.frames_per_block[one] * PAGE_SIZE


def test_huge_threshold_decides_what_is_stored_raw(pages: list[bytes]) -> None:
    data = b"".join(pages)
    tiny = est.Estimator([("zstd", -1)], huge_threshold=1)
    tiny.feed(data)
    result = tiny.report().results[0]
    assert result.huge_pages == TEXT + HALF + RANDOM
    assert result.compressed_bytes == result.pool_bytes == (TEXT + HALF + RANDOM) * PAGE_SIZE
    whole = est.Estimator([("zstd", -1)], huge_threshold=PAGE_SIZE)
    whole.feed(data)
    assert whole.report().results[0].huge_pages == RANDOM  # only pages that do not shrink


def test_same_and_zero_pages_cost_nothing() -> None:
    estimator = est.Estimator(SPECS)
    estimator.feed(bytes(PAGE_SIZE) * 3 + b"\x01" * PAGE_SIZE * 2)
    report = estimator.report()
    assert (report.pages, report.zero_pages, report.same_pages) == (5, 3, 2)
    for result in report.results:
        assert result.compressed_bytes == result.pool_bytes == result.huge_pages == 0
        assert result.ratio is None
        assert result.compress_mb_s is None and result.decompress_mb_s is None


def test_batches_do_not_change_the_books(pages: list[bytes]) -> None:
    one = est.Estimator(SPECS)
    one.feed(b"".join(pages))
    many = est.Estimator(SPECS)
    for i in range(0, len(pages), 7):
        many.feed(b"".join(pages[i:i + 7]))
    strip = ("compress_mb_s", "decompress_mb_s")
    first = [{k: v for k, v in r.items() if k not in strip} for r in one.report().to_json()[
        "results"]]
    second = [{k: v for k, v in r.items() if k not in strip} for r in many.report().to_json()[
        "results"]]
    assert first == second
    with pytest.raises(ValueError, match="whole"):
        one.feed(b"x" * 100)


def test_default_set_is_zrams_at_default_levels() -> None:
    assert est.default_specs() == [(name, comp.DEFAULT_LEVELS[name]) for name in comp.NAMES]
    estimator = est.Estimator([("zstd", 1), ("zstd", 1), ("deflate", 6)])
    assert [t.compressor.spec for t in estimator.tallies] == ["zstd:1", "deflate:6"]


def test_file_chunks_are_bounded_and_padded(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\x07" * (3 * PAGE_SIZE + 10))
    chunks = list(est.file_chunks(str(path), chunk_bytes=2 * PAGE_SIZE))
    assert [len(c) for c in chunks] == [2 * PAGE_SIZE, 2 * PAGE_SIZE]
    assert chunks[1][PAGE_SIZE:PAGE_SIZE + 10] == b"\x07" * 10
    assert chunks[1][PAGE_SIZE + 10:] == bytes(PAGE_SIZE - 10)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert est.estimate_file(str(empty), SPECS).pages == 0


def test_json_shape(page_file: Path) -> None:
    document = json.loads(json.dumps(est.estimate_file(str(page_file), SPECS).to_json()))
    assert list(document)[:4] == JSON_KEYS
    assert all(isinstance(document[key], int) for key in JSON_KEYS[:3])
    assert [r["compressor"] for r in document["results"]] == ["zstd", "deflate"]
    for result in document["results"]:
        assert list(result) == RESULT_KEYS
        assert isinstance(result["compressed_bytes"], int)
        assert isinstance(result["pool_bytes"], int)
        assert isinstance(result["ratio"], float)


MAPS = """\
55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 131 /usr/bin/python3.11
55d0c0c00000-55d0c0c04000 rw-p 00200000 08:01 131 /usr/bin/python3.11
55d0c1000000-55d0c1200000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000101000 ---p 00000000 00:00 0
7f0000200000-7f0000300000 rw-s 00000000 00:01 7 /dev/zero (deleted)
7f0000300000-7f0000301000 r--p 00000000 00:00 0 [anon:python]
7f0000400000-7f0000401000 r-xp 00000000 08:01 200 /usr/lib/libc.so.6
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0 [vvar]
7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0 [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
"""


def test_parse_maps_takes_private_anonymous_and_written_mappings() -> None:
    assert est.parse_maps(MAPS) == [
        (0x55D0C0C00000, 0x55D0C0C04000),  # .data/.bss of the executable
        (0x55D0C1000000, 0x55D0C1200000),  # heap
        (0x7F0000000000, 0x7F0000100000),  # anonymous
        (0x7F0000300000, 0x7F0000301000),  # named anonymous, read-only now
        (0x7FFD00000000, 0x7FFD00021000),  # stack
    ]


def test_wanted_runs_read_pagemap(tmp_path: Path) -> None:
    """Resident anonymous and swapped pages are taken; file pages and holes are not."""
    base = 0x10000000
    entries = [0, est.PM_PRESENT | 5, est.PM_PRESENT | 6, est.PM_PRESENT | est.PM_FILE | 7,
               est.PM_SWAPPED | 8, 0, est.PM_PRESENT | 9]
    path = tmp_path / "pagemap"
    with open(path, "wb") as f:
        f.seek(base // PAGE_SIZE * 8)
        f.write(array("Q", entries).tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        runs = list(est._wanted_runs(fd, base, base + len(entries) * PAGE_SIZE))
        nothing = list(est._wanted_runs(fd, 0, 16 * PAGE_SIZE))
    finally:
        os.close(fd)
    assert runs == [(base + PAGE_SIZE, 2 * PAGE_SIZE), (base + 4 * PAGE_SIZE, PAGE_SIZE),
                    (base + 6 * PAGE_SIZE, PAGE_SIZE)]
    assert nothing == []


def test_read_run_skips_and_counts_what_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    path.write_bytes(b"\x01" * PAGE_SIZE * 2 + b"\x02" * 100)  # 2 pages and a short one
    source = est.ProcessSource(1, "test", [(0, 4 * PAGE_SIZE)])
    fd = os.open(path, os.O_RDONLY)
    try:
        data = est._read_run(fd, 0, 4 * PAGE_SIZE, source)
    finally:
        os.close(fd)
    assert data == b"\x01" * PAGE_SIZE * 2
    assert source.unreadable_bytes == 2 * PAGE_SIZE


def test_no_such_process() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    with pytest.raises(est.EstimateError, match=f"no process {pid_max + 1}"):
        est.estimate_pids([pid_max + 1], SPECS)


# -- the command line ----------------------------------------------------------------------
def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = estimate_cli.main(["estimate", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_json(capsys: pytest.CaptureFixture[str], page_file: Path) -> None:
    status, out, err = cli(capsys, "--file", str(page_file), "--json", "--compressor", "zstd",
                           "--compressor", "deflate:1")
    assert (status, err) == (0, "")
    document = json.loads(out)
    assert document["zero_pages"] == ZERO and document["same_pages"] == SAME
    assert [(r["compressor"], r["level"]) for r in document["results"]] == [
        ("zstd", -1), ("deflate", 1)]


def test_cli_table(capsys: pytest.CaptureFixture[str], page_file: Path) -> None:
    status, out, err = cli(capsys, "--file", str(page_file), "--compressor", "zstd:1")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert f"{ZERO} zero, {SAME} same-filled" in lines[0]
    assert lines[1].split()[:3] == ["COMPRESSOR", "COMPRESSED", "POOL"]
    assert lines[2].startswith("zstd:1 ")


@pytest.mark.parametrize(("argv", "status", "message"), [
    ((), 2, "give either --pid PID... or --file PATH"),
    (("--pid", "1", "--file", "/etc/hostname"), 2, "give either"),
    (("--pid", "x"), 2, "--pid: not a process id: 'x'"),
    (("--pid", "0"), 2, "not a process id"),
    (("--file", "/etc/hostname", "--compressor", "lzo-rle"), 2, "unknown compressor 'lzo-rle'"),
    (("--file", "/etc/hostname", "--compressor", "zstd:99"), 2, "-7..22"),
    (("--file", "/etc/hostname", "--compressor", "lzo:1"), 2, "lzo takes no level"),
    (("--file", "/no/such/file"), 1, "cannot read /no/such/file: no such file or directory"),
    (("--file", "/"), 1, "cannot read /: is a directory"),
])
def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...],
                                 status: int, message: str) -> None:
    got, out, err = cli(capsys, *argv)
    assert got == status
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("cramfs: ")
    assert message in err


def test_cli_no_such_process(capsys: pytest.CaptureFixture[str]) -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    status, _, err = cli(capsys, "--pid", str(pid_max + 1))
    assert (status, err) == (1, f"cramfs: no process {pid_max + 1}\n")


def test_cli_missing_binding_is_a_runtime_error(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch,
                                                page_file: Path) -> None:
    def missing(name: str) -> object:
        raise comp.CompressorUnavailable(f"{name} needs the Python package python-lzo")

    monkeypatch.setattr(comp, "_binding", missing)
    status, _, err = cli(capsys, "--file", str(page_file), "--compressor", "lzo")
    assert (status, err) == (1, "cramfs: lzo needs the Python package python-lzo\n")


def test_progress_bar_only_on_a_terminal() -> None:
    class Terminal:
        def __init__(self, tty: bool) -> None:
            self.tty = tty
            self.text = ""

        def isatty(self) -> bool:
            return self.tty

        def write(self, text: str) -> int:
            self.text += text
            return len(text)

        def flush(self) -> None:
            pass

    for tty in (False, True):
        stream = Terminal(tty)
        bar = estimate_cli.ProgressBar(stream, interval=0)  # type: ignore[arg-type]
        bar.update(1 << 20, 1 << 20)  # small input: no bar
        bar.update(50 << 20, 100 << 20)
        bar.clear()
        assert ("50%" in stream.text) is tty
        assert stream.text.endswith("\r\033[K") is tty
