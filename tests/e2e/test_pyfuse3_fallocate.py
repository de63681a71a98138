"""pyfuse3 with fallocate (install.sh builds 3.5.0 with patches/pyfuse3-3.5.0-fallocate.patch).

Through a real mount of a tiny pyfuse3 file system (fallocate_fs.py, run as a subprocess):
fallocate(2) -- from util-linux's fallocate, from ctypes and from a loop device's discard --
reaches ``Operations.fallocate`` with the caller's mode, offset and length; a file system
without the method answers the caller EOPNOTSUPP (the kernel turns FUSE's ENOSYS into
EOPNOTSUPP and never asks again). Without a pyfuse3 that has fallocate the mount tests skip --
or fail, naming install.sh, when CRAMFS_REQUIRE_E2E=1.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .helpers import HarnessError, attach_loop, detach_loop, is_mounted, run, unmount

FS_SCRIPT = Path(__file__).resolve().parent / "fallocate_fs.py"
SIZE = 1 << 20
FILL = 0xAB
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
REQUIRE_ENV = "CRAMFS_REQUIRE_E2E"  # the switch tests/conftest.py reads


def pyfuse3_fallocate_problem(module: object | None = None) -> str | None:
    """Why the pyfuse3 in use cannot serve fallocate, or None when it can.

    ``Operations.fallocate`` is the handler's Python half; ``fuse_fallocate_async`` exists only
    when the extension was compiled from the patched sources (so the C registers the handler).
    """
    if module is None:
        try:
            import pyfuse3 as module
        except ImportError as exc:
            return f"pyfuse3 not importable ({exc}): run ./install.sh"
    if not (hasattr(module.Operations, "fallocate") and hasattr(module, "fuse_fallocate_async")):
        return ("pyfuse3 has no fallocate handler (stock 3.5.0?): run ./install.sh, which builds "
                "it with patches/pyfuse3-3.5.0-fallocate.patch")
    return None


def missing(reason: str) -> None:
    """Skip -- or, with CRAMFS_REQUIRE_E2E=1, fail -- as tests/conftest.py's require() does."""
    if os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0"):
        pytest.fail(f"e2e prerequisite missing and {REQUIRE_ENV}=1: {reason}", pytrace=False)
    pytest.skip(reason)


def require_pyfuse3_fallocate(module: object | None = None) -> None:
    problem = pyfuse3_fallocate_problem(module)
    if problem is not None:
        missing(problem)


def require_util_linux(program: str) -> None:
    if shutil.which(program) is None:
        missing(f"{program} not installed (apt-get install util-linux)")


# -- the caller's side -----------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(path: Path, mode: int, offset: int, length: int) -> int:
    """fallocate(2) on ``path`` opened read-write: 0, or the errno the caller got."""
    fd = os.open(path, os.O_RDWR)
    try:
        if _fallocate(fd, mode, offset, length) == 0:
            return 0
        return ctypes.get_errno()
    finally:
        os.close(fd)


# -- the file system's side ------------------------------------------------------------------

class OneFileFS:
    """fallocate_fs.py mounted at ``mountpoint``; ``calls()`` are the fallocate calls it got."""

    def __init__(self, mountpoint: Path, log_path: Path, proc: subprocess.Popen[bytes]):
        self.mountpoint = mountpoint
        self.file = mountpoint / "data"
        self.log_path = log_path
        self.proc = proc

    def calls(self) -> list[dict[str, int]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]


@contextlib.contextmanager
def mounted(tmp_path: Path, answer: str) -> Iterator[OneFileFS]:
    mountpoint = tmp_path / f"mnt-{answer}"
    mountpoint.mkdir()
    log_path = tmp_path / f"fallocate-{answer}.log"
    stderr_path = tmp_path / f"fs-{answer}.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(FS_SCRIPT), str(mountpoint), str(log_path),
                                 answer], stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"fallocate_fs.py {answer} did not mount (exit "
                                   f"{proc.poll()}):\n{stderr_path.read_text()}")
            time.sleep(0.05)
        yield OneFileFS(mountpoint, log_path, proc)
    finally:
        try:
            unmount(mountpoint)
        finally:
            # The unmount ends the server; only if it does not, end it -- this pid, nothing else.
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
    if proc.returncode != 0:
        raise HarnessError(f"fallocate_fs.py {answer} exited {proc.returncode}:\n"
                           f"{stderr_path.read_text()}")


@pytest.fixture
def mount_fs(require, tmp_path: Path) -> Iterator[Callable[[str], OneFileFS]]:
    """``mount_fs(answer)`` -> a mounted :class:`OneFileFS`, unmounted at teardown."""
    require("root", "fuse")
    require_pyfuse3_fallocate()
    with contextlib.ExitStack() as stack:
        yield lambda answer: stack.enter_context(mounted(tmp_path, answer))


def _fallocate_cli(path: Path, offset: int, length: int) -> int:
    require_util_linux("fallocate")
    run(["fallocate", "--punch-hole", "--offset", str(offset), "--length", str(length),
         str(path)])
    return 0


def _fallocate_ctypes(path: Path, offset: int, length: int) -> int:
    return fallocate(path, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


# -- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("punch", [_fallocate_cli, _fallocate_ctypes], ids=["util-linux", "ctypes"])
def test_punch_hole_reaches_the_handler(mount_fs, punch) -> None:
    fs = mount_fs("handler")
    assert punch(fs.file, 4096, 8192) == 0

    [call] = fs.calls()
    assert call["mode"] == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert (call["offset"], call["length"]) == (4096, 8192)
    # The kernel drops its cached pages for the hole, so a read sees what the handler did.
    data = fs.file.read_bytes()
    assert len(data) == SIZE == fs.file.stat().st_size
    assert data[4096:12288] == bytes(8192)
    assert data.count(0) == 8192 and data.count(FILL) == SIZE - 8192


def test_other_modes_pass_through(mount_fs) -> None:
    fs = mount_fs("handler")
    assert fallocate(fs.file, FALLOC_FL_KEEP_SIZE, 0, 2 * SIZE) == 0
    assert fs.file.stat().st_size == SIZE
    assert fallocate(fs.file, 0, SIZE, SIZE) == 0
    assert fs.file.stat().st_size == 2 * SIZE

    assert [(c["mode"], c["offset"], c["length"]) for c in fs.calls()] == [
        (FALLOC_FL_KEEP_SIZE, 0, 2 * SIZE), (0, SIZE, SIZE)]


def test_default_operations_answer_eopnotsupp(mount_fs) -> None:
    """No fallocate method: pyfuse3 answers ENOSYS, the caller gets EOPNOTSUPP -- and the kernel
    remembers, so the second call never reaches the file system either."""
    fs = mount_fs("default")
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert fallocate(fs.file, mode, 4096, 8192) == errno.EOPNOTSUPP
    assert fallocate(fs.file, mode, 4096, 8192) == errno.EOPNOTSUPP
    assert fs.file.read_bytes() == bytes([FILL]) * SIZE


def test_handler_raising_eopnotsupp(mount_fs) -> None:
    """FUSEError(EOPNOTSUPP) reaches the caller as is and, unlike ENOSYS, leaves fallocate on:
    every call still reaches the handler."""
    fs = mount_fs("eopnotsupp")
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert fallocate(fs.file, mode, 0, 4096) == errno.EOPNOTSUPP
    assert fallocate(fs.file, mode, 8192, 4096) == errno.EOPNOTSUPP
    assert [(c["mode"], c["offset"], c["length"]) for c in fs.calls()] == [
        (mode, 0, 4096), (mode, 8192, 4096)]


def test_loop_discard_reaches_the_handler(require, mount_fs) -> None:
    """The reason for the patch: a loop device turns a discard into PUNCH_HOLE|KEEP_SIZE."""
    require("loop")
    require_util_linux("blkdiscard")
    fs = mount_fs("handler")
    dev = attach_loop(fs.file, direct_io=False)
    try:
        run(["blkdiscard", "--offset", str(64 << 10), "--length", str(128 << 10), dev])
    finally:
        detach_loop(dev)

    calls = fs.calls()
    assert calls, "the discard never reached Operations.fallocate"
    assert {c["mode"] for c in calls} == {FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE}
    covered = sorted((c["offset"], c["offset"] + c["length"]) for c in calls)
    assert covered[0][0] == 64 << 10 and covered[-1][1] == 192 << 10
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))
    data = fs.file.read_bytes()
    assert data[64 << 10:192 << 10] == bytes(128 << 10)
    assert data.count(0) == 128 << 10 and data.count(FILL) == SIZE - (128 << 10)


# -- the prerequisite itself (no mount, no root) ---------------------------------------------

def _stock_pyfuse3() -> types.SimpleNamespace:
    class Operations:
        async def poll(self, inode, fh, poll_handle, ctx):
            raise NotImplementedError

    return types.SimpleNamespace(Operations=Operations)


def test_without_fallocate_the_tests_skip(monkeypatch) -> None:
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="install.sh"):
        require_pyfuse3_fallocate(_stock_pyfuse3())


def test_without_fallocate_the_tests_fail_when_e2e_is_required(monkeypatch) -> None:
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="install.sh"):
        require_pyfuse3_fallocate(_stock_pyfuse3())


def test_python_half_alone_is_not_enough() -> None:
    """A patched _pyfuse3.py over C compiled from the unpatched .pyx registers no handler."""
    half = _stock_pyfuse3()
    half.Operations.fallocate = lambda self, fh, mode, offset, length: None
    assert "install.sh" in (pyfuse3_fallocate_problem(half) or "")
