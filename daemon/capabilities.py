"""What the installed FUSE binding lets the daemon offer.

Discard needs the kernel's FUSE_FALLOCATE, which a stock pyfuse3 3.5 never registers: libfuse
then answers ENOSYS and the kernel stops asking for the life of the mount. ``./install.sh``
builds pyfuse3 with ``patches/pyfuse3-3.5.0-fallocate.patch``; with any other pyfuse3 the daemon
still works, and pages leave the pool only when they are written with zeros.
"""

from __future__ import annotations

import pyfuse3

DISCARD_UNAVAILABLE = (
    "discard unavailable: this pyfuse3 has no fallocate handler, so the kernel's discards "
    "(swapon --discard, blkdiscard, fallocate --punch-hole) never reach the daemon and freed "
    "pages stay in the pool until they are zero-written; install with ./install.sh for the "
    "patched pyfuse3")


def discard_supported() -> bool:
    """Does the installed pyfuse3 register FUSE_FALLOCATE (our patch, or a later upstream)?"""
    return hasattr(pyfuse3.Operations, "fallocate")
