"""A hostile user against the sparse page table through the real daemon: a 15 TiB node over a
small pool, I/O at far offsets, at the last page and across 512-page chunk boundaries, releases
that empty chunks, floods under every policy, bad attribute values and SIGHUP reloads."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import MiB, io_stat, mm_stat, read_attr, write_attr

pytestmark = pytest.mark.requires("root", "fuse")

P = 4096
CHUNK = 512 * P  # the page table's chunk: 2 MiB of address
TiB = 1 << 40
SIZE = 15 * TiB


def node_config(size: str = "15T", pool: str = "64M", policy: str = "reject",
                kind: str = "node", extra: str = "") -> str:
    return f"""
[device.big]
kind = "{kind}"
size = "{size}"
pool = "{pool}"
{extra}

[device.big.watermarks]
low = 0.80
high = 0.90
policy = "{policy}"
"""


def pages(count: int, seed: int) -> bytes:
    """Incompressible pages: each costs a pool frame."""
    return random.Random(seed).randbytes(count * P)


def text_pages(count: int, seed: int) -> bytes:
    """Compressible but not same-filled pages."""
    rng = random.Random(seed)
    words = [b"alpha ", b"beta ", b"gamma ", b"page ", b"swap\n"]
    out = bytearray()
    while len(out) < count * P:
        out += rng.choice(words)
    return bytes(out[:count * P])


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def punch(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE) through the fd."""
    subprocess.run(["fallocate", "--punch-hole", "--keep-size", "--offset", str(offset),
                    "--length", str(length), f"/proc/self/fd/{fd}"], check=True,
                   capture_output=True, timeout=60, pass_fds=(fd,))


def oserror(call, *args) -> int:
    try:
        call(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


FAR = [0, 3 * CHUNK - 2 * P, 5 * CHUNK, 7 * TiB + 3 * CHUNK - 2 * P, 10 * TiB,
       SIZE - CHUNK, SIZE - P]


def test_far_offsets_last_page_and_chunk_boundaries_read_back(start_daemon):
    daemon = start_daemon(node_config())
    data = daemon.data("big")
    assert os.stat(data).st_size == SIZE
    fd = os.open(data, os.O_RDWR)
    try:
        written = {}
        for i, off in enumerate(FAR):
            body = pages(1, i) if off == SIZE - P else pages(4, i)[:min(4 * P, SIZE - off)]
            assert os.pwrite(fd, body, off) == len(body)
            written[off] = body
        # unaligned write straddling a chunk boundary far out
        odd = 9 * TiB + 5 * CHUNK - 1234
        body = text_pages(3, 99)[:2 * P + 77]
        assert os.pwrite(fd, body, odd) == len(body)
        written[odd] = body
        for off, body in written.items():
            assert os.pread(fd, len(body), off) == body, off
        # pages between the stored ones read as zeros
        assert os.pread(fd, P, 10 * TiB + CHUNK) == bytes(P)
        stat = mm_stat(daemon.mountpoint, "big")
        stored = sum(-(-len(b) // P) for b in written.values()) + 1  # odd straddles 4 pages
        assert stat["orig_data_size"] // P in (stored - 1, stored, stored + 1)
    finally:
        os.close(fd)


def test_io_past_the_last_page_is_refused_or_short_and_changes_nothing(start_daemon):
    daemon = start_daemon(node_config())
    data = daemon.data("big")
    fd = os.open(data, os.O_RDWR)
    try:
        last = pages(1, 5)
        os.pwrite(fd, last, SIZE - P)
        before = mm_stat(daemon.mountpoint, "big")
        assert os.pread(fd, P, SIZE) == b""  # at the end: nothing
        assert os.pread(fd, 2 * P, SIZE - P) == last  # short at the end
        assert os.pread(fd, P, SIZE - 100) == last[-100:]
        assert oserror(os.pwrite, fd, b"x" * P, SIZE) == errno.EFBIG
        assert oserror(os.pwrite, fd, b"x" * 2 * P, SIZE - P) == errno.EFBIG
        assert oserror(os.pwrite, fd, b"x", SIZE) == errno.EFBIG
        assert os.pread(fd, P, SIZE - P) == last  # the refused write changed nothing
        assert mm_stat(daemon.mountpoint, "big") == before
        assert io_stat(daemon.mountpoint, "big")["invalid_io"] >= 3
    finally:
        os.close(fd)


def test_unaligned_direct_io_is_einval(start_daemon):
    daemon = start_daemon(node_config())
    fd = os.open(daemon.data("big"), os.O_RDWR | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 2 * P)
        buf.write(pages(2, 1))
        # an aligned O_DIRECT write far out works; a misaligned offset is EINVAL (kernel)
        assert os.pwritev(fd, [memoryview(buf)[:P]], 12 * TiB) == P
        assert oserror(os.pwritev, fd, [memoryview(buf)[:P]], 12 * TiB + 1) in (
            errno.EINVAL, 0)
        assert os.preadv(fd, [bytearray(P)], 12 * TiB) == P
    finally:
        os.close(fd)


def test_discards_far_out_and_across_chunks_release_pool_and_memory(start_daemon):
    daemon = start_daemon(node_config(pool="256M"))
    data = daemon.data("big")
    fd = os.open(data, os.O_RDWR)
    try:
        idle = vm_rss(daemon.pid)
        regions = [2 * TiB + 37 * CHUNK, 11 * TiB - 3 * P, SIZE - 8 * MiB]
        body = text_pages(2048, 3)  # 8 MiB of compressible pages per region: 4+ chunks
        for off in regions:
            for part in range(0, len(body), MiB):
                os.pwrite(fd, body[part:part + MiB], off + part)
        full = mm_stat(daemon.mountpoint, "big")
        assert full["orig_data_size"] == 3 * len(body)
        # punch unaligned ranges that cross chunk boundaries, then the rest
        for off in regions:
            punch(fd, off + CHUNK - 1000, CHUNK + 3000)
            head = os.pread(fd, CHUNK + 5000, off + CHUNK - 2000)
            want = body[CHUNK - 2000:CHUNK - 1000] + bytes(CHUNK + 3000) + \
                body[2 * CHUNK + 2000:2 * CHUNK + 3000]
            assert head == want
        for off in regions:
            punch(fd, off, len(body))
            assert os.pread(fd, 2 * P, off + len(body) - 2 * P) == bytes(2 * P)
        empty = mm_stat(daemon.mountpoint, "big")
        assert empty["orig_data_size"] == 0 and empty["compr_data_size"] == 0
        write_attr(daemon.mountpoint, "big", "compact", "1")
        assert mm_stat(daemon.mountpoint, "big")["mem_used_total"] <= 4 * 32 * 1024
        assert int(read_attr(daemon.mountpoint, "big", "discarded_pages")) >= 3 * 2048 - 6
        # RSS settles back to near idle (table chunks and pool frames given back)
        time.sleep(0.5)
        after = vm_rss(daemon.pid)
        assert after - idle < 16 * MiB, (idle, after)
    finally:
        os.close(fd)


def test_zero_writes_that_empty_a_chunk_then_rewrite_it(start_daemon):
    daemon = start_daemon(node_config())
    fd = os.open(daemon.data("big"), os.O_RDWR)
    try:
        off = 13 * TiB + 5 * CHUNK
        body = pages(512, 7)
        os.pwrite(fd, body, off)  # exactly one chunk
        os.pwrite(fd, body[:P], off - P)  # a page in the chunk before
        os.pwrite(fd, bytes(len(body)), off)  # zero the whole chunk: released
        stat = mm_stat(daemon.mountpoint, "big")
        assert stat["orig_data_size"] == P
        assert os.pread(fd, len(body), off) == bytes(len(body))
        assert io_stat(daemon.mountpoint, "big")["notify_free"] >= 512
        os.pwrite(fd, body[P:3 * P], off + CHUNK - P)  # rewrite across into the next chunk
        assert os.pread(fd, 2 * P, off + CHUNK - P) == body[P:3 * P]
        assert os.pread(fd, P, off - P) == body[:P]
        assert mm_stat(daemon.mountpoint, "big")["orig_data_size"] == 3 * P
    finally:
        os.close(fd)


@pytest.mark.parametrize("policy", ["reject", "throttle", "none"])
def test_flood_far_out_under_every_policy_keeps_what_was_stored(start_daemon, policy):
    daemon = start_daemon(node_config(pool="8M", policy=policy))
    fd = os.open(daemon.data("big"), os.O_RDWR)
    try:
        keep = text_pages(64, 1)
        os.pwrite(fd, keep, SIZE - len(keep))
        outcomes = {}
        refused = 0
        for i in range(64):  # 64 MiB of incompressible pages into an 8 MiB pool
            off = 3 * TiB + i * (CHUNK + P)  # every request crosses a chunk boundary
            try:
                os.pwrite(fd, pages(256, 100 + i), off)
                outcomes[off] = "ok"
            except OSError as exc:
                refused += 1
                outcomes[off] = errno.errorcode[exc.errno or 0]
        assert daemon.alive()
        if policy in ("reject", "throttle"):
            assert refused and set(outcomes.values()) <= {"ok", "ENOSPC"}
            assert os.pread(fd, len(keep), SIZE - len(keep)) == keep
            for i, (off, how) in enumerate(outcomes.items()):
                if how == "ok":
                    assert os.pread(fd, 256 * P, off) == pages(256, 100 + i)
        else:
            assert set(outcomes.values()) == {"ok"}  # none accepts, then loses pages
            lost = read_attr(daemon.mountpoint, "big", "lost_pages").splitlines()
            assert lost
        stat = mm_stat(daemon.mountpoint, "big")
        assert stat["mem_used_total"] <= 8 * MiB
        assert read_attr(daemon.mountpoint, "big", "watermark_state") in ("pressure", "full")
        # release everything: the pool drains and the state clears
        punch(fd, 0, SIZE)
        stat = mm_stat(daemon.mountpoint, "big")
        assert stat["orig_data_size"] == 0
        assert read_attr(daemon.mountpoint, "big", "watermark_state") == "ok"
        assert os.pread(fd, P, SIZE - P) == bytes(P)
    finally:
        os.close(fd)


def test_fio_verify_across_chunk_boundaries_far_out(start_daemon, require):
    require("fio")
    daemon = start_daemon(node_config(pool="128M"))
    data = daemon.data("big")
    off = 14 * TiB + CHUNK - 12 * P  # the job's region starts 12 pages before a boundary
    proc = subprocess.run(
        ["fio", "--name=hostile", f"--filename={data}", "--rw=randwrite", "--bs=4k,12k",
         "--bsrange=4k-96k", f"--offset={off}", "--size=24M", "--verify=crc32c",
         "--verify_fatal=1", "--do_verify=1", "--direct=1", "--ioengine=psync",
         "--buffer_compress_percentage=60", "--refill_buffers", "--randrepeat=0",
         "--output-format=terse"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify" not in proc.stderr.lower() or "bad" not in proc.stderr.lower()


BAD_VALUES = ["abc", "nan", "inf", "-inf", "-1", "1e309", "0x10", "2", "1.5",
              "0.5 0.6", "\x00", "9" * 400, "0.85\x00junk"]  # "" and " " compact (as zram)


@pytest.mark.parametrize("name", ["watermark_low", "watermark_high", "write_policy",
                                  "failure_mode", "no_alloc", "mem_used_max", "compact"])
def test_bad_values_in_writable_files_are_einval_and_change_nothing(start_daemon, name):
    daemon = start_daemon(node_config())
    m = daemon.mountpoint
    readable = {n: read_attr(m, "big", n) for n in
                ("watermark_low", "watermark_high", "write_policy", "failure_mode",
                 "no_alloc", "mem_used_max", "watermark_state")}
    for value in BAD_VALUES:
        code = oserror(write_attr, m, "big", name, value)
        assert code == errno.EINVAL, (name, value, code)
        now = {n: read_attr(m, "big", n) for n in readable}
        assert now == readable, (name, value)
    assert daemon.alive()


def test_bad_values_in_zswap_tunables_are_einval(start_daemon, tmp_path):
    backing = tmp_path / "zb.img"
    daemon = start_daemon(node_config(size="1G", kind="zswap",
                                      extra=f'backing_file = "{backing}"',
                                      policy="none"))
    m = daemon.mountpoint
    for name in ("max_pool_percent", "accept_threshold_percent"):
        before = read_attr(m, "big", name)
        for value in ["\n", "abc", "-1", "101", "1e3", "nan", "50.5", "9" * 400, "\x00"]:
            assert oserror(write_attr, m, "big", name, value) == errno.EINVAL, (name, value)
            assert read_attr(m, "big", name) == before
    # a zswap device never refuses: any policy but none is EINVAL
    assert oserror(write_attr, m, "big", "write_policy", "reject") == errno.EINVAL
    assert read_attr(m, "big", "write_policy") == "none"


def reload_with(daemon, text: str) -> None:
    """Write ``text`` as the daemon's config, SIGHUP it, and read its RELOADING=1/READY=1
    as systemd would; the daemon must still be serving."""
    daemon.config_path.write_text(text)
    daemon.signal(signal.SIGHUP)
    time.sleep(0.6)
    assert daemon.notify is not None
    daemon.notify.poll()
    assert daemon.alive(), daemon.log_tail()


def test_sighup_applies_runtime_keys_and_a_bad_file_changes_nothing(start_daemon):
    daemon = start_daemon(node_config())
    m = daemon.mountpoint
    config = daemon.config_path
    original = config.read_text()

    def hup(text: str) -> None:
        reload_with(daemon, text)

    hup(original.replace("low = 0.80", "low = 0.50").replace('"reject"', '"throttle"'))
    assert read_attr(m, "big", "watermark_low") in ("0.5", "0.50")
    assert read_attr(m, "big", "write_policy") == "throttle"
    state = {n: read_attr(m, "big", n) for n in ("watermark_low", "watermark_high",
                                                  "write_policy", "failure_mode")}
    for bad in ['size = "0"', 'size = "16T"', 'size = "1.5G"', 'size = -4096',
                'pool = "0"', 'size = 9223372036854775808']:
        key = bad.split()[0]
        lines = [line for line in original.splitlines() if not line.startswith(f"{key} =")]
        lines.insert(lines.index('kind = "node"') + 1, bad)
        hup("\n".join(lines).replace("low = 0.80", "low = 0.60"))
        assert {n: read_attr(m, "big", n) for n in state} == state, bad
    for old, bad in [("low = 0.80", "low = 0.95"), ("low = 0.80", "low = -1"),
                     ("high = 0.90", "high = 2"), ('policy = "reject"', 'policy = "sometimes"'),
                     ("low = 0.80", "low = nan"), ("low = 0.80", "low = 0.6\njunk = 1"),
                     ("low = 0.80", "low = 0.6\n[[["), ('kind = "node"', 'kind = "nodes"')]:
        hup(original.replace(old, bad))
        assert {n: read_attr(m, "big", n) for n in state} == state, bad
    # a restart-only change is logged and left alone; the size stays
    hup(original.replace('size = "15T"', 'size = "1T"'))
    assert os.stat(daemon.data("big")).st_size == SIZE
    assert "restart" in daemon.log()


def test_a_trace_into_the_mount_itself_is_refused_and_the_daemon_keeps_serving(start_daemon):
    """The daemon writes its trace from its own thread: a trace file inside its own mount
    (a device's data file) would have it wait on itself."""
    import threading

    daemon = start_daemon(node_config(size="1G"))
    m = daemon.mountpoint
    outcome: list[int] = []

    def start() -> None:
        outcome.append(oserror(write_attr, m, "big", "trace", f"start {m}/big/data"))

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(10)
    answered = not thread.is_alive()
    if not answered:  # unstick the mount for teardown: the daemon is waiting on itself
        daemon.proc.kill()
    assert answered, "the daemon hung recording into its own mount"
    assert outcome == [errno.EINVAL]
    assert read_attr(m, "big", "trace") == "off"


def test_a_pool_the_machine_cannot_map_exits_2_naming_the_key(require, daemon_command,
                                                              tmp_path):
    require("daemon")
    mountpoint = tmp_path / "mnt"
    config = tmp_path / "cramfs.toml"
    config.write_text(f'mountpoint = "{mountpoint}"\nmetrics_address = ""\n\n'
                      + node_config(size="1G", pool="64T"))
    try:
        proc = subprocess.run([daemon_command, "--config", str(config)], capture_output=True,
                              text=True, timeout=60)
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cramfsd:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert len(lines) == 1 and lines[0].startswith("cramfsd: device.big.pool: ")


def test_sighup_on_zswap_applies_its_percentages_and_refuses_what_it_cannot_take(
        start_daemon, tmp_path):
    backing = tmp_path / "zb.img"
    daemon = start_daemon(node_config(size="1G", kind="zswap", policy="none",
                                      extra=f'backing_file = "{backing}"\n'
                                            "max_pool_percent = 20\n"
                                            "accept_threshold_percent = 90\n"))
    m, config = daemon.mountpoint, daemon.config_path
    original = config.read_text()

    def hup(text: str) -> None:
        reload_with(daemon, text)

    hup(original.replace("max_pool_percent = 20", "max_pool_percent = 40"))
    assert read_attr(m, "big", "max_pool_percent") == "40"
    for bad in ("max_pool_percent = 0", "max_pool_percent = 101", "max_pool_percent = -1",
                "max_pool_percent = 1.5", 'max_pool_percent = "40"'):
        hup(original.replace("max_pool_percent = 20", bad))
        assert read_attr(m, "big", "max_pool_percent") == "40", bad
    hup(original.replace("max_pool_percent = 20", "max_pool_percent = 40")
        .replace('policy = "none"', 'policy = "reject"'))  # zswap never refuses: kept
    assert read_attr(m, "big", "write_policy") == "none"
    fd = os.open(daemon.data("big"), os.O_RDWR)
    try:
        body = pages(64, 4)
        os.pwrite(fd, body, 512 * P - 32 * P)  # across a chunk boundary, past the limit
        assert os.pread(fd, len(body), 512 * P - 32 * P) == body
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", ["1G", "15T"])
def test_zswap_shrinker_writes_back_pages_at_the_far_end(start_daemon, tmp_path, size):
    backing = tmp_path / "zb.img"
    daemon = start_daemon(node_config(size=size, pool="8M", kind="zswap", policy="none",
                                      extra=f'backing_file = "{backing}"\n'
                                            "max_pool_percent = 20\n"))
    m = daemon.mountpoint
    fd = os.open(daemon.data("big"), os.O_RDWR)
    try:
        end = os.fstat(fd).st_size
        rng = random.Random(1)
        body = b"".join(rng.randbytes(2000) + bytes(P - 2000) for _ in range(2048))
        for part in range(0, len(body), MiB):  # 4 MiB of ~2:1 pages: past the 1.6 MiB limit
            os.pwrite(fd, body[part:part + MiB], end - 4 * CHUNK + part)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and int(read_attr(m, "big", "written_back_pages")) == 0:
            time.sleep(0.1)
        assert int(read_attr(m, "big", "written_back_pages")) > 0
        assert os.pread(fd, len(body), end - 4 * CHUNK) == body
    finally:
        os.close(fd)
