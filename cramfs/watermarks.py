"""Watermarks and write control: the emulated device's interrupt lines.

Usage is measured against the pool's real capacity. Crossing above ``high`` raises pressure
(write control engages); pressure clears only once usage falls below ``low`` (hysteresis, so a
workload hovering at one line does not storm the watcher). ``full`` means an allocation failed.
Every state change is an event: counted, and handed to subscribers (the daemon turns them into
poll(2) wake-ups, like sysfs_notify on a real device).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class State(enum.Enum):
    OK = "ok"
    PRESSURE = "pressure"
    FULL = "full"


class Policy(enum.Enum):
    REJECT = "reject"  # writes needing new pool space fail while in pressure or full
    THROTTLE = "throttle"  # such writes are delayed in proportion to pressure
    NONE = "none"  # accept until physically full, then emulate the hardware failure


class FailureMode(enum.Enum):
    DROP = "drop"  # the write is lost silently; reads return the old contents
    POISON = "poison"  # the page reads back EIO until rewritten


# Event names, one per edge: what a watcher or a metric sees.
EVENT_HIGH = "high"  # ok -> pressure: usage crossed above the high watermark
EVENT_LOW = "low"  # pressure/full -> ok: usage fell below the low watermark
EVENT_FULL = "full"  # an allocation did not fit
EVENT_NAMES = (EVENT_HIGH, EVENT_LOW, EVENT_FULL)

Listener = Callable[[State, State], None]


def validate_marks(low: float, high: float) -> None:
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"watermark {name} must be a number, got {value!r}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"watermark {name} must be within 0..1, got {value}")
    if not low < high:
        raise ValueError(f"watermark low ({low}) must be below high ({high})")


@dataclass
class Watermarks:
    capacity: int
    low: float = 0.80
    high: float = 0.90
    state: State = State.OK
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_NAMES, 0))
    last_change: float = field(default_factory=time.time)
    generation: int = 0  # bumps on every state change; pollers compare it
    _listeners: list[Listener] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate_marks(self.low, self.high)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(old, new)`` on every state change; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def set_marks(self, low: float, high: float, used: int) -> None:
        """Change the lines at once (validated first: a bad pair changes nothing)."""
        validate_marks(low, high)
        self.low, self.high = float(low), float(high)
        self.update(used)

    def high_bytes(self) -> int:
        return int(self.capacity * self.high)

    def low_bytes(self) -> int:
        return int(self.capacity * self.low)

    def pressure(self, used: int) -> int:
        """0 at or below low, 1000 at or above high, linear between; 1000 when full."""
        if self.state is State.FULL:
            return 1000
        low, high = self.low * self.capacity, self.high * self.capacity
        if used <= low:
            return 0
        if used >= high:
            return 1000
        return int((used - low) * 1000 // (high - low))

    def headroom(self, used: int) -> int:
        """Bytes that can still be placed before usage crosses ``high``."""
        return max(0, self.high_bytes() - used)

    def update(self, used: int, alloc_failed: bool = False) -> None:
        """Re-evaluate after a change in usage (or a failed allocation)."""
        state = self.state
        if alloc_failed:
            new = State.FULL
        elif state is State.OK:
            new = State.PRESSURE if used > self.high * self.capacity else State.OK
        elif state is State.PRESSURE:
            new = State.OK if used < self.low * self.capacity else State.PRESSURE
        else:  # FULL clears once there is room below high again
            if used < self.low * self.capacity:
                new = State.OK
            elif used < self.high * self.capacity:
                new = State.PRESSURE
            else:
                new = State.FULL
        if new is not state:
            self._change(state, new)

    def _change(self, old: State, new: State) -> None:
        self.state = new
        self.generation += 1
        self.last_change = time.time()
        if new is State.PRESSURE and old is State.OK:
            self.events[EVENT_HIGH] += 1
        elif new is State.OK:
            self.events[EVENT_LOW] += 1
        elif new is State.FULL:
            self.events[EVENT_FULL] += 1
        for listener in list(self._listeners):
            listener(old, new)
