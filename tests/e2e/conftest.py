"""Fixtures that mount the real daemon and clean the machine up afterwards, pass or fail."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .helpers import Daemon, Harness, MemCgroup, log, stale_cgroups


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def harness(require, daemon_command: str, tmp_path: Path) -> Iterator[Harness]:
    require("root", "fuse", "loop")
    h = Harness(tmp_path, daemon_command)
    try:
        yield h
    finally:
        problems = h.cleanup()
        if problems:
            log("teardown problems:\n  " + "\n  ".join(problems))
    # A teardown that could not undo what the test created must not pass silently.
    if problems:
        pytest.fail("teardown left the machine dirty:\n  " + "\n  ".join(problems),
                    pytrace=False)


@pytest.fixture
def start_daemon(harness: Harness) -> Callable[..., Daemon]:
    """``start_daemon(config_toml, *, env=None)`` -> a mounted :class:`Daemon`.

    The config is written under tmp_path, the mountpoint is ``tmp_path/cramfsdN/mnt``; returns
    once the mount is up and every configured ``<dev>/data`` exists, or fails with the daemon's
    stderr. Teardown (always): kill workload cgroups, swapoff + detach loop devices backed by the
    mount, SIGTERM the daemon (SIGKILL that pid after a timeout), unmount.
    """
    return harness.start_daemon


@pytest.fixture
def memory_cgroup(require, harness: Harness) -> Callable[..., MemCgroup]:
    """``memory_cgroup(limit_bytes)`` -> a ``cramfs-*`` memory cgroup removed at teardown."""
    require("memcg")
    return harness.cgroup


@pytest.fixture(scope="session", autouse=True)
def _no_stale_cgroups() -> Iterator[None]:
    yield
    left = stale_cgroups()
    if left:
        log(f"cgroups left behind: {left}")
