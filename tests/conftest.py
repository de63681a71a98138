"""Test-wide prerequisites.

End-to-end tests need a real machine: root, ``/dev/fuse``, loop devices, a memory cgroup and a
few client programs. Where one is missing they skip with the reason -- unless
``CRAMFS_REQUIRE_E2E=1`` is set (CI sets it), which turns every such skip into a failure so a
broken runner can never pass by skipping everything.

Tests ask for prerequisites by name, either with the ``require`` fixture::

    def test_fio(require):
        require("root", "fuse", "fio")

or with a marker, checked before the test's fixtures run::

    @pytest.mark.requires("root", "fuse", "losetup")
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REQUIRE_ENV = "CRAMFS_REQUIRE_E2E"


def e2e_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0")


def _daemon_command() -> str | None:
    """The cramfsd executable: next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "cramfsd"
    if beside.exists():
        return str(beside)
    return shutil.which("cramfsd")


def _memory_cgroup() -> str | None:
    root = Path("/sys/fs/cgroup")
    controllers = root / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return None
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return None
    return "no memory cgroup controller (neither v2 memory.max nor v1 /sys/fs/cgroup/memory)"


def _loop_devices() -> str | None:
    if shutil.which("losetup") is None:
        return "losetup not installed (util-linux)"
    if not (Path("/dev/loop-control").exists() or Path("/dev/loop0").exists()):
        return "no loop devices (/dev/loop-control missing; modprobe loop)"
    return None


def _zram() -> str | None:
    if Path("/sys/block/zram0").exists():
        return None
    if os.geteuid() == 0 and shutil.which("modprobe"):
        import subprocess

        subprocess.run(["modprobe", "zram"], capture_output=True, timeout=30, check=False)
        if Path("/sys/block/zram0").exists():
            return None
    return "kernel zram not available (/sys/block/zram0 missing)"


def _fuse_fallocate() -> str | None:
    try:
        from daemon.capabilities import discard_supported
    except ImportError:
        return "pyfuse3 not installed (./install.sh)"
    if discard_supported():
        return None
    return "this pyfuse3 has no fallocate: build the patched one with ./install.sh"


_CHECKS: dict[str, Callable[[], str | None]] = {
    "fallocate": _fuse_fallocate,
    "root": lambda: None if os.geteuid() == 0 else "needs root",
    "fuse": lambda: None if Path("/dev/fuse").exists() else "no /dev/fuse",
    "daemon": lambda: None if _daemon_command() else "cramfsd not installed (pip install -e .)",
    "memcg": _memory_cgroup,
    "loop": _loop_devices,
    "zram": _zram,
}

# Programs are looked up on PATH; the name is the Debian package to install when missing.
_PROGRAMS = {
    "fio": "fio",
    "stress-ng": "stress-ng",
    "losetup": "util-linux",
    "mkswap": "util-linux",
    "swapon": "util-linux",
    "swapoff": "util-linux",
    "fusermount3": "fuse3",
    "dd": "coreutils",
    "dmesg": "util-linux",
    "promtool": "prometheus",
}


def prerequisite_problem(name: str) -> str | None:
    """Why ``name`` is unavailable, or None when it is there."""
    check = _CHECKS.get(name)
    if check is not None:
        return check()
    if shutil.which(name) is None:
        package = _PROGRAMS.get(name, name)
        return f"{name} not installed (apt-get install {package})"
    return None


def missing_prerequisite(reason: str) -> None:
    """Skip the test -- or fail it when e2e tests are required."""
    if e2e_required():
        pytest.fail(f"e2e prerequisite missing and {REQUIRE_ENV}=1: {reason}", pytrace=False)
    pytest.skip(reason)


def require(*names: str) -> None:
    problems = [p for p in (prerequisite_problem(n) for n in names) if p]
    if problems:
        missing_prerequisite("; ".join(problems))


@pytest.fixture(name="require")
def require_fixture() -> Callable[..., None]:
    """``require("root", "fio")`` skips (or, with CRAMFS_REQUIRE_E2E=1, fails) the test."""
    return require


@pytest.fixture
def daemon_command() -> str:
    command = _daemon_command()
    if command is None:
        missing_prerequisite("cramfsd not installed (pip install -e .)")
    return command


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(*names): prerequisites (root, fuse, memcg, loop, zram, daemon, "
        "fallocate, or a program name); skip when missing, fail when CRAMFS_REQUIRE_E2E=1")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("requires"):
        require(*marker.args)
