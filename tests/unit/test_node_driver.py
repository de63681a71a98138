"""The node as its driver sees it: safe_pages, zratio, balloon_pages, the allocation gate,
unreliable interrupts, and the recognised refusal storm. Device, file system (no mount) and
config, each checked where it lives."""

from __future__ import annotations

import errno
import os
import random
import select

import pytest
import trio

from cramfs import PAGE_SIZE
from cramfs.device import REJECT_GATE, CompressedDevice, DeviceConfig
from cramfs.errors import WriteRejected
from cramfs.interrupts import InterruptConfig, InterruptLine
from cramfs.node import SAFE_RESERVE_BLOCKS, NodeView
from cramfs.storm import RefusalStorm
from cramfs.watermarks import Policy, State
from cramfs.zspool import MAX_FRAMES_PER_BLOCK
from cramfs.zswap import ZswapDevice
from daemon import config as configuration
from daemon.devices import DeviceEntry
from daemon.fs import CramOperations

P = PAGE_SIZE
RESERVE = SAFE_RESERVE_BLOCKS * MAX_FRAMES_PER_BLOCK * P


def node(size: int = 1024 * P, pool: int = 128 * P, **kwargs) -> CompressedDevice:
    return CompressedDevice(DeviceConfig(size=size, pool=pool, low=0.5, high=0.75, **kwargs))


def text(pages: int, seed: int = 0) -> bytes:
    line = f"{seed}: the quick brown fox jumps over the lazy dog\n".encode()
    return (line * (pages * P // len(line) + 1))[:pages * P]


def rand(pages: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(pages * P)


# -- ratio, balloon, safe pages ------------------------------------------------------------

def test_empty_node_promises_its_ratio():
    dev = node()
    assert dev.zratio() == 8.0
    assert dev.balloon_pages() == 0
    # headroom, less the reserve of largest blocks, at the promised ratio
    assert dev.safe_pages() == int((0.75 * 128 * P - RESERVE) * 8.0) // P


def test_incompressible_data_inflates_the_balloon_and_shrinks_safe_pages():
    dev = node()
    dev.write(0, rand(32))  # huge pages: ratio 1
    assert dev.effective_ratio() == pytest.approx(1.0)
    assert dev.balloon_pages() == (1024 * P - 128 * P) // P  # only the real pages are backed
    assert dev.safe_pages() == (int(0.75 * 128 * P) - 32 * P - RESERVE) // P


def test_well_compressing_data_keeps_the_balloon_empty():
    dev = node()
    dev.write(0, text(64))
    assert dev.effective_ratio() > dev.zratio()
    assert dev.balloon_pages() == 0  # the achieved ratio is capped at the promised one
    expected = int((dev.headroom() - RESERVE) * dev.effective_ratio()) // P
    assert dev.safe_pages() == expected > 0


def test_the_node_view_reads_the_parts_live_and_the_device_answers_with_it():
    """NodeView only reads: what the device stores and the gate it closes show at once."""
    dev = node()
    view = NodeView(dev.size, dev.pool, dev.books, dev.watermarks, dev.control)
    asked = ("zratio", "effective_ratio", "headroom", "pressure", "safe_pages", "balloon_pages")
    for data in (text(16), rand(48, seed=1)):
        dev.write(dev.pages_stored * P, data)
        assert {name: getattr(view, name)() for name in asked} \
            == {name: getattr(dev, name)() for name in asked}
    assert view.safe_pages() > 0 and view.balloon_pages() > 0
    dev.set_no_alloc(True)
    assert view.safe_pages() == dev.safe_pages() == 0
    dev.set_no_alloc(False)
    assert view.safe_pages() > 0


def test_safe_pages_is_zero_at_or_above_high():
    dev = node(policy=Policy.NONE)
    page = 0
    while dev.watermarks.state is State.OK:
        dev.write(page * P, rand(1, page))
        page += 1
    assert dev.safe_pages() == 0


def test_writes_the_driver_was_told_were_safe_never_fail():
    """The promise safe_pages makes, checked on a mix of compressibility."""
    dev = node()
    rng = random.Random(3)
    page = 0
    while page < 1000:
        safe = dev.safe_pages()
        if not safe:
            break
        batch = min(safe, rng.randrange(1, 16), 1000 - page)
        for i in range(batch):  # of the device's present average compressibility or better
            data = text(1, page) if rng.random() < 0.8 else rand(1, page)
            dev.write((page + i) * P, data)
        page += batch
    assert dev.counters.failed_writes == 0
    assert page > 128  # the lie was used: more pages than the pool holds raw


# -- the allocation gate -------------------------------------------------------------------

def test_gate_refuses_growth_whatever_the_policy_and_lets_releases_through():
    for policy in Policy:
        dev = node(policy=policy)
        dev.write(0, rand(4, 1))
        dev.write(4 * P, text(4))
        dev.set_no_alloc(True)
        before = dev.pool.used_bytes
        for offset, data in ((8 * P, rand(1, 2)), (8 * P, rand(3, 2)), (9 * P + 7, b"x" * 9),
                             (0, rand(4, 5))):  # a new page; a rewrite as large (grows? no)
            try:
                dev.write(offset, data)
            except WriteRejected as error:
                assert error.reason == REJECT_GATE
        assert dev.pool.used_bytes <= before
        assert dev.counters.rejected[REJECT_GATE] >= 2
        dev.write(0, bytes(P))  # a zero write releases
        dev.discard(P, P)  # so does a discard
        dev.write(4 * P, text(1, 9)[:100] + bytes(P - 100))  # a shrinking rewrite
        assert dev.pool.used_bytes < before
        assert dev.safe_pages() == 0
        dev.set_no_alloc(False)
        dev.write(8 * P, rand(1, 2))
        dev.close()


def test_gate_refuses_before_compressing():
    dev = node()
    dev.set_no_alloc(True)
    with pytest.raises(WriteRejected) as info:
        dev.precheck_write(0, rand(1))
    assert info.value.reason == REJECT_GATE


def test_gate_closes_by_itself_when_full_if_configured():
    dev = node(pool=8 * P, policy=Policy.NONE, no_alloc_on_full=True)
    page = 0
    while dev.watermarks.state is not State.FULL:
        dev.write(page * P, rand(1, page))
        page += 1
    assert dev.no_alloc
    with pytest.raises(WriteRejected):
        dev.write(page * P, rand(1, page))
    plain = node(pool=8 * P, policy=Policy.NONE)
    for i in range(12):
        plain.write(i * P, rand(1, i))
    assert plain.watermarks.state is State.FULL and not plain.no_alloc


def test_zswap_refuses_reject_and_the_gate(tmp_path):
    dev = ZswapDevice(DeviceConfig(size=64 * P, pool=16 * P), tmp_path / "backing.img")
    try:
        with pytest.raises(ValueError, match="never refuses"):
            dev.set_policy(Policy.REJECT)
        with pytest.raises(ValueError, match="never refuses"):
            dev.set_no_alloc(True)
        assert dev.policy is Policy.NONE and not dev.no_alloc
        dev.set_policy(Policy.NONE)
        dev.set_no_alloc(False)
    finally:
        dev.close()


# -- the interrupt line ----------------------------------------------------------------------

def test_interrupt_line_counts_and_repeats_with_a_seed():
    fates = []
    for _ in range(2):
        line = InterruptLine(InterruptConfig(drop_rate=0.5, seed=7))
        fates.append([line.raised() for _ in range(200)])
    assert fates[0] == fates[1]
    dropped = fates[0].count(None)
    assert 60 < dropped < 140 and line.dropped == dropped


@pytest.mark.parametrize("kwargs", [{"delay": -1}, {"drop_rate": 1.5}, {"drop_rate": "x"},
                                    {"seed": 1.5}, {"delay": True}])
def test_bad_interrupt_config(kwargs):
    with pytest.raises(ValueError, match="interrupts"):
        InterruptConfig(**kwargs)


class FakePollHandle:
    def __init__(self) -> None:
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1


async def open_state(ops: CramOperations, name: str) -> tuple[int, int]:
    directory = (await ops.lookup(1, name.encode())).st_ino
    inode = (await ops.lookup(directory, b"watermark_state")).st_ino
    return inode, (await ops.open(inode, os.O_RDONLY, None)).fh


async def test_dropped_interrupt_leaves_the_poller_asleep_but_the_file_tells_the_truth():
    dev = node(interrupts=InterruptConfig(drop_rate=1.0))
    ops = CramOperations([DeviceEntry("node0", "node", dev)])
    inode, fh = await open_state(ops, "node0")
    assert await ops.read(fh, 0, 64) == b"ok\n"
    fake = FakePollHandle()
    await ops.poll(inode, fh, fake, None)
    dev.watermarks.update(dev.pool.capacity)  # ok -> pressure
    assert fake.notified == 0
    assert await ops.poll(inode, fh, None, None) == 0  # still asleep
    assert await ops.read(fh, 0, 64) == b"pressure\n"  # the status register is right
    assert dev.interrupts.stat() == (0, 0, 1)
    dev.interrupts.configure(InterruptConfig())  # reload: reliable again
    dev.watermarks.update(0)  # pressure -> ok
    assert fake.notified == 1 and dev.interrupts.stat() == (1, 0, 1)
    assert await ops.poll(inode, fh, None, None) & select.POLLPRI


async def test_delayed_interrupt_arrives_late():
    dev = node(interrupts=InterruptConfig(delay=0.2))
    ops = CramOperations([DeviceEntry("node0", "node", dev)])
    inode, fh = await open_state(ops, "node0")
    await ops.read(fh, 0, 64)
    fake = FakePollHandle()
    await ops.poll(inode, fh, fake, None)
    dev.watermarks.update(dev.pool.capacity)
    assert fake.notified == 0 and await ops.poll(inode, fh, None, None) == 0
    await trio.sleep(0.3)
    assert fake.notified == 1
    assert dev.interrupts.stat() == (1, 1, 0)
    assert await ops.poll(inode, fh, None, None) & select.POLLIN


async def test_gate_file():
    dev = node()
    ops = CramOperations([DeviceEntry("node0", "node", dev)])
    directory = (await ops.lookup(1, b"node0")).st_ino
    inode = (await ops.lookup(directory, b"no_alloc")).st_ino
    fh = (await ops.open(inode, os.O_RDWR, None)).fh
    assert await ops.read(fh, 0, 16) == b"0\n"
    for bad in (b"2", b"yes", b"", b"-1", b"01x"):
        with pytest.raises(Exception) as info:
            await ops.write(fh, 0, bad)
        assert getattr(info.value, "errno", None) == errno.EINVAL
    assert not dev.no_alloc
    await ops.write(fh, 0, b"1\n")
    assert dev.no_alloc and await ops.read(fh, 0, 16) == b"1\n"
    for name, expected in ((b"zratio", b"8.0000\n"), (b"balloon_pages", b"0\n")):
        inode = (await ops.lookup(directory, name)).st_ino
        handle = (await ops.open(inode, os.O_RDONLY, None)).fh
        assert await ops.read(handle, 0, 64) == expected


async def test_write_policy_reject_on_zswap_is_einval(tmp_path):
    dev = ZswapDevice(DeviceConfig(size=64 * P, pool=16 * P), tmp_path / "backing.img")
    ops = CramOperations([DeviceEntry("zswap0", "zswap", dev)])
    directory = (await ops.lookup(1, b"zswap0")).st_ino
    inode = (await ops.lookup(directory, b"write_policy")).st_ino
    fh = (await ops.open(inode, os.O_WRONLY, None)).fh
    with pytest.raises(Exception) as info:
        await ops.write(fh, 0, b"reject\n")
    assert info.value.errno == errno.EINVAL
    assert dev.policy is Policy.NONE
    dev.close()


# -- the refusal storm -------------------------------------------------------------------

def test_storm_needs_the_same_pages_refused_again():
    storm = RefusalStorm(window=5, repeats=100)
    for i in range(1000):  # a thousand different pages refused once: no storm
        assert not storm.refused(i, 1, now=i * 0.001)
    assert storm.storms == 0
    started = [storm.refused(i % 10, 1, now=1.0 + i * 0.001) for i in range(200)]
    assert started.count(True) == 1 and storm.storms == 1
    assert storm.active(1.5)
    assert not storm.active(100.0)  # a quiet window ends it
    assert storm.storm_refusals > 0


async def test_refusal_storm_is_diagnosed_once_and_refusals_are_held(caplog, monkeypatch):
    dev = node(pool=16 * P)
    entry = DeviceEntry("node0", "node", dev, RefusalStorm(window=5, repeats=20, hold=0.001))
    ops = CramOperations([entry])
    directory = (await ops.lookup(1, b"node0")).st_ino
    inode = (await ops.lookup(directory, b"data")).st_ino
    fh = (await ops.open(inode, os.O_RDWR, None)).fh
    dev.set_no_alloc(True)
    for i in range(100):
        with pytest.raises(Exception) as info:
            await ops.write(fh, (i % 4) * P, rand(1, i))
        assert info.value.errno == errno.ENOSPC
    storms = [r for r in caplog.records if "refusal storm" in r.getMessage()]
    assert len(storms) == 1
    message = storms[0].getMessage()
    assert "no_alloc" in message and "cramfs swapoff node0" in message
    assert entry.storm.storms == 1
    assert 50 < entry.storm.storm_refusals < entry.storm.refusals == 100


# -- config ------------------------------------------------------------------------------

def test_config_interrupts_and_gate():
    config = configuration.parse('''
[device.node0]
kind = "node"
size = "64M"
pool = "8M"
[device.node0.watermarks]
no_alloc_on_full = true
[device.node0.interrupts]
delay = 0.5
drop_rate = 0.25
seed = 3
''')
    device = config.devices[0].device
    assert device.interrupts == InterruptConfig(0.5, 0.25, 3)
    assert device.no_alloc_on_full is True


@pytest.mark.parametrize("snippet, key", [
    ("[device.node0.interrupts]\ndelay = -1", "device.node0.interrupts.delay"),
    ("[device.node0.interrupts]\ndrop_rate = 2", "device.node0.interrupts.drop_rate"),
    ("[device.node0.interrupts]\nseed = 'x'", "device.node0.interrupts.seed"),
    ("[device.node0.interrupts]\nlate = 1", "device.node0.interrupts.late"),
    ("[device.node0.watermarks]\nno_alloc_on_full = 1",
     "device.node0.watermarks.no_alloc_on_full"),
])
def test_bad_interrupts_config_names_the_key(snippet, key):
    text = '[device.node0]\nkind = "node"\nsize = "64M"\npool = "8M"\n' + snippet
    with pytest.raises(configuration.ConfigError, match=key.replace(".", r"\.")):
        configuration.parse(text)


def test_a_client_refused_all_over_a_full_device_is_no_storm():
    storm = RefusalStorm()
    rng = random.Random(4)
    for i in range(3000):  # 100 refusals a second at random pages of a 256 MiB device
        assert not storm.refused(rng.randrange(65536), rng.choice((1, 256)), now=i * 0.01)
    assert storm.storms == 0
