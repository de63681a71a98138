"""systemd integration: the units verify clean, sd_notify is honest, SIGHUP reloads."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .helpers import Daemon, config_devices

REPO = Path(__file__).resolve().parents[2]
BINDIR = Path(sys.executable).parent

CONFIG = """
metrics_address = ""
[device.swap0]
kind = "swap"
size = "64M"
pool = "16M"
[device.swap0.watermarks]
low = 0.5
high = 0.7
"""


def test_units_verify_without_a_warning(require, tmp_path):
    require("systemd-analyze")
    cramfs = BINDIR / "cramfs"
    assert cramfs.exists(), f"{cramfs} missing: install the project first"
    subprocess.run([str(cramfs), "install-units", "--root", str(tmp_path), "--bindir",
                    str(BINDIR), "--no-link"], check=True, capture_output=True, timeout=60)
    unitdir = tmp_path / "etc/systemd/system"
    (unitdir / "cramfs-swap@swap0.service").symlink_to("cramfs-swap@.service")
    done = subprocess.run(["systemd-analyze", "verify", "cramfs.service",
                           "cramfs-swap@swap0.service"], cwd=unitdir, capture_output=True,
                          text=True, timeout=120)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and output == "", output
    config = tmp_path / "etc/cramfs/cramfs.toml"
    assert config.exists()
    removed = subprocess.run([str(cramfs), "uninstall-units", "--root", str(tmp_path),
                              "--bindir", str(BINDIR)], check=True, capture_output=True,
                             text=True, timeout=60).stdout
    assert "cramfs.service" in removed and not config.exists()


def test_ready_only_once_usable_then_stopping(require, harness, daemon_command, tmp_path):
    require("root", "fuse")
    sockdir = tempfile.mkdtemp(prefix="cramfs-sd-")
    path = os.path.join(sockdir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    config = tmp_path / "cramfs.toml"
    config.write_text(CONFIG)
    mountpoint = tmp_path / "mnt"
    stderr = tmp_path / "cramfsd.stderr"
    try:
        with open(stderr, "wb") as err:
            proc = subprocess.Popen([daemon_command, "--config", str(config), "--mountpoint",
                                     str(mountpoint)], stdin=subprocess.DEVNULL, stdout=err,
                                    stderr=err, env={**os.environ, "NOTIFY_SOCKET": path})
        daemon = Daemon(proc, mountpoint, config, stderr, "", config_devices(CONFIG))
        harness.daemons.append(daemon)  # the harness unmounts and stops it whatever happens
        message = sock.recv(4096).decode()
        # At the moment READY=1 arrives, the mount must already answer.
        usable = os.path.ismount(mountpoint) and (mountpoint / "swap0" / "data").exists()
        assert "READY=1" in message.split("\n"), message
        assert usable, "READY=1 was sent before the mount was usable"
        proc.send_signal(signal.SIGTERM)
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("STOPPING=1" in m for m in seen):
            seen.append(sock.recv(4096).decode())
        assert any("STOPPING=1" in m.split("\n") for m in seen), seen
        assert proc.wait(timeout=30) == 0
        assert not os.path.ismount(mountpoint)
    finally:
        sock.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_sighup_applies_watermarks_and_refuses_pool_changes(require, start_daemon):
    require("root", "fuse")
    daemon = start_daemon(CONFIG)
    high = daemon.mountpoint / "swap0" / "watermark_high"
    capacity = daemon.mountpoint / "swap0" / "pool_capacity"
    assert high.read_text().strip() == "0.7"
    before = capacity.read_text()
    daemon.config_path.write_text(CONFIG.replace("high = 0.7", "high = 0.85")
                                  .replace('pool = "16M"', 'pool = "32M"'))
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while high.read_text().strip() != "0.85" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert high.read_text().strip() == "0.85"
    assert capacity.read_text() == before
    deadline = time.monotonic() + 10
    while "needs a restart" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "device.swap0.pool changed and needs a restart" in daemon.log()
    # A broken file changes nothing and the daemon keeps serving.
    daemon.config_path.write_text("this is not toml [")
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "nothing changed" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "nothing changed" in daemon.log()
    assert high.read_text().strip() == "0.85" and daemon.alive()


@pytest.mark.parametrize("unit", ["cramfs.service", "cramfs-swap@.service"])
def test_units_name_installed_paths(unit):
    text = (REPO / "systemd" / unit).read_text()
    assert "/usr/local/bin/" in text
