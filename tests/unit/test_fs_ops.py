"""daemon.fs: CramOperations driven directly, without a mount (as s3ql's tests drive theirs).

Every handler is awaited the way pyfuse3 would await it; FUSE errors come back as FUSEError
with the errno the kernel would see.
"""

from __future__ import annotations

import errno
import os
import random
import select
import stat

import pyfuse3
import pytest
import trio

from cramfs import PAGE_SIZE
from cramfs.device import CompressedDevice, DeviceConfig
from cramfs.timing import TimingConfig
from cramfs.watermarks import FailureMode, Policy, State
from daemon import fs as fsmod
from daemon.attributes import attributes_for
from daemon.devices import DeviceEntry
from daemon.fs import CramOperations

P = PAGE_SIZE
MIB = 1 << 20
ROOT = pyfuse3.ROOT_INODE


def entry(name: str = "swap0", kind: str = "swap", size: int = 4 * MIB, pool: int = 2 * MIB,
          **kwargs) -> DeviceEntry:
    return DeviceEntry(name, kind, CompressedDevice(DeviceConfig(size=size, pool=pool,
                                                                 **kwargs)))


def text(n: int, seed: int = 0) -> bytes:
    line = f"{seed}: lorem ipsum dolor sit amet, consectetur adipiscing elit\n".encode()
    return (line * (n // len(line) + 1))[:n]


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


async def errno_of(coro) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    return info.value.errno


async def inode_of(ops: CramOperations, *path: str) -> int:
    inode = ROOT
    for name in path:
        inode = (await ops.lookup(inode, name.encode())).st_ino
    return inode


async def open_file(ops: CramOperations, device: str, name: str, flags: int = os.O_RDWR) -> int:
    info = await ops.open(await inode_of(ops, device, name), flags, None)
    return info.fh


async def read_attr(ops: CramOperations, device: str, name: str) -> str:
    fh = await open_file(ops, device, name, os.O_RDONLY)
    try:
        return (await ops.read(fh, 0, 4096)).decode()
    finally:
        await ops.release(fh)


async def write_attr(ops: CramOperations, device: str, name: str, value: bytes) -> int:
    fh = await open_file(ops, device, name, os.O_WRONLY)
    try:
        return await ops.write(fh, 0, value)
    finally:
        await ops.release(fh)


@pytest.fixture
def collect_readdir(monkeypatch):
    """Replace pyfuse3.readdir_reply (needs a kernel token) with a collector."""

    def reply(token, name, attrs, next_id):
        token.append((name, attrs, next_id))
        return token.limit is None or len(token) < token.limit

    monkeypatch.setattr(fsmod.pyfuse3, "readdir_reply", reply)


class Token(list):
    def __init__(self, limit: int | None = None) -> None:
        super().__init__()
        self.limit = limit


async def listdir(ops: CramOperations, inode: int, start: int = 0,
                  limit: int | None = None) -> list:
    fh = await ops.opendir(inode, None)
    token = Token(limit)
    await ops.readdir(fh, start, token)
    return token


class FakePollHandle:
    """Stands in for pyfuse3.PollHandle, which only the kernel's request can create."""

    def __init__(self) -> None:
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1


@pytest.fixture
async def ops():
    entries = [entry("swap0", "swap"), entry("node0", "node", size=8 * MIB, pool=MIB)]
    yield CramOperations(entries)
    for item in entries:
        item.device.close()


# -- the tree ---------------------------------------------------------------------------

async def test_root_getattr(ops):
    attrs = await ops.getattr(ROOT)
    assert stat.S_ISDIR(attrs.st_mode)
    assert attrs.st_ino == ROOT
    assert (attrs.st_uid, attrs.st_gid) == (os.getuid(), os.getgid())


async def test_lookup_device_dirs_and_files(ops):
    for name in ("swap0", "node0"):
        attrs = await ops.lookup(ROOT, name.encode())
        assert stat.S_ISDIR(attrs.st_mode)
        data = await ops.lookup(attrs.st_ino, b"data")
        assert stat.S_ISREG(data.st_mode)
        assert (await ops.getattr(data.st_ino)).st_ino == data.st_ino


async def test_lookup_dot_and_dotdot(ops):
    swap0 = await inode_of(ops, "swap0")
    assert (await ops.lookup(swap0, b".")).st_ino == swap0
    assert (await ops.lookup(swap0, b"..")).st_ino == ROOT
    assert (await ops.lookup(ROOT, b"..")).st_ino == ROOT


async def test_lookup_missing_is_enoent(ops):
    assert await errno_of(ops.lookup(ROOT, b"nope")) == errno.ENOENT
    swap0 = await inode_of(ops, "swap0")
    assert await errno_of(ops.lookup(swap0, b"nope")) == errno.ENOENT
    assert await errno_of(ops.getattr(10_000)) == errno.ENOENT


async def test_readdir_root(ops, collect_readdir):
    listed = await listdir(ops, ROOT)
    assert [name for name, _, _ in listed] == [b"node0", b"swap0"]
    assert all(stat.S_ISDIR(attrs.st_mode) for _, attrs, _ in listed)
    assert [next_id for _, _, next_id in listed] == [1, 2]


async def test_readdir_device_dir(ops, collect_readdir):
    swap0 = await inode_of(ops, "swap0")
    listed = await listdir(ops, swap0)
    names = {name.decode() for name, _, _ in listed}
    assert names == {"data"} | {attribute.name for attribute in attributes_for("swap")}
    for name, attrs, _ in listed:
        assert (await ops.lookup(swap0, name)).st_ino == attrs.st_ino


async def test_readdir_resumes_at_start_id(ops, collect_readdir):
    swap0 = await inode_of(ops, "swap0")
    everything = await listdir(ops, swap0)
    first = await listdir(ops, swap0, limit=3)
    assert len(first) == 3
    rest = await listdir(ops, swap0, start=first[-1][2])
    assert [n for n, _, _ in first + rest] == [n for n, _, _ in everything]


async def test_opendir_on_a_file_is_enotdir(ops):
    data = await inode_of(ops, "swap0", "data")
    assert await errno_of(ops.opendir(data, None)) == errno.ENOTDIR


async def test_open_directory_is_eisdir(ops):
    assert await errno_of(ops.open(ROOT, os.O_RDONLY, None)) == errno.EISDIR


async def test_data_size_is_the_advertised_size(ops):
    for name, size in (("swap0", 4 * MIB), ("node0", 8 * MIB)):
        attrs = await ops.lookup(await inode_of(ops, name), b"data")
        assert attrs.st_size == size
        assert await read_attr(ops, name, "disksize") == f"{size}\n"


async def test_attribute_modes(ops):
    swap0 = await inode_of(ops, "swap0")
    mode = (await ops.lookup(swap0, b"mm_stat")).st_mode
    assert stat.S_IMODE(mode) == 0o444
    assert stat.S_IMODE((await ops.lookup(swap0, b"watermark_high")).st_mode) == 0o644
    assert stat.S_IMODE((await ops.lookup(swap0, b"compact")).st_mode) == 0o200


async def test_statfs_counts_pool_capacity(ops):
    stats = await ops.statfs(None)
    assert stats.f_bsize == P
    assert stats.f_blocks == (2 * MIB + MIB) // P
    assert stats.f_bfree == stats.f_blocks


# -- the data file ----------------------------------------------------------------------

@pytest.mark.parametrize("offset, length", [
    (0, P), (5 * P, P), (100, P), (P - 1, 2), (3 * P + 17, 3 * P + 5),
    (0, MIB), (MIB, MIB), (12345, MIB),
])
async def test_write_read_back(ops, offset, length):
    fh = await open_file(ops, "swap0", "data")
    payload = text(length, seed=offset)
    assert await ops.write(fh, offset, payload) == length
    assert await ops.read(fh, offset, length) == payload
    # Neighbouring bytes are still zero.
    if offset:
        assert await ops.read(fh, offset - 1, 1) == b"\0"
    assert await ops.read(fh, offset + length, 1) == b"\0"
    await ops.release(fh)


async def test_overwrite_and_random_data(ops):
    fh = await open_file(ops, "swap0", "data")
    await ops.write(fh, 0, rand(4 * P, seed=1))
    await ops.write(fh, P + 10, b"x" * 100)
    expected = bytearray(rand(4 * P, seed=1))
    expected[P + 10:P + 110] = b"x" * 100
    assert await ops.read(fh, 0, 4 * P) == bytes(expected)


async def test_unwritten_data_reads_zero(ops):
    fh = await open_file(ops, "node0", "data")
    assert await ops.read(fh, 3 * MIB, MIB) == bytes(MIB)


async def test_write_past_the_end_is_efbig_and_changes_nothing(ops):
    fh = await open_file(ops, "swap0", "data")
    size = 4 * MIB
    await ops.write(fh, 0, text(P))
    before = await read_attr(ops, "swap0", "mm_stat")
    assert await errno_of(ops.write(fh, size - P, text(2 * P))) == errno.EFBIG
    assert await errno_of(ops.write(fh, size, b"x")) == errno.EFBIG
    assert await errno_of(ops.write(fh, size - 10, rand(MIB))) == errno.EFBIG
    assert await read_attr(ops, "swap0", "mm_stat") == before
    assert await ops.read(fh, size - P, P) == bytes(P)


async def test_read_past_the_end_is_short(ops):
    fh = await open_file(ops, "swap0", "data")
    size = 4 * MIB
    await ops.write(fh, size - P, b"y" * P)
    assert await ops.read(fh, size - 100, P) == b"y" * 100
    assert await ops.read(fh, size, P) == b""
    assert await ops.read(fh, size + MIB, P) == b""


async def test_negative_offset_read_is_einval(ops):
    fh = await open_file(ops, "swap0", "data")
    assert await errno_of(ops.read(fh, -P, P)) == errno.EINVAL


async def test_bad_handle_is_ebadf(ops):
    assert await errno_of(ops.read(999, 0, P)) == errno.EBADF
    assert await errno_of(ops.write(999, 0, b"x")) == errno.EBADF


async def test_setattr_truncate_is_ignored(ops):
    fh = await open_file(ops, "swap0", "data")
    await ops.write(fh, 0, b"keep" * 1024)
    inode = await inode_of(ops, "swap0", "data")
    fields = pyfuse3.SetattrFields()
    attrs = await ops.setattr(inode, pyfuse3.EntryAttributes(), fields, fh, None)
    assert attrs.st_size == 4 * MIB
    assert await ops.read(fh, 0, 4) == b"keep"


async def test_large_io_uses_worker_threads(ops, monkeypatch):
    calls = []
    real = trio.to_thread.run_sync

    async def spy(fn, *args, **kwargs):
        calls.append(fn.__name__)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(fsmod.trio.to_thread, "run_sync", spy)
    fh = await open_file(ops, "swap0", "data")
    await ops.write(fh, 0, text(P))
    await ops.read(fh, 0, P)
    assert calls == []
    await ops.write(fh, 0, text(MIB))
    assert await ops.read(fh, 0, MIB) == text(MIB)
    assert calls == ["compress", "decompress"]  # the device's offloaded steps


# -- attribute files --------------------------------------------------------------------

async def test_mm_stat_and_io_stat_fields(ops):
    fh = await open_file(ops, "swap0", "data")
    await ops.write(fh, 0, text(8 * P))
    mm = (await read_attr(ops, "swap0", "mm_stat")).split()
    io = (await read_attr(ops, "swap0", "io_stat")).split()
    assert len(mm) == 9 and all(field.isdigit() for field in mm)
    assert len(io) == 4 and all(field.isdigit() for field in io)
    assert int(mm[0]) == 8 * P  # orig_data_size
    assert 0 < int(mm[1]) < 8 * P  # compr_data_size
    assert int(mm[3]) == 2 * MIB  # mem_limit


async def test_attribute_read_at_offset(ops):
    whole = await read_attr(ops, "swap0", "kind")
    assert whole == "swap\n"
    fh = await open_file(ops, "swap0", "kind", os.O_RDONLY)
    assert await ops.read(fh, 2, 10) == b"ap\n"
    assert await ops.read(fh, 100, 10) == b""


async def test_write_watermark_high_takes_effect(ops):
    assert await write_attr(ops, "swap0", "watermark_high", b"0.95\n") == 5
    assert await read_attr(ops, "swap0", "watermark_high") == "0.95\n"
    assert ops.entries[0].device.watermarks.high == 0.95


@pytest.mark.parametrize("value", [b"abc", b"2", b"0.1", b"-0.5", b"", b"\xff\xfe", b"nan"])
async def test_bad_watermark_high_is_einval_and_unchanged(ops, value):
    fh = await open_file(ops, "swap0", "watermark_high", os.O_WRONLY)
    assert await errno_of(ops.write(fh, 0, value)) == errno.EINVAL
    assert await read_attr(ops, "swap0", "watermark_high") == "0.9\n"
    assert await read_attr(ops, "swap0", "watermark_low") == "0.8\n"


async def test_attribute_write_at_nonzero_offset_is_einval(ops):
    fh = await open_file(ops, "swap0", "watermark_high", os.O_WRONLY)
    assert await errno_of(ops.write(fh, 1, b"0.95")) == errno.EINVAL
    assert ops.entries[0].device.watermarks.high == 0.9


async def test_write_policy(ops):
    await write_attr(ops, "swap0", "write_policy", b"throttle\n")
    assert await read_attr(ops, "swap0", "write_policy") == "throttle\n"
    assert ops.entries[0].device.policy is Policy.THROTTLE
    fh = await open_file(ops, "swap0", "write_policy", os.O_WRONLY)
    assert await errno_of(ops.write(fh, 0, b"bogus")) == errno.EINVAL
    assert ops.entries[0].device.policy is Policy.THROTTLE


@pytest.mark.parametrize("name", ["mm_stat", "io_stat", "kind", "watermark_state", "pressure"])
@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR])
async def test_read_only_attribute_opened_for_writing_is_eacces(ops, name, flags):
    inode = await inode_of(ops, "swap0", name)
    assert await errno_of(ops.open(inode, flags, None)) == errno.EACCES
    assert not ops.handles


async def test_write_only_attribute_opened_for_reading_is_eacces(ops):
    inode = await inode_of(ops, "swap0", "compact")
    assert await errno_of(ops.open(inode, os.O_RDONLY, None)) == errno.EACCES
    assert await write_attr(ops, "swap0", "compact", b"1\n") == 2


# -- write control and the emulated hardware failure ------------------------------------

async def fill_until_error(ops: CramOperations, device: str, pages: int) -> tuple[int, int]:
    """Write random (incompressible) pages until one fails; (pages written, errno)."""
    fh = await open_file(ops, device, "data")
    try:
        for index in range(pages):
            try:
                await ops.write(fh, index * P, rand(P, seed=index))
            except pyfuse3.FUSEError as exc:
                return index, exc.errno
        return pages, 0
    finally:
        await ops.release(fh)


async def test_write_in_pressure_is_enospc():
    tiny = entry("tiny", size=256 * P, pool=32 * P)
    ops = CramOperations([tiny])
    written, err = await fill_until_error(ops, "tiny", 256)
    assert err == errno.ENOSPC
    assert 0 < written <= 32
    assert tiny.device.watermarks.state is not State.OK
    assert (await read_attr(ops, "tiny", "watermark_state")).strip() in ("pressure", "full")
    before = await read_attr(ops, "tiny", "mm_stat")
    fh = await open_file(ops, "tiny", "data")
    assert await errno_of(ops.write(fh, written * P, rand(P, seed=999))) == errno.ENOSPC
    assert await read_attr(ops, "tiny", "mm_stat") == before
    # Pages written before the rejection are intact.
    assert await ops.read(fh, 0, P) == rand(P, seed=0)
    tiny.device.close()


async def test_poisoned_page_read_is_eio():
    tiny = entry("tiny", size=256 * P, pool=16 * P, policy=Policy.NONE,
                 failure_mode=FailureMode.POISON)
    ops = CramOperations([tiny])
    written, err = await fill_until_error(ops, "tiny", 64)
    assert (written, err) == (64, 0)  # policy none accepts everything
    assert tiny.device.poisoned
    page = min(tiny.device.poisoned)
    fh = await open_file(ops, "tiny", "data")
    assert await errno_of(ops.read(fh, page * P, P)) == errno.EIO
    assert await ops.read(fh, 0, P) == rand(P, seed=0)
    assert f"{page} poisoned\n" in await read_attr(ops, "tiny", "lost_pages")
    # A partial write into a poisoned page is kept aside: the page reads EIO until its whole
    # extent has been written, in however many pieces.
    assert await ops.write(fh, page * P + 1, b"x") == 1
    assert await errno_of(ops.read(fh, page * P, P)) == errno.EIO
    await ops.write(fh, 0, bytes(4 * P))  # make room (the pool is full)
    await ops.write(fh, page * P, b"y")
    await ops.write(fh, page * P + 2, bytes(P - 2))
    assert await ops.read(fh, page * P, 3) == b"yx\0"
    tiny.device.close()


# -- robustness -------------------------------------------------------------------------

async def test_unexpected_exception_becomes_eio(ops, monkeypatch):
    device = ops.entries[0].device
    fh = await open_file(ops, "swap0", "data")
    await ops.write(fh, 0, text(P))

    def boom(*args, **kwargs):
        raise RuntimeError("injected by the test")

    monkeypatch.setattr(device, "submit_read", boom)  # the adapter's way into the device
    monkeypatch.setattr(device, "submit_write", boom)
    assert await errno_of(ops.read(fh, 0, P)) == errno.EIO
    assert await errno_of(ops.write(fh, 0, text(P, seed=1))) == errno.EIO
    monkeypatch.undo()
    assert await ops.read(fh, 0, P) == text(P)
    await ops.write(fh, P, text(P, seed=2))
    assert await ops.read(fh, P, P) == text(P, seed=2)
    assert (await ops.getattr(ROOT)).st_ino == ROOT


async def test_attribute_reader_exception_becomes_eio(ops, monkeypatch):
    device = ops.entries[0].device

    def boom():
        raise RuntimeError("injected by the test")

    monkeypatch.setattr(device, "mm_stat", boom)
    fh = await open_file(ops, "swap0", "mm_stat", os.O_RDONLY)
    assert await errno_of(ops.read(fh, 0, 4096)) == errno.EIO
    monkeypatch.undo()
    assert len((await ops.read(fh, 0, 4096)).split()) == 9


# -- poll: the emulated watermark interrupt ---------------------------------------------

async def test_poll_on_watermark_state():
    tiny = entry("tiny", size=256 * P, pool=32 * P)
    ops = CramOperations([tiny])
    inode = await inode_of(ops, "tiny", "watermark_state")
    fh = (await ops.open(inode, os.O_RDONLY, None)).fh
    assert await ops.read(fh, 0, 64) == b"ok\n"
    fake = FakePollHandle()
    assert await ops.poll(inode, fh, fake, None) == 0
    assert ops.handles[fh].poll_handle is fake
    assert fake.notified == 0

    written, err = await fill_until_error(ops, "tiny", 256)
    assert err == errno.ENOSPC
    assert fake.notified == 1  # one-shot: notified once, then forgotten
    assert ops.handles[fh].poll_handle is None
    mask = await ops.poll(inode, fh, None, None)
    assert mask & select.POLLPRI
    assert mask & select.POLLIN
    # Reading the file acknowledges the change.
    assert (await ops.read(fh, 0, 64)).strip() in (b"pressure", b"full")
    assert await ops.poll(inode, fh, None, None) == 0
    await ops.release(fh)
    tiny.device.close()


async def test_poll_only_notifies_its_device(ops):
    node0 = await inode_of(ops, "node0", "watermark_state")
    fh = (await ops.open(node0, os.O_RDONLY, None)).fh
    fake = FakePollHandle()
    assert await ops.poll(node0, fh, fake, None) == 0
    swap0 = ops.entries[0].device
    swap0.watermarks.update(swap0.pool.capacity, alloc_failed=True)
    assert fake.notified == 0
    assert await ops.poll(node0, fh, None, None) == 0


async def test_poll_notify_failure_is_survived(ops):
    class Gone(FakePollHandle):
        def notify(self) -> None:
            raise OSError(errno.ENOENT, "poller gone")

    inode = await inode_of(ops, "swap0", "watermark_state")
    fh = (await ops.open(inode, os.O_RDONLY, None)).fh
    await ops.poll(inode, fh, Gone(), None)
    device = ops.entries[0].device
    device.watermarks.update(device.pool.capacity, alloc_failed=True)
    assert await ops.poll(inode, fh, None, None) & select.POLLPRI


async def test_poll_on_other_files_is_always_ready(ops):
    inode = await inode_of(ops, "swap0", "data")
    fh = (await ops.open(inode, os.O_RDWR, None)).fh
    assert await ops.poll(inode, fh, FakePollHandle(), None) & select.POLLIN
    inode = await inode_of(ops, "swap0", "mm_stat")
    fh = (await ops.open(inode, os.O_RDONLY, None)).fh
    assert await ops.poll(inode, fh, FakePollHandle(), None) & select.POLLOUT


# -- open data handles and the idle hook -------------------------------------------------

async def test_open_release_counts_data_handles(ops):
    idle = []
    ops.on_idle = lambda: idle.append(True)
    assert ops.busy_devices() == []
    a = await open_file(ops, "swap0", "data")
    b = await open_file(ops, "swap0", "data", os.O_RDONLY)
    c = await open_file(ops, "node0", "data")
    attr = await open_file(ops, "swap0", "mm_stat", os.O_RDONLY)
    assert ops.open_data == {"swap0": 2, "node0": 1}
    assert sorted(ops.busy_devices()) == ["node0", "swap0"]
    await ops.release(attr)
    await ops.release(a)
    assert ops.open_data == {"swap0": 1, "node0": 1}
    await ops.release(c)
    assert ops.busy_devices() == ["swap0"]
    assert idle == []
    await ops.release(b)
    assert ops.busy_devices() == []
    assert idle == [True]
    assert not ops.handles


async def test_attribute_handles_do_not_trigger_idle(ops):
    idle = []
    ops.on_idle = lambda: idle.append(True)
    fh = await open_file(ops, "swap0", "kind", os.O_RDONLY)
    await ops.release(fh)
    await ops.release(12345)  # unknown handle: ignored
    assert idle == []
    assert ops.open_data == {"swap0": 0, "node0": 0}


async def test_flush_and_fsync(ops):
    fh = await open_file(ops, "swap0", "data")
    assert await ops.flush(fh) is None
    assert await ops.fsync(fh, False) is None


async def test_injected_faults_are_eio():
    faulty = entry("faulty", size=64 * P, pool=64 * P,
                   timing=TimingConfig(read_error_rate=1.0, write_error_rate=1.0, seed=1))
    ops = CramOperations([faulty])
    fh = await open_file(ops, "faulty", "data")
    assert await errno_of(ops.write(fh, 0, text(P))) == errno.EIO
    assert await errno_of(ops.read(fh, 0, P)) == errno.EIO
    assert faulty.device.mm_stat()[0] == 0
    assert faulty.device.io_stat()[:2] == (1, 1)
    faulty.device.close()


async def test_backing_file_failure_is_eio_and_changes_nothing(tmp_path, monkeypatch):
    from cramfs.zswap import ZswapDevice

    device = ZswapDevice(DeviceConfig(size=64 * P, pool=16 * P),
                         backing_file=tmp_path / "backing.img")
    ops = CramOperations([DeviceEntry("zs0", "zswap", device)])
    try:
        directory = ops.nodes[pyfuse3.ROOT_INODE].children[b"zs0"]
        info = await ops.open(ops.nodes[directory].children[b"data"], os.O_RDWR, None)

        def disk_full(index: int, page: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(device.backing, "write", disk_full)
        before = device.mm_stat()
        # an incompressible page goes to the backing file, which is full
        assert await errno_of(ops.write(info.fh, 0, os.urandom(P))) == errno.EIO
        assert device.mm_stat() == before and device.backing_pages == 0
        assert device.io_stat()[1] == 1  # failed_writes
        await ops.release(info.fh)
    finally:
        device.close()


# -- fallocate: the kernel's discard ---------------------------------------------------------

PUNCH = fsmod.FALLOC_FL_PUNCH_HOLE | fsmod.FALLOC_FL_KEEP_SIZE


async def test_punch_hole_releases_and_reads_back_zeros(ops):
    fh = await open_file(ops, "swap0", "data")
    data = rand(8 * P, 11)
    await ops.write(fh, 0, data)
    device = ops.entries[0].device
    await ops.fallocate(fh, PUNCH, 2 * P + 5, 3 * P)
    expected = bytearray(data)
    expected[2 * P + 5:5 * P + 5] = bytes(3 * P)
    assert await ops.read(fh, 0, 8 * P) == bytes(expected)
    assert device.pages_stored == 6 and device.counters.discarded_pages == 2
    for mode in (fsmod.FALLOC_FL_ZERO_RANGE, fsmod.FALLOC_FL_ZERO_RANGE | 1):
        await ops.fallocate(fh, mode, 0, P)
    assert device.pages_stored == 5
    assert (await read_attr(ops, "swap0", "discarded_pages")).strip() == "4"
    assert (await read_attr(ops, "swap0", "io_stat")).split()[3] == "4"
    await ops.release(fh)


@pytest.mark.parametrize("mode", [0, fsmod.FALLOC_FL_KEEP_SIZE, fsmod.FALLOC_FL_PUNCH_HOLE,
                                  0x08, 0x20, 0x40, PUNCH | 0x10])
async def test_other_fallocate_modes_are_eopnotsupp_and_change_nothing(ops, mode):
    fh = await open_file(ops, "swap0", "data")
    await ops.write(fh, 0, text(4 * P))
    device = ops.entries[0].device
    assert await errno_of(ops.fallocate(fh, mode, 0, 4 * P)) == errno.EOPNOTSUPP
    assert await ops.read(fh, 0, 4 * P) == text(4 * P)
    assert device.counters.discard_requests == 0
    await ops.release(fh)


async def test_fallocate_past_the_end_is_efbig_and_changes_nothing(ops):
    fh = await open_file(ops, "swap0", "data")
    device = ops.entries[0].device
    await ops.write(fh, device.size - P, text(P))
    assert await errno_of(ops.fallocate(fh, PUNCH, device.size - P, 2 * P)) == errno.EFBIG
    assert await ops.read(fh, device.size - P, P) == text(P)
    await ops.release(fh)


async def test_fallocate_on_an_attribute_is_eopnotsupp(ops):
    fh = await open_file(ops, "swap0", "mm_stat", os.O_RDONLY)
    assert await errno_of(ops.fallocate(fh, PUNCH, 0, P)) == errno.EOPNOTSUPP
    await ops.release(fh)


async def test_node_counts_trims(ops):
    fh = await open_file(ops, "node0", "data")
    await ops.write(fh, 0, rand(4 * P, 3))
    await ops.fallocate(fh, PUNCH, 0, 4 * P)
    assert (await read_attr(ops, "node0", "trim_count")).strip() == "4"
    assert (await read_attr(ops, "node0", "pool_used")).strip() == "0"
    assert await read_attr(ops, "node0", "discard_support") in ("0\n", "1\n")
    await ops.release(fh)
