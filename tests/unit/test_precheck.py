"""The early refusal must refuse exactly what the full write path would refuse, and count it."""

import os

import pytest

from cramfs.device import CompressedDevice, DeviceConfig
from cramfs.errors import WriteRejected
from cramfs.watermarks import State

P = 4096


def pressured() -> CompressedDevice:
    dev = CompressedDevice(DeviceConfig(size=256 * P, pool=32 * P, low=0.3, high=0.5))
    offset = 0
    with pytest.raises(WriteRejected):
        while True:
            dev.write(offset, os.urandom(P))
            offset += P
    assert dev.watermarks.state is not State.OK
    return dev


def test_refuses_incompressible_page_on_empty_slot_and_counts():
    dev = pressured()
    before = (dev.mm_stat(), dev.counters.failed_writes, dict(dev.counters.rejected))
    with pytest.raises(WriteRejected):
        dev.precheck_write(200 * P, os.urandom(P))
    assert dev.mm_stat() == before[0]
    assert dev.counters.failed_writes == before[1] + 1
    assert sum(dev.counters.rejected.values()) == sum(before[2].values()) + 1


@pytest.mark.parametrize("data", [bytes(P), b"\x01" * P, bytes(100)])
def test_lets_same_filled_and_partial_pages_through(data):
    dev = pressured()
    dev.precheck_write(200 * P, data)  # no exception: the full path decides
    dev.write(200 * P, data)


def test_lets_overwrites_of_pool_pages_through():
    dev = pressured()
    dev.precheck_write(0, os.urandom(P))  # page 0 holds a huge page: may reuse its slot
    dev.write(0, os.urandom(P))


def test_silent_when_state_is_ok():
    dev = CompressedDevice(DeviceConfig(size=256 * P, pool=32 * P))
    dev.precheck_write(0, os.urandom(8 * P))


def test_full_does_not_outlive_its_cause():
    """One oversized write into an empty pool fails as full; a small one right after fits."""
    dev = CompressedDevice(DeviceConfig(size=256 * P, pool=32 * P, low=0.5, high=0.9))
    with pytest.raises(WriteRejected) as refused:
        dev.write(0, os.urandom(64 * P))
    assert refused.value.reason == "full" and dev.watermarks.state is State.FULL
    assert dev.used_bytes == 0
    dev.write(100 * P, os.urandom(P))
    assert dev.watermarks.state is State.OK
    assert dev.read(100 * P, P) != bytes(P)
