"""Write control: whether a write that needs new pool space may go ahead.

Three things can say no, asked in this order: the allocation gate (``no_alloc``, closed by a
node's driver on the high-threshold interrupt, or by the device itself on ``full`` with
``no_alloc_on_full``), and the watermark state under the ``reject`` policy; under
``throttle`` the write goes ahead and the reply is held back in proportion to the pressure.
The reason a refusal gives (gate, full, watermark) is chosen here, once. A device whose
writes never fail (zswap: its backing file takes what the pool does not) has no write
control: it refuses any policy but ``none`` and any attempt to close the gate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from cramfs.errors import WriteRejected
from cramfs.stats import REJECT_FULL, REJECT_GATE, REJECT_WATERMARK, Stats
from cramfs.watermarks import Policy, State, Watermarks


class WriteControl:
    __slots__ = ("stats", "watermarks", "policy", "no_alloc", "no_alloc_on_full",
                 "throttle_max_delay", "refuses")

    def __init__(self, stats: Stats, watermarks: Watermarks, policy: Policy,
                 throttle_max_delay: float, no_alloc_on_full: bool,
                 refuses: bool = True) -> None:
        self.stats = stats
        self.watermarks = watermarks
        self.refuses = refuses  # False: this device never refuses a write
        self.policy = policy if refuses else Policy.NONE
        # The allocation gate: while closed, writes that need new pool space fail ENOSPC.
        self.no_alloc = False
        self.no_alloc_on_full = no_alloc_on_full
        self.throttle_max_delay = throttle_max_delay
        watermarks.subscribe(self._state_changed)

    # -- settings ----------------------------------------------------------------------
    def set_policy(self, policy: Policy) -> None:
        policy = Policy(policy)
        if not self.refuses and policy is not Policy.NONE:
            raise ValueError("a zswap device never refuses a write: its policy stays 'none'")
        self.policy = policy

    def set_no_alloc(self, closed: bool) -> None:
        """Close (True) or open the allocation gate. A driver closes it on the high-threshold
        interrupt and opens it once it has made room; releases always pass."""
        if closed and not self.refuses:
            raise ValueError("a zswap device never refuses a write: it has no allocation gate")
        self.no_alloc = bool(closed)

    def _state_changed(self, old: State, new: State) -> None:
        if new is State.FULL and self.no_alloc_on_full:
            self.no_alloc = True

    # -- decisions ---------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """Nothing can refuse or slow a write now (the state is ok and the gate open)."""
        return self.watermarks.state is State.OK and not self.no_alloc

    def recheck_full(self, used_bytes: int) -> None:
        """``full`` says one allocation failed; it must not outlive the usage that caused it.
        (One oversized write into a half-empty pool would otherwise block every later write
        until something was freed.) Re-evaluating lets it fall back to pressure or ok."""
        if self.watermarks.state is State.FULL:
            self.watermarks.update(used_bytes)

    def refuses_growth(self) -> bool:
        """Would a write that needs new pool space be refused now? (precheck's question)"""
        return self.no_alloc or (self.policy is Policy.REJECT
                                 and self.watermarks.state is not State.OK)

    def admit(self, grows: Callable[[], bool], used_bytes: int) -> float:
        """Let a write through, refuse it, or say how long to hold its reply (seconds).
        ``grows()``: does it need new pool space? (asked only when the answer matters: a
        write that fits in the slots it holds always passes)."""
        if self.no_alloc:
            if grows():
                self.refuse()
            return 0.0
        wm = self.watermarks
        if wm.state is State.OK or self.policy is Policy.NONE or not grows():
            return 0.0
        if self.policy is Policy.REJECT:
            self.refuse()
        delay = self.throttle_max_delay * wm.pressure(used_bytes) / 1000
        counters = self.stats.counters
        counters.throttled_writes += 1
        counters.throttle_seconds += delay
        return delay

    def refuse(self) -> NoReturn:
        """Write control says no: the gate if it is closed, else the watermark state."""
        if self.no_alloc:
            self.reject(REJECT_GATE, "write control: the allocation gate (no_alloc) is closed")
        state = self.watermarks.state
        reason = REJECT_FULL if state is State.FULL else REJECT_WATERMARK
        self.reject(reason, f"write control: device in {state.value}")

    def reject(self, reason: str, message: str) -> NoReturn:
        counters = self.stats.counters
        counters.rejected[reason] += 1
        counters.failed_writes += 1
        raise WriteRejected(reason, message)
