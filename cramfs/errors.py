"""Errors the device raises; the daemon maps each to one errno."""

from cramfs.sizes import format_size


class PoolUnavailable(ValueError):
    """The machine refused the pool's memory (its memfd or a mapping): a capacity this host
    cannot hold. A ValueError, as every other capacity the device refuses is."""

    def __init__(self, capacity: int, cause: BaseException) -> None:
        reason = (cause.strerror if isinstance(cause, OSError) and cause.strerror
                  else str(cause) or type(cause).__name__)
        super().__init__(f"this machine cannot map a pool of {format_size(capacity)} "
                         f"({reason})")


class DeviceError(Exception):
    """Base of every error a device operation reports to its caller."""


class OutOfRange(DeviceError):
    """I/O outside the advertised capacity (EINVAL/EFBIG at the file system)."""


class WriteRejected(DeviceError):
    """Write control refused a write that needed new pool space (ENOSPC)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PoisonedPage(DeviceError):
    """A read touched a page the emulated hardware poisoned (EIO)."""

    def __init__(self, page: int) -> None:
        super().__init__(f"page {page} is poisoned")
        self.page = page


class InjectedFault(DeviceError):
    """A request failed on purpose by the configured error rate (EIO)."""


class BackingError(DeviceError):
    """The backing file refused a write (disk full, I/O error): EIO, nothing placed."""
