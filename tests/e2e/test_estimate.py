"""`cramfs estimate --pid` on a live process: a child holding 32 MiB of known pages in a private
anonymous mapping is read through /proc (root) and every page it wrote must be counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from cramfs import PAGE_SIZE
from cramfs import compressors as comp
from cramfs.codec import DEFAULT_HUGE_THRESHOLD

ZERO, SAME, TEXT, RANDOM = 2048, 1024, 3072, 2048  # 8192 pages: 32 MiB

# The child writes every page (so each is resident) of a MAP_PRIVATE anonymous mapping (page
# aligned, unlike a bytearray), then waits for its stdin to close.
CHILD = f"""
import mmap, random, struct, sys
rng = random.Random(5)
words = b"the page of swap kernel memory zram pool struct int return node".split()
pages = [bytes({PAGE_SIZE})] * {ZERO}
pages += [struct.pack("<Q", rng.randrange(1, 1 << 64)) * {PAGE_SIZE // 8} for _ in range({SAME})]
pages += [b" ".join(rng.choice(words) for _ in range(900))[:{PAGE_SIZE}] for _ in range({TEXT})]
pages += [rng.randbytes({PAGE_SIZE}) for _ in range({RANDOM})]
rng.shuffle(pages)
held = mmap.mmap(-1, len(pages) * {PAGE_SIZE}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
held[:] = b"".join(pages)
del pages
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()  # only the child this test started
        proc.wait(timeout=30)


def estimate(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.estimate_cli", "estimate", *argv],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.requires("root")
def test_estimate_a_live_process(child: subprocess.Popen[str]) -> None:
    missing = [name for name in comp.NAMES if not comp.available(name)]
    if missing:  # a missing prerequisite: a skip, or a failure where CI requires them all
        reason = f"compressor bindings not installed: {', '.join(missing)}"
        if os.environ.get("CRAMFS_REQUIRE_E2E", "").strip() not in ("", "0"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    done = estimate("--pid", str(child.pid), "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    report = json.loads(done.stdout)
    assert list(report)[:4] == ["pages", "zero_pages", "same_pages", "results"]
    assert report["pages"] >= ZERO + SAME + TEXT + RANDOM
    assert report["zero_pages"] >= ZERO
    assert report["same_pages"] >= SAME
    assert report["sources"][0]["pid"] == child.pid
    assert [(r["compressor"], r["level"]) for r in report["results"]] == [
        (name, comp.DEFAULT_LEVELS[name]) for name in comp.NAMES]
    for result in report["results"]:
        assert list(result)[:8] == ["compressor", "level", "compressed_bytes", "pool_bytes",
                                    "huge_pages", "ratio", "compress_mb_s", "decompress_mb_s"]
        assert result["huge_pages"] >= RANDOM  # random pages never get under the threshold
        floor = RANDOM * PAGE_SIZE + TEXT * 64  # random pages raw, text pages not free
        assert floor <= result["compressed_bytes"] <= result["pool_bytes"]
        stored = report["pages"] - report["zero_pages"] - report["same_pages"]
        assert result["compressed_bytes"] < stored * PAGE_SIZE  # the text pages did compress
        assert result["ratio"] == pytest.approx(report["pages"] * PAGE_SIZE
                                                / result["pool_bytes"], rel=1e-3)
        assert result["compress_mb_s"] > 0 and result["decompress_mb_s"] > 0
    assert report["huge_threshold"] == DEFAULT_HUGE_THRESHOLD


@pytest.mark.requires("root")
def test_estimate_table_for_two_pids(child: subprocess.Popen[str]) -> None:
    """Several pids are one set of pages; the same pid twice is read once."""
    done = estimate("--pid", str(child.pid), str(child.pid), "--compressor", "zstd:1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"pid {child.pid} (python")
    pages = int(lines[0].split(": ", 1)[1].split()[0])
    assert ZERO + SAME + TEXT + RANDOM <= pages < 2 * (ZERO + SAME + TEXT + RANDOM)
    assert lines[1].split()[0] == "COMPRESSOR"
    assert lines[2].split()[0] == "zstd:1"


@pytest.mark.requires("root")
def test_estimate_a_process_that_is_gone(child: subprocess.Popen[str]) -> None:
    pid = child.pid
    child.kill()
    child.wait(timeout=30)
    done = estimate("--pid", str(pid))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"cramfs: no process {pid}\n"
