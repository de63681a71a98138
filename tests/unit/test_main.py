"""daemon.system.sd_notify and daemon.main's service plumbing (no mount, no root)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import uuid

import pytest

from daemon import main as cramfsd
from daemon import system


@pytest.fixture
def notify_socket(monkeypatch, tmp_path):
    """A datagram socket standing in for systemd's notification socket."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_sd_notify_sends_ready(notify_socket):
    assert system.sd_notify("READY=1") is True
    assert notify_socket.recv(4096) == b"READY=1"


def test_sd_notify_multiline(notify_socket):
    assert system.sd_notify("READY=1\nSTATUS=serving swap0")
    assert notify_socket.recv(4096).split(b"\n") == [b"READY=1", b"STATUS=serving swap0"]


def test_sd_notify_abstract_socket(monkeypatch):
    name = f"cramfs-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert system.sd_notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_sd_notify_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert system.sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert system.sd_notify("READY=1") is False


def test_sd_notify_to_a_missing_socket_fails_softly(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert system.sd_notify("READY=1") is False


@pytest.fixture
def basic_config(monkeypatch):
    """Record logging.basicConfig's arguments instead of touching the root logger."""
    calls: list[dict] = []
    monkeypatch.setattr(cramfsd.logging, "basicConfig", lambda **kwargs: calls.append(kwargs))
    return calls


def test_setup_logging_under_journal_has_no_timestamp(monkeypatch, basic_config):
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    cramfsd.setup_logging("warning")
    (kwargs,) = basic_config
    assert "asctime" not in kwargs["format"]
    assert "%(message)s" in kwargs["format"]
    assert kwargs["level"] == "WARNING"


def test_setup_logging_with_invocation_id_has_no_timestamp(monkeypatch, basic_config):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
    cramfsd.setup_logging("info")
    assert "asctime" not in basic_config[0]["format"]


def test_setup_logging_elsewhere_has_timestamp(monkeypatch, basic_config):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    cramfsd.setup_logging("debug")
    (kwargs,) = basic_config
    assert "%(asctime)s" in kwargs["format"]
    assert kwargs["level"] == "DEBUG"
    assert logging.getLevelName(kwargs["level"]) == logging.DEBUG


def test_parse_args_defaults():
    args = cramfsd.parse_args([])
    assert args.config is None and args.mountpoint is None and args.metrics_address is None
    assert args.log_level == "info"


def test_build_overrides(monkeypatch, tmp_path):
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    args = cramfsd.parse_args(["--mountpoint", str(tmp_path / "m"), "--metrics-address", ""])
    config = cramfsd.build(args)
    assert config.mountpoint == tmp_path / "m"
    assert config.metrics_address == ""
    args = cramfsd.parse_args(["--metrics-address", "[::1]:9000"])
    assert cramfsd.build(args).metrics_address == "[::1]:9000"


def test_build_bad_address_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    with pytest.raises(cramfsd.UsageError, match="--metrics-address"):
        cramfsd.build(cramfsd.parse_args(["--metrics-address", "nonsense"]))


async def test_daemon_stop_waits_for_open_data_files(monkeypatch, tmp_path):
    """SIGTERM with a data file open does not terminate; releasing the last one does."""
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    config = cramfsd.build(cramfsd.parse_args(["--metrics-address", ""]))
    daemon = cramfsd.Daemon(config)
    terminated = []
    monkeypatch.setattr(cramfsd.pyfuse3, "terminate", lambda: terminated.append(True))

    try:
        ops = daemon.ops
        swap0 = (await ops.lookup(cramfsd.pyfuse3.ROOT_INODE, b"swap0")).st_ino
        data = (await ops.lookup(swap0, b"data")).st_ino
        fh = (await ops.open(data, os.O_RDWR, None)).fh
        daemon.request_stop(signal.SIGTERM)
        assert terminated == []
        await ops.release(fh)
        assert terminated == [True]
    finally:
        daemon.close()


def test_daemon_stop_when_idle(monkeypatch, tmp_path):
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    daemon = cramfsd.Daemon(cramfsd.build(cramfsd.parse_args(["--metrics-address", ""])))
    terminated = []
    monkeypatch.setattr(cramfsd.pyfuse3, "terminate", lambda: terminated.append(True))
    try:
        daemon.request_stop(signal.SIGINT)
        assert terminated == [True]
        assert daemon.stop_requested
    finally:
        daemon.close()
