"""daemon.main and daemon.system: the command line, the mountpoint, reload, sd_notify (no
mount, no root)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
import trio

from cramfs.interrupts import InterruptConfig
from cramfs.timing import TimingConfig
from cramfs.watermarks import FailureMode, Policy
from cramfs.zswap import ZswapDevice
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


def test_sd_notify_never_blocks_on_a_supervisor_that_stops_reading(notify_socket):
    """The kernel queues a few datagrams per socket; past that a blocking send would freeze
    the daemon. Each send returns at once, the overflow reported as not sent."""
    started = time.monotonic()
    sent = [system.sd_notify(f"STATUS=reload {n}") for n in range(200)]
    assert time.monotonic() - started < 5
    assert sent[0] is True and sent[-1] is False
    assert notify_socket.recv(4096) == b"STATUS=reload 0"


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


# -- the command line and the metrics address --------------------------------------------

def test_parse_args_makes_paths_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = cramfsd.parse_args(["--config", "cramfs.toml", "--mountpoint", "mnt"])
    assert args.config == tmp_path / "cramfs.toml"
    assert args.mountpoint == tmp_path / "mnt"


def test_build_metrics_address_goes_through_the_one_parser(monkeypatch, tmp_path):
    """--metrics-address is read as the config's metrics_address is: ":9469" is every IPv4
    interface on both, and the key named in a message is the one that set it."""
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    config = cramfsd.build(cramfsd.parse_args(["--metrics-address", ":9469"]))
    assert (config.metrics_address, config.metrics_key) == (":9469", "--metrics-address")
    config = cramfsd.build(cramfsd.parse_args([]))
    assert config.metrics_key == "metrics_address"
    for bad in ("::1:9469", "[x]:1", "host:65536"):
        with pytest.raises(cramfsd.UsageError, match="^--metrics-address: "):
            cramfsd.build(cramfsd.parse_args(["--metrics-address", bad]))


def test_start_metrics_bind_failure_names_the_key(monkeypatch, tmp_path):
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        args = cramfsd.parse_args(["--metrics-address", address])
        daemon = cramfsd.Daemon(cramfsd.build(args), args)
        try:
            with pytest.raises(cramfsd.UsageError) as info:
                daemon.start_metrics()
        finally:
            daemon.close()
    assert str(info.value).startswith(f"--metrics-address: cannot serve metrics on {address}")


# -- the mountpoint ------------------------------------------------------------------------

@pytest.mark.parametrize("path, why", [
    ("/etc/passwd/x", "/etc/passwd is not a directory"),
    ("/etc/passwd/x/y", "/etc/passwd is not a directory"),
    ("/etc/passwd", "is not a directory"),
    ("/proc/cramfs", "proc file system"),
    ("/proc/self/cramfs", "proc file system"),
    ("/proc", "proc file system"),
    ("/sys/x", "sysfs file system"),
    ("/sys/fs/cramfs/x", "file system"),
])
def test_prepare_mountpoint_refuses(path, why):
    with pytest.raises(cramfsd.UsageError) as info:
        cramfsd.prepare_mountpoint(Path(path), "mountpoint")
    message = str(info.value)
    assert message.startswith(f"mountpoint: {path}: ") and why in message
    assert "\n" not in message


def test_prepare_mountpoint_refuses_a_path_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(cramfsd.UsageError, match="file is not a directory"):
        cramfsd.prepare_mountpoint(tmp_path / "file" / "mnt", "--mountpoint")


def test_prepare_mountpoint_creates_the_missing_directories(tmp_path):
    path = tmp_path / "a" / "b" / "mnt"
    cramfsd.prepare_mountpoint(path, "mountpoint")
    assert path.is_dir()
    cramfsd.prepare_mountpoint(path, "mountpoint")  # an existing directory is fine


def test_prepare_mountpoint_turns_os_errors_into_a_usage_error(monkeypatch, tmp_path):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(cramfsd.UsageError, match=r"^--mountpoint: .*: Permission denied$"):
        cramfsd.prepare_mountpoint(tmp_path / "mnt", "--mountpoint")


def test_filesystem_type_picks_the_longest_mount():
    table = ("22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"
             "23 22 0:22 / /proc rw - proc proc rw\n"
             "24 22 0:23 / /run rw - tmpfs tmpfs rw\n"
             "25 24 0:24 / /run/my\\040dir rw - sysfs sysfs rw\n")
    assert system.filesystem_type(Path("/proc/x"), table) == "proc"
    assert system.filesystem_type(Path("/processes"), table) == "ext4"
    assert system.filesystem_type(Path("/run/cramfs"), table) == "tmpfs"
    assert system.filesystem_type(Path("/run/my dir/x"), table) == "sysfs"


@pytest.mark.parametrize("where, key", [("file", "mountpoint"), ("command line", "--mountpoint")])
@pytest.mark.parametrize("path", ["/etc/passwd/x", "/proc/cramfs", "/sys/x"])
def test_main_bad_mountpoint_exits_2_naming_the_key(monkeypatch, tmp_path, capsys, where, key,
                                                   path):
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    locked = []
    monkeypatch.setattr(cramfsd.system, "lock_memory", lambda: locked.append(True))
    if where == "file":
        config = tmp_path / "cramfs.toml"
        config.write_text(f'mountpoint = "{path}"\nmetrics_address = ""\n' + SWAP)
        argv = ["--config", str(config)]
    else:
        argv = ["--mountpoint", path, "--metrics-address", ""]
    assert cramfsd.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("cramfsd:")]
    assert len(lines) == 1 and lines[0].startswith(f"cramfsd: {key}: {path}: "), lines
    assert locked == []  # refused before the daemon locked itself in memory


async def test_a_failed_mount_is_a_usage_error_naming_the_key(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # run() changes to /; monkeypatch changes back
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")

    def fail(*args):
        raise RuntimeError("fuse_session_mount failed")

    monkeypatch.setattr(cramfsd.pyfuse3, "init", fail)
    args = cramfsd.parse_args(["--mountpoint", str(tmp_path / "mnt"), "--metrics-address", ""])
    daemon = cramfsd.Daemon(cramfsd.build(args), args)
    try:
        with pytest.raises(cramfsd.UsageError, match="^--mountpoint: .*cannot mount"):
            await daemon.run()
    finally:
        daemon.close()


# -- SIGHUP reload -------------------------------------------------------------------------

SWAP = """
[device.swap0]
kind = "swap"
size = "16M"
pool = "4M"
"""


def devices_toml(backing: Path, *, swap: str = "", swap_marks: str = "", node_marks: str = "",
                 zswap: str = "", zswap_marks: str = "", top: str = "", extra: str = "") -> str:
    """Three small devices, one per kind, with the given extra keys."""
    return f"""{top}
metrics_address = ""

[device.swap0]
kind = "swap"
size = "16M"
pool = "4M"
{swap}
[device.swap0.watermarks]
{swap_marks}

[device.node0]
kind = "node"
size = "32M"
pool = "4M"

[device.node0.watermarks]
low = 0.5
high = 0.75
{node_marks}

[device.zswap0]
kind = "zswap"
size = "16M"
pool = "4M"
backing_file = "{backing}"
{zswap}
[device.zswap0.watermarks]
{zswap_marks}
{extra}"""


@pytest.fixture
def reloadable(monkeypatch, tmp_path):
    """A Daemon (not mounted) on a config file; yields (daemon, path of the file, backing)."""
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    path = tmp_path / "cramfs.toml"
    backing = tmp_path / "zswap0.img"
    path.write_text(devices_toml(backing))
    args = cramfsd.parse_args(["--config", str(path), "--mountpoint", str(tmp_path / "mnt")])
    daemon = cramfsd.Daemon(cramfsd.build(args), args)
    try:
        yield daemon, path, backing
    finally:
        daemon.close()


def devices(daemon):
    return {entry.name: entry.device for entry in daemon.entries}


def test_reload_applies_the_runtime_keys_at_once(reloadable, caplog):
    daemon, path, backing = reloadable
    before = devices(daemon)
    path.write_text(devices_toml(
        backing,
        swap_marks='low = 0.6\nhigh = 0.7\npolicy = "none"\nfailure_mode = "drop"\n'
                   "throttle_max_delay = 0.5\nno_alloc_on_full = true",
        swap="\n[device.swap0.timing]\nread_latency = 0.001\nwrite_bandwidth = \"1M\"\n"
             "\n[device.swap0.interrupts]\ndelay = 0.25\ndrop_rate = 0.5\nseed = 3\n",
        node_marks='policy = "throttle"',
        zswap="max_pool_percent = 40\naccept_threshold_percent = 50\n"))
    with caplog.at_level(logging.INFO, logger="cramfs"):
        assert daemon.reload() is True
    now = devices(daemon)
    assert now == before  # the same device objects: nothing was rebuilt
    swap0 = now["swap0"]
    assert (swap0.watermarks.low, swap0.watermarks.high) == (0.6, 0.7)
    assert swap0.policy is Policy.NONE
    assert swap0.failure_mode is FailureMode.DROP
    assert swap0.throttle_max_delay == 0.5
    assert swap0.no_alloc_on_full is True
    assert swap0.timing.config == TimingConfig(read_latency=0.001, write_bandwidth=1 << 20)
    assert swap0.timing.active
    assert swap0.interrupts.config == InterruptConfig(delay=0.25, drop_rate=0.5, seed=3)
    assert now["node0"].policy is Policy.THROTTLE
    zswap0 = now["zswap0"]
    assert isinstance(zswap0, ZswapDevice)
    assert (zswap0.max_pool_percent, zswap0.accept_threshold_percent) == (40, 50)
    # the running config remembers what was applied, so the next reload compares with it
    spec = {s.name: s for s in daemon.config.devices}
    assert spec["swap0"].device.low == 0.6 and spec["zswap0"].settings.max_pool_percent == 40
    assert "need a restart" in caplog.text and "restart; keeping" not in caplog.text
    assert cramfsd.reload_plan(daemon.config, cramfsd.build(daemon.args)) == ([], [])


def test_reload_logs_restart_keys_and_leaves_them_alone(reloadable, caplog, tmp_path):
    daemon, path, backing = reloadable
    swap0 = devices(daemon)["swap0"]
    path.write_text(devices_toml(
        tmp_path / "other.img", top=f'mountpoint = "{tmp_path / "elsewhere"}"',
        swap='level = 3\nhuge_threshold = 3000\nzero_flush_interval = 1.0\n',
        extra='\n[device.extra0]\nkind = "swap"\nsize = "8M"\npool = "4M"\n'
    ).replace('size = "16M"\npool = "4M"', 'size = "32M"\npool = "8M"', 1)
     .replace('metrics_address = ""', 'metrics_address = "127.0.0.1:9470"'))
    daemon.args = cramfsd.Options(config=path)  # no command-line overrides this time
    with caplog.at_level(logging.WARNING, logger="cramfs"):
        assert daemon.reload() is True
    warned = caplog.text
    for key in ("mountpoint", "metrics_address", "device.swap0.size", "device.swap0.pool",
                "device.swap0.level", "device.swap0.huge_threshold",
                "device.swap0.zero_flush_interval", "device.zswap0.backing_file",
                "device.extra0 (added)"):
        assert f"reload: {key} " in warned, key
    assert devices(daemon)["swap0"] is swap0
    assert (swap0.size, swap0.pool.capacity, swap0.codec.level) == (16 << 20, 4 << 20, -1)
    assert swap0.zero_flush_interval == 0
    assert [e.name for e in daemon.entries] == ["swap0", "node0", "zswap0"]
    spec = {s.name: s for s in daemon.config.devices}
    assert spec["swap0"].device.size == 16 << 20  # the running value is kept
    assert daemon.config.mountpoint == tmp_path / "mnt"


def test_reload_plan_kind_change_and_removal():
    old = cramfsd.configuration.parse(SWAP + '\n[device.node0]\nkind = "node"\nsize = "8M"\n'
                                      'pool = "4M"\n')
    new = cramfsd.configuration.parse(SWAP.replace('"swap"', '"node"'))
    changes, restart = cramfsd.reload_plan(old, new)
    assert changes == []
    assert sorted(restart) == ["device.node0 (removed)", "device.swap0.kind"]


@pytest.mark.parametrize("broken", ["device = [", "[device.swap0]\nkind = \"swap\"\n",
                                    'bogus = 1\n[device.swap0]\nkind = "swap"\nsize = "1M"\n'
                                    'pool = "1M"\n', None])
def test_reload_of_a_broken_file_changes_nothing(reloadable, caplog, broken):
    daemon, path, backing = reloadable
    swap0 = devices(daemon)["swap0"]
    state = (swap0.watermarks.low, swap0.watermarks.high, swap0.policy, swap0.failure_mode)
    if broken is None:  # parses, but one device is wrong: nothing of the others applies
        path.write_text(devices_toml(backing, swap_marks="low = 0.1\nhigh = 0.2",
                                     node_marks="low = 0.9"))
    else:
        path.write_text(broken)
    with caplog.at_level(logging.ERROR, logger="cramfs"):
        assert daemon.reload() is False
    assert "nothing changed" in caplog.text
    assert (swap0.watermarks.low, swap0.watermarks.high, swap0.policy,
            swap0.failure_mode) == state
    assert {s.name: s.device.low for s in daemon.config.devices}["swap0"] == state[0]


def test_reload_of_a_missing_file_changes_nothing(reloadable, caplog):
    daemon, path, _ = reloadable
    path.unlink()
    with caplog.at_level(logging.ERROR, logger="cramfs"):
        assert daemon.reload() is False
    assert "No such file" in caplog.text and "nothing changed" in caplog.text


@pytest.mark.parametrize("policy", ["reject", "throttle", "none"])
def test_reload_never_makes_a_zswap_device_refuse(reloadable, caplog, policy):
    daemon, path, backing = reloadable
    zswap0 = devices(daemon)["zswap0"]
    assert zswap0.policy is Policy.NONE
    path.write_text(devices_toml(backing, zswap_marks=f'policy = "{policy}"'))
    with caplog.at_level(logging.WARNING, logger="cramfs"):
        assert daemon.reload() is True
    assert zswap0.policy is Policy.NONE
    # the file's default for zswap0 is already "reject": no change; "none" is what it has
    assert ("never refuses" in caplog.text) is (policy == "throttle")


def test_reload_with_a_relative_config_after_the_daemon_left_its_directory(monkeypatch,
                                                                         tmp_path):
    """cramfsd changes to / before it mounts; --config cramfs.toml must still reload."""
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    monkeypatch.chdir(tmp_path)
    Path("cramfs.toml").write_text('metrics_address = ""\n' + SWAP)
    args = cramfsd.parse_args(["--config", "cramfs.toml", "--mountpoint", "mnt"])
    daemon = cramfsd.Daemon(cramfsd.build(args), args)
    try:
        os.chdir("/")  # what run() does
        (tmp_path / "cramfs.toml").write_text(
            'metrics_address = ""\n' + SWAP + "\n[device.swap0.watermarks]\nlow = 0.4\n"
            "high = 0.6\n")
        assert daemon.reload() is True
        assert daemon.entries[0].device.watermarks.high == 0.6
        assert daemon.config.mountpoint == tmp_path / "mnt"
    finally:
        daemon.close()


# -- the allocator -------------------------------------------------------------------------

class FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_tune_allocator_fixes_the_thresholds_and_the_arenas(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(system, "_libc", fake)
    assert system.tune_allocator() is True
    assert dict(fake.calls) == {system.M_MMAP_THRESHOLD: 128 << 10,
                                system.M_TRIM_THRESHOLD: 128 << 10, system.M_ARENA_MAX: 2}
    assert (system.M_TRIM_THRESHOLD, system.M_MMAP_THRESHOLD, system.M_ARENA_MAX) == (-1, -3, -8)


def test_tune_allocator_without_glibc_warns_and_goes_on(monkeypatch, caplog):
    monkeypatch.setattr(system, "_libc", FakeLibc(answer=0))
    with caplog.at_level(logging.WARNING, logger="cramfs.system"):
        assert system.tune_allocator() is False
    assert "mallopt refused" in caplog.text
    monkeypatch.setattr(system, "_libc", object())
    assert system.tune_allocator() is False


def test_the_allocator_is_tuned_before_the_metrics_thread_starts(monkeypatch, tmp_path):
    """main(): validate, tune the allocator, then start threads, then lock memory."""
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    order: list[str] = []
    monkeypatch.setattr(cramfsd.Daemon, "prepare", lambda self: order.append("prepare"))
    monkeypatch.setattr(cramfsd.system, "tune_allocator", lambda: order.append("tune"))
    monkeypatch.setattr(cramfsd.Daemon, "start_metrics", lambda self: order.append("metrics"))
    monkeypatch.setattr(cramfsd.system, "set_io_flusher", lambda: order.append("flusher"))
    monkeypatch.setattr(cramfsd.system, "lock_memory", lambda: order.append("lock"))

    def run(fn):
        order.append("run")

    monkeypatch.setattr(cramfsd.trio, "run", run)
    assert cramfsd.main(["--metrics-address", ""]) == 0
    assert order == ["prepare", "tune", "metrics", "flusher", "lock", "run"]


# -- the mountpoint, the devices and the metrics: what exits 2 and what starts ---------------

def test_prepare_mountpoint_refuses_a_relative_path():
    with pytest.raises(cramfsd.UsageError, match="^mountpoint: mnt: must be an absolute path$"):
        cramfsd.prepare_mountpoint(Path("mnt"), "mountpoint")


def test_prepare_mountpoint_names_a_stat_error(monkeypatch, tmp_path):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "stat", refuse)
    with pytest.raises(cramfsd.UsageError, match=r"^mountpoint: .*/mnt: .*: Permission denied$"):
        cramfsd.prepare_mountpoint(tmp_path / "mnt", "mountpoint")


def test_prepare_mountpoint_a_file_appearing_meanwhile_is_not_a_directory(monkeypatch,
                                                                         tmp_path):
    def exists(self, *args, **kwargs):
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(Path, "mkdir", exists)
    with pytest.raises(cramfsd.UsageError, match="exists and is not a directory$"):
        cramfsd.prepare_mountpoint(tmp_path / "mnt", "mountpoint")


def test_a_backing_file_that_cannot_be_created_exits_2_naming_the_key(monkeypatch, tmp_path,
                                                                     capsys):
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    path = tmp_path / "cramfs.toml"
    path.write_text(devices_toml(tmp_path / "missing" / "zswap0.img"))
    assert cramfsd.main(["--config", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cramfsd:")]
    assert len(err) == 1 and err[0].startswith("cramfsd: device.zswap0.backing_file: "), err


def test_a_trace_that_cannot_start_is_a_usage_error_naming_the_key(monkeypatch, tmp_path):
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    path = tmp_path / "cramfs.toml"
    path.write_text('metrics_address = ""\n' + SWAP + f'trace = "{tmp_path}/no/dir/t.trace"\n')
    with pytest.raises(cramfsd.UsageError, match="^device.swap0.trace: "):
        cramfsd.Daemon(cramfsd.build(cramfsd.parse_args(["--config", str(path)])))


def test_a_trace_from_start_records_until_close(monkeypatch, tmp_path):
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    path = tmp_path / "cramfs.toml"
    path.write_text('metrics_address = ""\n' + SWAP + f'trace = "{tmp_path}/t.trace"\n')
    daemon = cramfsd.Daemon(cramfsd.build(cramfsd.parse_args(["--config", str(path)])))
    try:
        assert daemon.entries[0].trace is not None
    finally:
        daemon.close()
    assert daemon.entries[0].trace is None and (tmp_path / "t.trace").stat().st_size > 0


def test_reload_plan_a_changed_trace_needs_the_trace_command():
    old = cramfsd.configuration.parse(SWAP)
    new = cramfsd.configuration.parse(SWAP + 'trace = "/var/tmp/t.trace"\n')
    assert cramfsd.reload_plan(old, new) == (
        [], ["device.swap0.trace (use cramfs trace start/stop)"])


def test_start_metrics_serves_and_close_stops_it(monkeypatch, tmp_path):
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    off = cramfsd.Daemon(cramfsd.build(cramfsd.parse_args(["--metrics-address", ""])))
    off.start_metrics()
    assert off.metrics is None
    off.close()
    args = cramfsd.parse_args(["--metrics-address", "127.0.0.1:0"])
    daemon = cramfsd.Daemon(cramfsd.build(args), args)
    try:
        daemon.start_metrics()
        assert daemon.metrics is not None and daemon.metrics.address is not None
        assert daemon.ops.observe == daemon.metrics.observe
        host, port = daemon.metrics.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        assert b'cramfs_device_size_bytes{device="swap0"}' in reply
    finally:
        daemon.close()
    assert daemon.metrics.address is None  # closed: the endpoint is gone


@pytest.mark.parametrize("error, code", [(cramfsd.UsageError("mountpoint: busy"), 2),
                                         (RuntimeError("fuse loop failed"), 1)])
def test_main_exit_code_when_the_serving_loop_fails(monkeypatch, tmp_path, capsys, error, code):
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    monkeypatch.setattr(cramfsd.system, "set_io_flusher", lambda: None)
    monkeypatch.setattr(cramfsd.system, "lock_memory", lambda: None)
    closed: list[bool] = []
    monkeypatch.setattr(cramfsd.Daemon, "close", lambda self: closed.append(True))

    def run(fn):
        raise error

    monkeypatch.setattr(cramfsd.trio, "run", run)
    argv = ["--mountpoint", str(tmp_path / "mnt"), "--metrics-address", ""]
    assert cramfsd.main(argv) == code
    assert closed == [True]
    assert ("cramfsd: mountpoint: busy" in capsys.readouterr().err) is (code == 2)


# -- the serving loop, with pyfuse3 and the signals stood in for --------------------------

class FakeSignals:
    """trio.open_signal_receiver's stand-in: delivers ``signums`` once the daemon is ready
    and ``settled()`` says its background work has run."""

    def __init__(self, ready: trio.Event, settled, signums: list[int]) -> None:
        self.ready = ready
        self.settled = settled
        self.signums = signums

    def __call__(self, *signums: int) -> FakeSignals:
        assert set(signums) == {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
        return self

    def __enter__(self) -> FakeSignals:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __aiter__(self) -> FakeSignals:
        return self

    async def __anext__(self) -> int:
        await self.ready.wait()
        while not self.settled():
            await trio.sleep(0.005)
        if not self.signums:
            await trio.sleep_forever()
        return self.signums.pop(0)


async def test_run_serves_reloads_on_sighup_and_stops_on_sigterm(monkeypatch, tmp_path,
                                                                caplog):
    """run(): mount, announce READY once a stat through the mount answers, start each
    device's background work, reload on SIGHUP, stop on SIGTERM, unmount."""
    monkeypatch.chdir(tmp_path)  # run() changes to /
    monkeypatch.setattr(cramfsd.configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    mountpoint = tmp_path / "mnt"
    (mountpoint / "swap0").mkdir(parents=True)
    (mountpoint / "swap0" / "data").write_bytes(b"")  # what the mount would show
    path = tmp_path / "cramfs.toml"
    path.write_text(devices_toml(tmp_path / "zswap0.img", swap="zero_flush_interval = 0.01"))
    args = cramfsd.parse_args(["--config", str(path), "--mountpoint", str(mountpoint)])
    daemon = cramfsd.Daemon(cramfsd.build(args), args)
    swap0 = daemon.entries[0].device
    swap0.write(0, os.urandom(4096))
    swap0.write(0, bytes(4096))  # released: its pool space waits for the zero flush
    assert swap0.releasing_bytes > 0

    notified: list[str] = []
    calls: list[str] = []
    ready, stopped = trio.Event(), trio.Event()
    shrinking: list[str] = []

    def notify(text: str) -> bool:
        notified.append(text)
        if text.startswith("READY=1\nSTATUS="):
            ready.set()
        return True

    async def shrink(entry) -> None:
        shrinking.append(entry.name)
        await trio.sleep_forever()

    async def serve(min_tasks: int, max_tasks: int) -> None:
        calls.append(f"main {min_tasks} {max_tasks}")
        await stopped.wait()

    zswap_kind = cramfsd.kinds.REGISTRY["zswap"]
    monkeypatch.setitem(cramfsd.kinds.REGISTRY, "zswap",
                        cramfsd.kinds.Kind("zswap", zswap_kind.doc, zswap_kind.device_class,
                                           zswap_kind.settings, zswap_kind.files, shrink))
    monkeypatch.setattr(cramfsd.pyfuse3, "init",
                        lambda ops, where, options: calls.append(f"init {where}"))
    monkeypatch.setattr(cramfsd.pyfuse3, "main", serve)
    monkeypatch.setattr(cramfsd.pyfuse3, "terminate", stopped.set)
    monkeypatch.setattr(cramfsd.pyfuse3, "close",
                        lambda unmount: calls.append(f"close unmount={unmount}"))
    monkeypatch.setattr(cramfsd.system, "sd_notify", notify)
    monkeypatch.setattr(cramfsd.system, "tune_fuse_connection",
                        lambda dev, background: calls.append(f"tune {background}"))
    monkeypatch.setattr(cramfsd, "discard_supported", lambda: False)
    monkeypatch.setattr(cramfsd.trio, "open_signal_receiver",
                        FakeSignals(ready, lambda: shrinking and not swap0.releasing_bytes,
                                    [signal.SIGHUP, signal.SIGTERM]))
    path.write_text(devices_toml(tmp_path / "zswap0.img", swap="zero_flush_interval = 0.01",
                                 swap_marks="low = 0.3\nhigh = 0.4"))
    try:
        with caplog.at_level(logging.INFO, logger="cramfs"), trio.fail_after(10):
            await daemon.run()
    finally:
        daemon.close()
    assert calls == [f"init {mountpoint}", "main 4 64", f"tune {cramfsd.MAX_BACKGROUND}",
                     "close unmount=True"]
    assert notified[0] == "READY=1\nSTATUS=serving swap0, node0, zswap0"
    assert notified[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert notified[2:] == ["READY=1", "STOPPING=1"]
    assert (swap0.watermarks.low, swap0.watermarks.high) == (0.3, 0.4)  # SIGHUP reloaded
    assert daemon.stop_requested
    assert shrinking == ["zswap0"]  # the zswap kind's background work, for zswap0 alone
    assert swap0.releasing_bytes == 0  # the zero flusher ran
    assert "discard" in caplog.text and f"unmounted {mountpoint}" in caplog.text
    assert "mounted" in caplog.text and "zswap0 (zswap)" in caplog.text
