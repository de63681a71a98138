"""The daemon's view of its configured devices: a name, a kind and the emulated hardware."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cramfs.device import CompressedDevice
from cramfs.storm import RefusalStorm
from cramfs.trace import TraceWriter


@dataclass
class DeviceEntry:
    name: str
    kind: str  # a name in daemon.kinds.REGISTRY
    device: CompressedDevice
    storm: RefusalStorm = field(default_factory=RefusalStorm)  # the kernel's retry loop
    trace: TraceWriter | None = None  # recording its traffic (daemon.recording)
    # The daemon's own mount: a trace may not be written into it (the daemon would wait on
    # itself to serve its own trace file).
    mountpoint: Path | None = None
