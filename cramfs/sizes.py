"""Human sizes ("4G", "512M") as used in the config and attribute files."""

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a byte count with an optional K/M/G/T suffix (powers of 1024).

    Raises ValueError with a message that quotes the bad text.
    """
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (use a number with an optional K, M, G or T)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def format_size(value: int) -> str:
    """Shortest exact K/M/G/T spelling of a byte count, like zramctl prints."""
    for suffix in ("T", "G", "M", "K"):
        unit = _UNITS[suffix]
        if value >= unit and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


def format_size_approx(value: float) -> str:
    """One-decimal K/M/G/T spelling for tables."""
    for suffix in ("T", "G", "M", "K"):
        unit = _UNITS[suffix]
        if value >= unit:
            return f"{value / unit:.1f}{suffix}"
    return f"{int(value)}B"
