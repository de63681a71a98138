"""The real cramfsd refuses a size the machine could never describe: exit 2, one line naming
``device.NAME.size``, nothing mounted. (The memory share refused by config validation is
unit-tested with MemTotal replaced: no size this machine can hold trips it for real.)"""

from __future__ import annotations

import os

import pytest

from .helpers import run


@pytest.mark.parametrize("size, why", [
    ("16T", "must be below 16 TiB"),  # the device's own limit (32-bit page index)
    ("9000000T", "beyond what a file can address"),  # past 2**63-1: no loop device or FUSE
])
def test_a_size_the_machine_cannot_describe_exits_2_naming_the_key(require, daemon_command,
                                                                   tmp_path, size, why):
    require("daemon")
    mountpoint = tmp_path / "mnt"
    config = tmp_path / "cramfs.toml"
    config.write_text(f'mountpoint = "{mountpoint}"\nmetrics_address = ""\n\n[device.big]\n'
                      f'kind = "node"\nsize = "{size}"\npool = "64M"\n')
    proc = run([daemon_command, "--config", str(config)], timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cramfsd:")]
    assert len(lines) == 1 and lines[0].startswith("cramfsd: device.big.size: "), proc.stderr
    assert why in lines[0] and "Traceback" not in proc.stderr
    assert not os.path.exists(mountpoint)
