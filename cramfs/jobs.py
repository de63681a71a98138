"""A request as the device serves it: which part runs off the caller's thread is the device's
to say, so an adapter (daemon/fs.py) only knows "run ``offload`` on a worker, then ``finish``
here, then hold the reply ``delay()`` seconds". ``CompressedDevice.submit_write`` and
``submit_read`` make these; the device's own steps (compress, commit, fetch, decode) stay in
cramfs/device.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cramfs.device import CompressedDevice, ReadPlan, WritePlan, WriteResult

# Requests from this size up compress (writes) or decompress (reads) on a worker thread; a
# smaller one (a swap page) is served whole on the caller's thread, where the hand-off would
# cost more than the work.
OFFLOAD_MIN_BYTES = 64 * 1024


class WriteJob:
    """A write request as the device serves it: the caller runs ``offload`` (when not None:
    pure compression, safe on any thread) off its own thread, then ``finish`` on it (the
    commit). Anything refused is raised by ``submit_write`` or ``finish``. ``delay`` is how
    long to hold the reply afterwards (throttle, emulated latency and bandwidth).

    A job holds no reference to itself (``offload`` is made on each access, not kept): a
    cycle would keep the request's buffers alive until the cycle collector ran, and under
    mlockall every such byte stays resident. (tests/bench/sparse_bench.py, 64G node, 256 MiB
    of 1 MiB writes: with jobs that kept ``offload`` as a bound method, RSS beyond the pool
    grew 380-398 B per stored page, against 90-93 B before the jobs existed and 89.6-89.9 B
    with jobs as they are, same runs.)"""

    __slots__ = ("device", "offset", "data", "nbytes", "shaped", "plan", "result")

    def __init__(self, device: CompressedDevice, offset: int, data: bytes | memoryview,
                 shaped: bool) -> None:
        self.device = device
        self.offset = offset
        self.data: bytes | memoryview | None = data  # until compressed
        self.nbytes = len(data)
        self.shaped = shaped
        self.plan: WritePlan | None = None
        self.result: WriteResult | None = None

    @property
    def offload(self) -> Callable[[], None] | None:
        return self.compress if self.data is not None and self.result is None else None

    def compress(self) -> None:
        assert self.data is not None
        self.plan = self.device._prepare(self.offset, self.data)
        self.data = None

    def finish(self) -> WriteResult:
        if self.result is None:
            assert self.plan is not None, "finish before the offloaded step ran"
            self.result = self.device.commit_write(self.plan)
            self.plan = None
        return self.result

    def delay(self) -> float:
        assert self.result is not None
        extra = self.device.io_delay("write", self.nbytes) if self.shaped else 0.0
        return self.result.delay + extra


class ReadJob:
    """A read request as the device serves it: ``offload`` (when not None: decompression,
    safe on any thread) off the caller's thread, then ``finish`` for the bytes. ``reply`` is
    the buffer the bytes may live in (a reused one the caller handed in), to be given back
    once they are sent. Like WriteJob, it holds no reference to itself."""

    __slots__ = ("device", "length", "shaped", "plan", "data")

    def __init__(self, device: CompressedDevice, length: int, shaped: bool) -> None:
        self.device = device
        self.length = length
        self.shaped = shaped
        self.plan: ReadPlan | None = None
        self.data: bytes | None = None

    @property
    def offload(self) -> Callable[[], None] | None:
        return self.decompress if self.plan is not None and self.data is None else None

    def decompress(self) -> None:
        assert self.plan is not None
        self.data = self.device.decode(self.plan)

    def finish(self) -> bytes:
        assert self.data is not None, "finish before the offloaded step ran"
        return self.data

    @property
    def reply(self) -> bytearray | None:
        return self.plan.out if self.plan is not None else None

    def delay(self) -> float:
        return self.device.io_delay("read", self.length) if self.shaped else 0.0
