"""A zswap-like device: a compressed cache in the pool in front of a backing file.

The device is the base device with the backing tier plugged in (cramfs.tiers.BackingTier:
the pool limit and its hysteresis, the backing file, the CLOCK shrinker), a referenced bit
per stored page for that shrinker, and no write control: zswap never refuses a write, the
backing file is the fallback. This class only wires those together and keeps the names the
daemon reads (``max_pool_percent``, ``writeback``, ``debugfs`` ...).
"""

from __future__ import annotations

from pathlib import Path

from cramfs.backing import BackingStore
from cramfs.device import CompressedDevice, DeviceConfig
from cramfs.tiers import DEFAULT_ACCEPT_THRESHOLD_PERCENT as DEFAULT_ACCEPT_THRESHOLD_PERCENT
from cramfs.tiers import DEFAULT_MAX_POOL_PERCENT as DEFAULT_MAX_POOL_PERCENT
from cramfs.tiers import BackingTier
from cramfs.tiers import validate_percents as validate_percents


class ZswapDevice(CompressedDevice):
    TRACKS_REFERENCES = True  # the shrinker's CLOCK reads a referenced bit per stored page
    REFUSES_WRITES = False  # the backing file takes what the pool does not

    def __init__(self, config: DeviceConfig, backing_file: Path | str,
                 max_pool_percent: int = DEFAULT_MAX_POOL_PERCENT,
                 accept_threshold_percent: int = DEFAULT_ACCEPT_THRESHOLD_PERCENT) -> None:
        validate_percents(max_pool_percent, accept_threshold_percent)
        super().__init__(config)
        try:
            backing = BackingStore(backing_file, config.size)
        except OSError:
            self.pool.close()
            self.codec.close()
            raise
        self.backing_tier = BackingTier(self.books, self.pool, self.codec, self.stats, backing,
                                 max_pool_percent, accept_threshold_percent)
        self.tier = self.backing_tier

    # -- the limit and its hysteresis (BackingTier's) ---------------------------------------
    @property
    def max_pool_percent(self) -> int:
        return self.backing_tier.max_pool_percent

    @property
    def accept_threshold_percent(self) -> int:
        return self.backing_tier.accept_threshold_percent

    @property
    def limit_reached(self) -> bool:
        return self.backing_tier.limit_reached

    @limit_reached.setter
    def limit_reached(self, reached: bool) -> None:
        self.backing_tier.limit_reached = reached

    @property
    def pool_limit(self) -> int:
        return self.backing_tier.pool_limit

    @property
    def accept_bytes(self) -> int:
        return self.backing_tier.accept_bytes

    def set_limits(self, max_pool_percent: int | None = None,
                   accept_threshold_percent: int | None = None) -> None:
        self.backing_tier.set_limits(max_pool_percent, accept_threshold_percent)

    # -- the shrinker ----------------------------------------------------------------------
    @property
    def _hand(self) -> int:
        return self.backing_tier.hand

    def needs_writeback(self) -> bool:
        return self.backing_tier.needs_writeback()

    def writeback(self, max_pages: int = 64, max_scan: int = 16384) -> int:
        """Write up to ``max_pages`` cold pool pages to the backing file (CLOCK sweep),
        stopping once usage is below the accept threshold. Returns pages written."""
        written = self.backing_tier.writeback(self.pages, max_pages, max_scan)
        if written:
            self._settle()
        return written

    # -- zswap's debugfs view --------------------------------------------------------------
    def debugfs(self) -> dict[str, int]:
        """zswap's debugfs files, in the kernel's order (stats.ZSWAP_DEBUGFS_FIELDS)."""
        return self.stats.zswap_debugfs(self.books, self.pool)
