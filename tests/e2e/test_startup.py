"""The real cramfsd at start and on SIGHUP: a bad mountpoint exits 2 with one line naming the
key, and a relative --config still reloads after the daemon has changed to /."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import Daemon, NotifySocket, is_mounted, read_attr, run, swap_config

pytestmark = pytest.mark.requires("root", "fuse")

CONFIG = 'metrics_address = ""\n' + swap_config("64M", "16M")


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("cramfsd:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("where, key", [("file", "mountpoint"), ("command line", "--mountpoint")])
@pytest.mark.parametrize("mountpoint", ["/etc/passwd/x", "/proc/cramfs", "/sys/cramfs",
                                        "/proc/self/cramfs"])
def test_a_bad_mountpoint_exits_2_naming_the_key(require, daemon_command, tmp_path, where, key,
                                                mountpoint):
    require("daemon")
    config = tmp_path / "cramfs.toml"
    if where == "file":
        config.write_text(f'mountpoint = "{mountpoint}"\n' + CONFIG)
        argv = [daemon_command, "--config", str(config)]
    else:
        config.write_text(CONFIG)
        argv = [daemon_command, "--config", str(config), "--mountpoint", mountpoint]
    proc = run(argv, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert one_line(proc.stderr).startswith(f"cramfsd: {key}: {mountpoint}: ")
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(mountpoint)


def test_sighup_reloads_a_relative_config(require, daemon_command, harness, tmp_path):
    """cramfsd --config cramfs.toml (relative), then SIGHUP after it changed to /."""
    require("daemon")
    (tmp_path / "cramfs.toml").write_text(CONFIG)
    mountpoint = tmp_path / "mnt"
    stderr_path = tmp_path / "cramfsd.stderr"
    notify = NotifySocket()
    env = dict(os.environ, NOTIFY_SOCKET=notify.path)
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen([daemon_command, "--config", "cramfs.toml", "--mountpoint",
                                 "mnt", "--log-level", "info"], cwd=tmp_path, env=env,
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    daemon = Daemon(proc, mountpoint, tmp_path / "cramfs.toml", stderr_path, "", ["swap0"],
                    notify)
    harness.daemons.append(daemon)  # stopped and unmounted at teardown, pass or fail
    harness.wait_ready(daemon, 30)
    assert os.readlink(f"/proc/{proc.pid}/cwd") == "/"
    assert read_attr(mountpoint, "swap0", "watermark_high") == "0.9"

    (tmp_path / "cramfs.toml").write_text(CONFIG.replace("high = 0.90", "high = 0.95"))
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while read_attr(mountpoint, "swap0", "watermark_high") != "0.95":
        assert time.monotonic() < deadline, daemon.log_tail()
        time.sleep(0.1)
    log = daemon.log()
    assert "No such file" not in log and "nothing changed" not in log, log[-3000:]
    assert "1 change(s) applied" in log, log[-3000:]
    assert daemon.stop(timeout=30) == 0, daemon.log_tail()
    assert not is_mounted(mountpoint)
    assert Path(mountpoint).is_dir()
