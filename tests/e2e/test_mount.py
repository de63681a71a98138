"""The mounted file system: device data I/O with real clients, attribute files, bad writes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from .helpers import MiB, io_stat, is_mounted, mm_stat, read_attr, run, unmount, write_attr

CONFIG = """
[device.swap0]
kind = "swap"
size = "256M"
pool = "64M"
compressor = "zstd"
level = 1

[device.swap0.watermarks]
low = 0.80
high = 0.90
policy = "reject"

[device.node0]
kind = "node"
size = "128M"
pool = "16M"

[device.node0.watermarks]
low = 0.50
high = 0.75
policy = "reject"
"""
SWAP_SIZE = 256 * MiB
NODE_SIZE = 128 * MiB

READ_ONLY = ("mm_stat", "io_stat", "watermark_state", "pressure", "headroom", "disksize",
             "pool_capacity", "pool_used", "compression_ratio", "kind", "lost_pages")


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(CONFIG)


def cramfs_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "cramfs")
    cmd = [beside] if os.path.exists(beside) else [sys.executable, "-m", "daemon.cli"]
    return run([*cmd, *args], timeout=timeout, check=False)


def sha256_file(path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, MiB))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


# -- mount, layout, readiness ----------------------------------------------------------------

def test_mounts_and_notifies_ready(daemon):
    assert is_mounted(daemon.mountpoint)
    assert daemon.notify.ready, f"no READY=1 on $NOTIFY_SOCKET: {daemon.notify.messages}"
    assert sorted(os.listdir(daemon.mountpoint)) == ["node0", "swap0"]
    assert os.stat(daemon.data("swap0")).st_size == SWAP_SIZE
    assert os.stat(daemon.data("node0")).st_size == NODE_SIZE
    for dev, kind, size, pool in (("swap0", "swap", SWAP_SIZE, 64 * MiB),
                                  ("node0", "node", NODE_SIZE, 16 * MiB)):
        names = set(os.listdir(daemon.mountpoint / dev))
        missing = {"data", *READ_ONLY, "watermark_low", "watermark_high", "write_policy",
                   "failure_mode", "compact"} - names
        assert not missing, f"{dev} lacks {missing}"
        assert read_attr(daemon.mountpoint, dev, "kind") == kind
        assert int(read_attr(daemon.mountpoint, dev, "disksize")) == size
        assert int(read_attr(daemon.mountpoint, dev, "pool_capacity")) == pool
        assert mm_stat(daemon.mountpoint, dev)["mem_limit"] in (0, pool)


def test_sigterm_when_idle_exits_zero_and_unmounts(daemon):
    assert daemon.stop(timeout=20) == 0, daemon.log_tail()
    assert not is_mounted(daemon.mountpoint)


def test_sigint_when_idle_exits_zero(daemon):
    daemon.signal(signal.SIGINT)
    assert daemon.wait(timeout=20) == 0, daemon.log_tail()
    assert not is_mounted(daemon.mountpoint)


@pytest.mark.parametrize("bad, needle", [
    ('[device.swap0]\nkind = "swap"\nsize = "64M"\npool = "16M"\nbogus_key = 1\n', "bogus_key"),
    ('[device.swap0]\nkind = "swap"\nsize = "64M"\npool = "16M"\n'
     '[device.swap0.watermarks]\nlow = 0.9\nhigh = 0.5\n', "low"),
    ('[device.swap0]\nkind = "swap"\nsize = "lots"\npool = "16M"\n', "size"),
    ('[device.swap0]\nkind = "teapot"\nsize = "64M"\npool = "16M"\n', "kind"),
])
def test_bad_config_exits_2_with_one_line(require, daemon_command, tmp_path, bad, needle):
    require("root", "fuse")
    config = tmp_path / "bad.toml"
    config.write_text(bad)
    mnt = tmp_path / "mnt"
    try:
        proc = run([daemon_command, "--config", str(config), "--mountpoint", str(mnt),
                    "--metrics-address", ""], timeout=30, check=False)
    finally:
        if is_mounted(mnt):
            unmount(mnt)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {proc.stderr!r}"
    assert needle in lines[0], lines[0]


def test_bad_command_line_exits_2(daemon_command):
    proc = run([daemon_command, "--no-such-option"], timeout=30, check=False)
    assert proc.returncode == 2


# -- data I/O with real clients --------------------------------------------------------------

@pytest.mark.parametrize("bs", ["4K", "1M"])
@pytest.mark.parametrize("offset", [0, 12345], ids=["aligned", "unaligned"])
def test_dd_roundtrip(daemon, tmp_path, bs, offset):
    src = tmp_path / "src"
    src.write_bytes(random.Random(offset).randbytes(6 * MiB) + bytes(2 * MiB)
                    + b"cramfs " * (MiB // 7 * 2))
    length = src.stat().st_size
    data = daemon.data("swap0")
    before = mm_stat(daemon.mountpoint, "swap0")
    run(["dd", f"if={src}", f"of={data}", f"bs={bs}", f"seek={offset}", "oflag=seek_bytes",
         "conv=notrunc,fsync", "status=none"], timeout=120)
    out = tmp_path / "out"
    run(["dd", f"if={data}", f"of={out}", f"bs={bs}", f"skip={offset}", f"count={length}",
         "iflag=skip_bytes,count_bytes", "status=none"], timeout=120)
    assert out.stat().st_size == length
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert os.stat(data).st_size == SWAP_SIZE
    after = mm_stat(daemon.mountpoint, "swap0")
    assert after["orig_data_size"] > before["orig_data_size"]
    assert io_stat(daemon.mountpoint, "swap0")["failed_writes"] == 0


@pytest.mark.requires("fio")
@pytest.mark.parametrize("bs", ["4k", "1m"])
@pytest.mark.parametrize("pattern", ["aligned-rand", "unaligned-seq"])
def test_fio_verify(daemon, tmp_path, bs, pattern):
    data = daemon.data("swap0")
    if pattern == "aligned-rand":
        where = ["--rw=randwrite", "--offset=16m", "--randrepeat=0"]
    else:  # every block straddles a page boundary
        where = ["--rw=write", "--offset=1048577" if bs == "1m" else "--offset=4097"]
    cmd = ["fio", "--name=cramfs-verify", f"--filename={data}", f"--bs={bs}", "--size=24m",
           *where, "--ioengine=psync", "--direct=0", "--fallocate=none", "--verify=crc32c",
           "--do_verify=1", "--verify_fatal=1", "--verify_dump=0", "--output-format=json",
           f"--output={tmp_path / 'fio.json'}"]
    proc = run(cmd, timeout=300, check=False)
    report = (tmp_path / "fio.json").read_text() if (tmp_path / "fio.json").exists() else ""
    assert proc.returncode == 0, f"fio failed: {proc.stderr}\n{report[-3000:]}"
    job = json.loads(report[report.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 24 * MiB
    assert job["read"]["io_bytes"] >= 24 * MiB  # the verify pass read everything back
    assert io_stat(daemon.mountpoint, "swap0")["failed_writes"] == 0


def test_python_odd_offsets(daemon):
    """pwrite/pread at odd offsets and lengths (partial pages, page and 1 MiB boundaries,
    writes larger than FUSE's 1 MiB request), checked against a shadow copy."""
    rng = random.Random(7)
    region = 12 * MiB
    base = SWAP_SIZE - region  # also exercise the end of the device
    shadow = bytearray(region)
    fd = os.open(daemon.data("swap0"), os.O_RDWR)
    try:
        writes = [(1, 1), (4095, 2), (4096 * 3 - 7, 4096 + 14), (MiB - 3, 9), (5, 3 * MiB + 17),
                  (region - 4097, 4097), (region - 1, 1)]
        writes += [(rng.randrange(region - 70000), rng.randrange(1, 70000)) for _ in range(150)]
        for off, length in writes:
            kind = rng.random()
            if kind < 0.3:
                chunk = bytes(length)
            elif kind < 0.6:
                chunk = (b"odd offsets %d " % off * (length // 10 + 2))[:length]
            else:
                chunk = rng.randbytes(length)
            assert os.pwrite(fd, chunk, base + off) == length
            shadow[off:off + length] = chunk
        for off, length in [(0, region)] + [(rng.randrange(region), rng.randrange(1, 300000))
                                            for _ in range(100)]:
            length = min(length, region - off)
            got = os.pread(fd, length, base + off)
            assert got == bytes(shadow[off:off + length]), f"mismatch in [{off}, +{length})"
        # never-written space reads as zeros
        assert os.pread(fd, 8192, 4 * MiB + 3) == bytes(8192)
        # reads at/after the end are short/empty
        assert os.pread(fd, 4096, SWAP_SIZE - 100) == bytes(shadow[region - 100:])
        assert os.pread(fd, 4096, SWAP_SIZE) == b""
    finally:
        os.close(fd)
    # and the data survives close and reopen
    with open(daemon.data("swap0"), "rb") as f:
        f.seek(base)
        assert f.read(region) == bytes(shadow)


def test_data_is_per_device(daemon):
    with open(daemon.data("swap0"), "r+b") as f:
        f.write(b"S" * 8192)
    with open(daemon.data("node0"), "r+b") as f:
        f.write(b"N" * 8192)
    with open(daemon.data("swap0"), "rb") as f:
        assert f.read(8192) == b"S" * 8192
    with open(daemon.data("node0"), "rb") as f:
        assert f.read(8192) == b"N" * 8192


# -- attribute files -------------------------------------------------------------------------

def test_attribute_files_read(daemon):
    mnt = daemon.mountpoint
    with open(daemon.data("swap0"), "r+b") as f:
        f.write(b"compressible page " * 3000)
        f.seek(MiB)
        f.write(b"\xab" * (16 * 4096))  # same-filled pages (zero pages are releases)
    for dev in ("swap0", "node0"):
        for name in READ_ONLY:
            value = read_attr(mnt, dev, name)
            if name != "lost_pages":
                assert value, f"{dev}/{name} is empty"
        assert read_attr(mnt, dev, "watermark_state") in ("ok", "pressure", "full")
        assert 0 <= int(read_attr(mnt, dev, "pressure")) <= 1000
        assert int(read_attr(mnt, dev, "headroom")) >= 0
        assert int(read_attr(mnt, dev, "pool_used")) >= 0
        float(read_attr(mnt, dev, "compression_ratio"))
        assert int(read_attr(mnt, dev, "lost_pages") or "0") == 0
        assert len(read_attr(mnt, dev, "io_stat").split()) == 4
    stat = mm_stat(mnt, "swap0")
    assert stat["orig_data_size"] >= 3000 * 18 // 4096 * 4096
    assert 0 < stat["compr_data_size"] < stat["orig_data_size"]
    assert stat["mem_used_total"] == int(read_attr(mnt, "swap0", "pool_used"))
    assert stat["same_pages"] >= 16
    assert stat["mem_used_max"] >= stat["mem_used_total"]
    # attribute files are fresh on every read (direct_io): a new write shows at once
    with open(daemon.data("swap0"), "r+b") as f:
        f.seek(64 * MiB)
        f.write(random.Random(1).randbytes(64 * 4096))
    assert mm_stat(mnt, "swap0")["orig_data_size"] >= stat["orig_data_size"] + 64 * 4096


def test_tunables_write_and_read_back(daemon):
    mnt = daemon.mountpoint
    write_attr(mnt, "swap0", "watermark_high", "0.95")
    assert float(read_attr(mnt, "swap0", "watermark_high")) == pytest.approx(0.95)
    write_attr(mnt, "swap0", "watermark_low", "0.5\n")
    assert float(read_attr(mnt, "swap0", "watermark_low")) == pytest.approx(0.5)
    for policy in ("throttle", "none", "reject"):
        write_attr(mnt, "swap0", "write_policy", policy + "\n")
        assert read_attr(mnt, "swap0", "write_policy") == policy
    for mode in ("drop", "poison"):
        write_attr(mnt, "swap0", "failure_mode", mode)
        assert read_attr(mnt, "swap0", "failure_mode") == mode
    # the other device is untouched
    assert float(read_attr(mnt, "node0", "watermark_high")) == pytest.approx(0.75)
    write_attr(mnt, "swap0", "compact", "1")


@pytest.mark.parametrize("name, value", [
    ("watermark_high", "abc"), ("watermark_high", "1.5"), ("watermark_high", "-0.1"),
    ("watermark_high", "0.1"),   # below low (0.8): low >= high is invalid
    ("watermark_low", "0.95"),   # above high (0.9)
    ("watermark_low", "nan"),
    ("write_policy", "maybe"), ("failure_mode", "explode"), ("compact", "banana"),
])
def test_garbage_tunable_is_einval_and_changes_nothing(daemon, name, value):
    mnt = daemon.mountpoint
    tunables = ("watermark_low", "watermark_high", "write_policy", "failure_mode")
    before = {t: read_attr(mnt, "swap0", t) for t in tunables}
    stat_before = mm_stat(mnt, "swap0")
    with pytest.raises(OSError) as exc:
        write_attr(mnt, "swap0", name, value)
    assert exc.value.errno == errno.EINVAL, exc.value
    assert {t: read_attr(mnt, "swap0", t) for t in tunables} == before
    assert mm_stat(mnt, "swap0") == stat_before
    assert daemon.alive()


@pytest.mark.parametrize("name", ["mm_stat", "io_stat", "watermark_state", "pool_used", "kind"])
def test_read_only_attributes_refuse_writes(daemon, name):
    mnt = daemon.mountpoint
    before = read_attr(mnt, "swap0", name)
    with pytest.raises(OSError):
        write_attr(mnt, "swap0", name, "0")
    assert read_attr(mnt, "swap0", name) == before


# -- bad writes on data ------------------------------------------------------------------------

def test_writes_past_the_end_fail_and_change_nothing(daemon):
    mnt = daemon.mountpoint
    data = daemon.data("swap0")
    with open(data, "r+b") as f:
        f.write(b"keep me " * 512)
    stat_before, io_before = mm_stat(mnt, "swap0"), io_stat(mnt, "swap0")
    fd = os.open(data, os.O_RDWR)
    try:
        for off in (SWAP_SIZE, SWAP_SIZE + 4096, SWAP_SIZE + 12345, 2 * SWAP_SIZE):
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"x" * 4096, off)
            assert exc.value.errno in (errno.EFBIG, errno.ENOSPC, errno.EINVAL, errno.ENXIO,
                                       errno.EIO), exc.value
        # a write straddling the end: refused, or cut short at the end
        try:
            n = os.pwrite(fd, b"y" * 8192, SWAP_SIZE - 4096)
        except OSError as exc:
            assert exc.errno in (errno.EFBIG, errno.ENOSPC, errno.EINVAL, errno.ENXIO, errno.EIO)
        else:
            assert n <= 4096
        os.pwrite(fd, bytes(4096), SWAP_SIZE - 4096)  # undo whatever the straddle stored
    finally:
        os.close(fd)
    assert os.stat(data).st_size == SWAP_SIZE
    with open(data, "rb") as f:
        assert f.read(4096) == (b"keep me " * 512)
    after = mm_stat(mnt, "swap0")
    # only the last page may differ (zeroed again above): no pool space, no lost data
    assert after["orig_data_size"] in (stat_before["orig_data_size"],
                                       stat_before["orig_data_size"] + 4096)
    assert after["compr_data_size"] == stat_before["compr_data_size"]
    assert after["mem_used_total"] == stat_before["mem_used_total"]
    assert io_stat(mnt, "swap0")["failed_writes"] >= io_before["failed_writes"]
    assert daemon.alive()


def test_truncate_does_not_change_the_device(daemon):
    data = daemon.data("swap0")
    for size in (0, SWAP_SIZE + MiB):
        with contextlib.suppress(OSError):
            os.truncate(data, size)
        assert os.stat(data).st_size == SWAP_SIZE
    assert daemon.alive()


# -- admin CLI and metrics -------------------------------------------------------------------

def test_cramfs_status_lists_devices(daemon):
    proc = cramfs_cli("--mountpoint", str(daemon.mountpoint), "status")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("swap0", "node0", "swap", "node"):
        assert needle in out, out
    assert len(out.strip().splitlines()) >= 3  # header + one line per device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.requires("promtool")
def test_metrics_endpoint_is_promtool_clean(start_daemon):
    address = f"127.0.0.1:{_free_port()}"
    daemon = start_daemon(CONFIG, metrics_address=address)
    with open(daemon.data("swap0"), "r+b") as f:
        f.write(b"metrics " * 4096)
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for needle in ('cramfs_device_size_bytes{device="swap0"}',
                   'cramfs_pool_capacity_bytes{device="node0"}', "cramfs_pool_used_bytes",
                   "cramfs_stored_pages", "cramfs_compressed_bytes", "cramfs_io_bytes_total",
                   "cramfs_watermark_state"):
        assert needle in text, needle
    proc = run(["promtool", "check", "metrics"], input=text.encode(), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
