"""The watermark interrupt line, and how unreliable it is.

A real device raises its low/high threshold interrupts through MSI-X; a misbehaving one
delivers them late or not at all, and a driver that trusts interrupts alone then misses a
state change that the status register (``watermark_state``) still reports. The line decides,
per state change, whether and when the wake-up reaches pollers; the state itself is never
hidden. ``generation`` is the newest state change delivered: pollers wait on it, not on the
device's own generation, so a dropped interrupt really leaves them asleep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cramfs.timing import check_seed


@dataclass(frozen=True)
class InterruptConfig:
    delay: float = 0.0  # seconds between the state change and the wake-up
    drop_rate: float = 0.0  # share of wake-ups lost, 0..1
    seed: int | None = None  # for a repeatable sequence of drops

    def __post_init__(self) -> None:
        for name, value, top in (("delay", self.delay, 3600.0),
                                 ("drop_rate", self.drop_rate, 1.0)):
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0 <= value <= top:
                raise ValueError(f"interrupts.{name} must be a number within 0..{top:g}, "
                                 f"got {value!r}")
        check_seed(self.seed, "interrupts.seed")


class InterruptLine:
    """Decides the fate of each wake-up and counts it (delivered, of which delayed; dropped)."""

    def __init__(self, config: InterruptConfig | None = None, generation: int = 0) -> None:
        self.delivered = 0  # wake-ups that reached pollers, on time or late
        self.delayed = 0  # of those, the ones held back by ``delay``
        self.dropped = 0  # wake-ups lost
        self.generation = generation  # newest state change delivered to pollers
        self.configure(config or InterruptConfig())

    def configure(self, config: InterruptConfig) -> None:
        """Takes effect for the next state change (SIGHUP reload)."""
        self.config = config
        self._random = random.Random(config.seed)

    @property
    def reliable(self) -> bool:
        return not self.config.delay and not self.config.drop_rate

    def raised(self) -> float | None:
        """A state change happened: the delay before its wake-up, or None if it is lost."""
        config = self.config
        if config.drop_rate and self._random.random() < config.drop_rate:
            self.dropped += 1
            return None
        return config.delay

    def deliver(self, generation: int, late: bool) -> None:
        """The wake-up for state change ``generation`` reaches the pollers now."""
        self.delivered += 1
        self.delayed += late
        self.generation = max(self.generation, generation)

    def stat(self) -> tuple[int, int, int]:
        return self.delivered, self.delayed, self.dropped
