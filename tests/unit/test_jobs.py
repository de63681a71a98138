"""cramfs.jobs: a request as the device serves it, the offloaded step run once, the reply held
as long as the media says, and no job keeping its request's buffers alive through a cycle."""

from __future__ import annotations

import gc
import os
import sys

import pytest

from cramfs import PAGE_SIZE
from cramfs.device import CompressedDevice, DeviceConfig
from cramfs.jobs import OFFLOAD_MIN_BYTES, ReadJob, WriteJob
from cramfs.timing import Timing, TimingConfig

P = PAGE_SIZE
LARGE = OFFLOAD_MIN_BYTES  # the smallest request that offloads


@pytest.fixture
def dev():
    device = CompressedDevice(DeviceConfig(size=1024 * P, pool=256 * P))
    yield device
    device.close()


def shape(dev: CompressedDevice, **config: float) -> None:
    dev.timing = Timing(TimingConfig(**config))


def test_the_device_hands_out_the_jobs_of_this_module(dev):
    assert type(dev.submit_write(0, bytes(LARGE))) is WriteJob
    assert type(dev.submit_read(0, LARGE)) is ReadJob


def test_the_offloaded_step_is_offered_once(dev):
    data = os.urandom(64) * (LARGE // 64)
    job = dev.submit_write(0, data)
    assert job.offload is not None
    job.offload()
    assert job.offload is None  # compressed: nothing left for a worker
    job.finish()
    read = dev.submit_read(0, LARGE)
    assert read.offload is not None
    read.offload()
    assert read.offload is None and bytes(read.finish()) == data


def test_finish_commits_once_however_often_it_is_asked(dev):
    job = dev.submit_write(0, os.urandom(LARGE))
    job.offload()
    first = job.finish()
    assert job.finish() is first
    assert dev.counters.write_requests == 1 and dev.pages_stored == LARGE // P


@pytest.mark.parametrize("submit", [lambda d: d.submit_write(0, os.urandom(LARGE)),
                                    lambda d: d.submit_read(0, LARGE)])
def test_finish_before_the_offloaded_step_is_a_caller_error(dev, submit):
    job = submit(dev)
    with pytest.raises(AssertionError, match="before the offloaded step"):
        job.finish()


@pytest.mark.parametrize("length", [P, LARGE])
def test_the_reply_is_held_for_the_media_latency(dev, length):
    shape(dev, write_latency=0.25, read_latency=0.125)
    job = dev.submit_write(0, bytes(length))
    if job.offload is not None:
        job.offload()
    assert job.finish().delay == 0.0
    assert job.delay() == 0.25  # the emulated media's, on top of write control's (none here)
    read = dev.submit_read(0, length)
    if read.offload is not None:
        read.offload()
    assert read.finish() == bytes(length) and read.delay() == 0.125


def test_an_unshaped_device_holds_no_reply(dev):
    job = dev.submit_write(0, bytes(LARGE))
    job.offload()
    job.finish()
    assert job.delay() == 0.0 and dev.submit_read(0, P).delay() == 0.0


def test_a_job_dropped_unfinished_lets_go_of_its_buffer_without_the_collector(dev):
    """A job in a reference cycle would keep its request's bytes until the cycle collector
    ran; under mlockall every such byte stays resident."""
    data = bytearray(os.urandom(LARGE))
    before = sys.getrefcount(data)
    gc.disable()
    try:
        job = dev.submit_write(0, data)
        assert sys.getrefcount(data) > before  # held until compressed
        assert job.offload is not None  # made on access, not kept
        del job
        assert sys.getrefcount(data) == before
    finally:
        gc.enable()


def test_a_compressed_job_no_longer_holds_the_callers_bytes(dev):
    data = bytearray(os.urandom(LARGE))
    before = sys.getrefcount(data)
    job = dev.submit_write(0, data)
    job.offload()
    assert sys.getrefcount(data) == before and job.data is None
    job.finish()
