"""Device timing and fault injection: how slow and how unreliable the emulated media is.

Latency is added to every request; bandwidth is a shared budget per direction (a request of
n bytes occupies the media for n/bandwidth seconds, queued behind earlier ones), the way
nbdkit's delay and rate filters shape a device. Error rates fail a fraction of requests
before they touch any data, like nbdkit's error filter.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

OPS = ("read", "write")
# A seed is stored in a trace and a TOML file as a signed 64-bit integer.
MAX_SEED = 2**63 - 1


def check_seed(seed: object, name: str = "seed") -> None:
    """Refuse a seed that is not None or an integer in 0..MAX_SEED (a bool is not one)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"{name} must be an integer in 0..{MAX_SEED}, got {seed!r}")


@dataclass
class TimingConfig:
    read_latency: float = 0.0  # seconds added to each read
    write_latency: float = 0.0
    read_bandwidth: int = 0  # bytes/second; 0 = unlimited
    write_bandwidth: int = 0
    read_error_rate: float = 0.0  # fraction of requests failed with EIO
    write_error_rate: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for op in OPS:
            latency = getattr(self, f"{op}_latency")
            if not 0 <= latency <= 60:
                raise ValueError(f"{op}_latency must be 0..60 seconds, got {latency}")
            if getattr(self, f"{op}_bandwidth") < 0:
                raise ValueError(f"{op}_bandwidth must not be negative")
            rate = getattr(self, f"{op}_error_rate")
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{op}_error_rate must be within 0..1, got {rate}")
        check_seed(self.seed)

    @property
    def active(self) -> bool:
        return any((self.read_latency, self.write_latency, self.read_bandwidth,
                    self.write_bandwidth, self.read_error_rate, self.write_error_rate))


class Timing:
    def __init__(self, config: TimingConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.active = config.active  # False: no latency, bandwidth or errors to apply
        self._clock = clock
        self._busy_until = dict.fromkeys(OPS, 0.0)
        self._random = random.Random(config.seed)

    def should_fail(self, op: str) -> bool:
        rate: float = getattr(self.config, f"{op}_error_rate")
        return rate > 0 and self._random.random() < rate

    def delay(self, op: str, nbytes: int) -> float:
        """Seconds to hold this request's reply: latency plus its turn on the media."""
        config = self.config
        latency: float = getattr(config, f"{op}_latency")
        bandwidth: int = getattr(config, f"{op}_bandwidth")
        if not bandwidth:
            return latency
        now = self._clock()
        start = max(now, self._busy_until[op])
        end = start + nbytes / bandwidth
        self._busy_until[op] = end
        return latency + (end - now)
