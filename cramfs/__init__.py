"""cramfs: the emulated compressed-memory hardware.

Plain Python, no FUSE and no Trio: the pool, the codec, the page table, the watermarks
and the device models built on them. The daemon in ``daemon/`` only serves this over FUSE.
"""

PAGE_SIZE = 4096
PAGE_SHIFT = 12
