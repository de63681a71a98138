"""daemon.kinds: the one registry of device kinds, and what the daemon reads from it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyfuse3
import pytest
import trio

from cramfs import PAGE_SIZE
from cramfs.device import CompressedDevice, DeviceConfig
from cramfs.watermarks import Policy
from cramfs.zswap import ZswapDevice
from daemon import config as configuration
from daemon import kinds
from daemon.attributes import ATTRIBUTES, attributes_for
from daemon.devices import DeviceEntry
from daemon.fs import CramOperations
from daemon.kinds import REGISTRY, SettingError, Settings, ZswapSettings

P = PAGE_SIZE
SMALL = DeviceConfig(size=64 * P, pool=16 * P)


def test_the_registry_names_the_three_kinds():
    assert kinds.NAMES == ("swap", "zswap", "node")
    assert {name: kind.device_class for name, kind in REGISTRY.items()} == {
        "swap": CompressedDevice, "zswap": ZswapDevice, "node": CompressedDevice}
    with pytest.raises(KeyError):
        kinds.kind_named("zram")


# The files each kind had before the registry, in order: a contract (cramfs status, the README).
GATE = ["no_alloc"]
NODE = ["safe_pages", "zratio", "balloon_pages", "trim_count"]
ZSWAP = list(kinds.ZSWAP_COUNTERS) + ["max_pool_percent", "accept_threshold_percent",
                                      "backing_pages", "backing_allocated"]


@pytest.mark.parametrize("kind, own", [("swap", GATE), ("node", GATE + NODE),
                                       ("zswap", ZSWAP)])
def test_each_kind_has_the_common_files_then_its_own(kind, own):
    names = [attribute.name for attribute in attributes_for(kind)]
    assert names == [attribute.name for attribute in ATTRIBUTES] + own
    assert len(set(names)) == len(names)


def test_zswap_counter_files_are_the_devices_debugfs_keys(tmp_path):
    device = ZswapDevice(SMALL, tmp_path / "backing.img")
    try:
        assert tuple(device.debugfs()) == kinds.ZSWAP_COUNTERS
    finally:
        device.close()


@pytest.mark.parametrize("name", kinds.NAMES)
def test_each_kind_builds_its_device_class(name, tmp_path):
    kind = kinds.kind_named(name)
    table = {"backing_file": str(tmp_path / "b.img")} if kind.settings.KEYS else {}
    device = kind.settings.parse(table).build(SMALL)
    try:
        assert type(device) is kind.device_class
    finally:
        device.close()


def test_config_reads_kinds_and_their_keys_from_the_registry(monkeypatch):
    body = '[device.d]\nkind = "{kind}"\nsize = "64M"\npool = "16M"\n'
    assert configuration.parse(body.format(kind="node")).devices[0].settings == Settings()
    with pytest.raises(configuration.ConfigError, match="^device.d.kind: must be one of "
                       "swap, zswap, node, got 'test'$"):
        configuration.parse(body.format(kind="test"))

    class TestSettings(Settings):
        KEYS = frozenset({"colour"})

    test_kind = kinds.Kind("test", "a kind added in one place", CompressedDevice, TestSettings)
    monkeypatch.setitem(REGISTRY, "test", test_kind)
    monkeypatch.setattr(kinds, "NAMES", (*kinds.NAMES, "test"))
    spec = configuration.parse(body.format(kind="test") + 'colour = "red"\n').devices[0]
    assert (spec.kind, type(spec.settings)) == ("test", TestSettings)
    with pytest.raises(configuration.ConfigError, match="^device.d.colour: unknown key"):
        configuration.parse(body.format(kind="node") + 'colour = "red"\n')


# -- zswap's settings: parsed, built, applied ----------------------------------------------

@pytest.mark.parametrize("table, key", [
    ({}, "backing_file"), ({"backing_file": ""}, "backing_file"),
    ({"backing_file": 3}, "backing_file"),
    ({"backing_file": "/b", "max_pool_percent": 0}, "max_pool_percent"),
    ({"backing_file": "/b", "max_pool_percent": True}, "max_pool_percent"),
    ({"backing_file": "/b", "accept_threshold_percent": 101}, "accept_threshold_percent"),
    ({"backing_file": "/b", "accept_threshold_percent": "9"}, "accept_threshold_percent")])
def test_zswap_settings_name_the_refused_key(table, key):
    with pytest.raises(SettingError) as info:
        ZswapSettings.parse(table)
    assert info.value.key == key


def test_zswap_settings_parse_with_defaults():
    assert ZswapSettings.parse({"backing_file": "/b"}) == ZswapSettings(Path("/b"), 20, 90)


def test_a_backing_file_that_cannot_be_created_names_the_key(tmp_path):
    settings = ZswapSettings(tmp_path / "missing" / "b.img")
    with pytest.raises(SettingError) as info:
        settings.build(SMALL)
    assert info.value.key == "backing_file"
    assert str(info.value).startswith(f"{tmp_path / 'missing' / 'b.img'}: ")


def test_zswap_settings_apply_the_limits(tmp_path):
    settings = ZswapSettings(tmp_path / "b.img", 40, 50)
    device = ZswapSettings(tmp_path / "b.img").build(SMALL)
    try:
        assert settings.apply(device, "max_pool_percent") == 40
        assert isinstance(device, ZswapDevice)
        assert (device.max_pool_percent, device.accept_threshold_percent) == (40, 50)
        with pytest.raises(KeyError):
            settings.apply(device, "backing_file")  # needs a restart
    finally:
        device.close()


def test_plain_kinds_have_no_runtime_settings():
    device = Settings().build(SMALL)
    try:
        with pytest.raises(KeyError):
            Settings().apply(device, "max_pool_percent")
        with pytest.raises(TypeError, match="not a zswap device"):
            kinds.zswap_of(device)
    finally:
        device.close()


# -- zswap's files through the file system -------------------------------------------------

@pytest.fixture
async def zswap_ops(tmp_path):
    device = ZswapDevice(SMALL, tmp_path / "backing.img")
    ops = CramOperations([DeviceEntry("zs0", "zswap", device)])
    yield ops, device
    device.close()


async def write_file(ops: CramOperations, name: str, value: bytes) -> int:
    directory = ops.nodes[pyfuse3.ROOT_INODE].children[b"zs0"]
    fh = (await ops.open(ops.nodes[directory].children[name.encode()], os.O_WRONLY,
                         None)).fh
    try:
        return await ops.write(fh, 0, value)
    except pyfuse3.FUSEError as exc:
        return -exc.errno
    finally:
        await ops.release(fh)


@pytest.mark.parametrize("name, value", [("max_pool_percent", b"0"),
                                         ("max_pool_percent", b"101"),
                                         ("max_pool_percent", b"x"),
                                         ("accept_threshold_percent", b"101")])
async def test_a_percent_out_of_the_devices_range_is_einval(zswap_ops, name, value):
    ops, device = zswap_ops
    assert await write_file(ops, name, value) == -errno.EINVAL
    assert (device.max_pool_percent, device.accept_threshold_percent) == (20, 90)


async def test_a_percent_in_range_is_set(zswap_ops):
    ops, device = zswap_ops
    assert await write_file(ops, "accept_threshold_percent", b"75\n") == 3
    assert device.accept_threshold_percent == 75


@pytest.mark.parametrize("policy", [b"reject", b"throttle"])
async def test_a_zswap_write_policy_that_refuses_is_einval(zswap_ops, policy):
    ops, device = zswap_ops
    assert await write_file(ops, "write_policy", policy) == -errno.EINVAL
    assert device.policy is Policy.NONE


# -- zswap's background work ---------------------------------------------------------------

async def test_the_shrinker_writes_back_in_batches_while_the_device_asks(tmp_path,
                                                                        monkeypatch):
    device = ZswapDevice(SMALL, tmp_path / "backing.img")
    entry = DeviceEntry("zs0", "zswap", device)
    asked = iter([True, True, True, False])
    batches: list[int] = []

    def writeback(max_pages: int) -> int:
        batches.append(max_pages)
        return 0 if len(batches) == 2 else 5

    monkeypatch.setattr(device, "needs_writeback", lambda: next(asked, False))
    monkeypatch.setattr(device, "writeback", writeback)
    try:
        with trio.move_on_after(5 * kinds.SHRINKER_IDLE):
            await kinds.REGISTRY["zswap"].background(entry)  # type: ignore[misc]
        assert batches == [kinds.SHRINK_BATCH] * 3
    finally:
        device.close()
