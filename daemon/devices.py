"""The daemon's view of its configured devices: a name, a kind and the emulated hardware."""

from __future__ import annotations

from dataclasses import dataclass

from cramfs.device import CompressedDevice

KINDS = ("swap", "zswap", "node")


@dataclass
class DeviceEntry:
    name: str
    kind: str  # one of KINDS
    device: CompressedDevice
