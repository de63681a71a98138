"""daemon.cli: the `cramfs` admin tool against a fake mountpoint (a directory tree of
attribute files), with ismount and losetup stubbed out."""

from __future__ import annotations

import os

import pytest

from daemon import cli
from daemon import config as configuration
from daemon.cli import COLUMNS, CliError

MIB = 1 << 20


def make_device(root, name: str, kind: str = "swap", disksize: int = 1 << 30,
                pool: int = 1 << 30, mm: tuple[int, ...] = (0,) * 9,
                state: str = "ok", pressure: int = 0, policy: str = "throttle") -> None:
    path = root / name
    path.mkdir()
    mm_stat = tuple(mm) + (0,) * (9 - len(mm))
    files = {
        "kind": f"{kind}\n",
        "disksize": f"{disksize}\n",
        "pool_capacity": f"{pool}\n",
        "mm_stat": " ".join(f"{v:>8}" for v in mm_stat) + "\n",
        "watermark_state": f"{state}\n",
        "pressure": f"{pressure}\n",
        "write_policy": f"{policy}\n",
        "data": "",
    }
    for file, content in files.items():
        (path / file).write_text(content)


@pytest.fixture
def mounted(monkeypatch, tmp_path):
    """A fake mountpoint: ismount says yes, no loop devices attached."""
    root = tmp_path / "mnt"
    root.mkdir()
    monkeypatch.setattr(cli.os.path, "ismount", lambda path: True)
    monkeypatch.setattr(cli, "loops_of", lambda data: [])
    return root


def rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines()]


def test_status_table(mounted):
    make_device(mounted, "swap0", "swap", 1 << 30, 256 * MIB,
                mm=(8 * MIB, MIB, 2 * MIB, 256 * MIB, 2 * MIB), state="ok")
    make_device(mounted, "node0", "node", 512 * MIB, 64 * MIB,
                mm=(60 * MIB, 20 * MIB, 48 * MIB, 64 * MIB, 50 * MIB), state="pressure",
                pressure=1000)
    (mounted / "not_a_device").mkdir()  # no data file: skipped
    table = cli.status(mounted)
    assert table.endswith("\n")
    header, *body = rows(table)
    assert header == list(COLUMNS)
    assert len(body) == 2
    by_name = {row[0]: dict(zip(COLUMNS, row, strict=True)) for row in body}
    assert list(by_name) == ["node0", "swap0"]  # sorted
    swap0, node0 = by_name["swap0"], by_name["node0"]
    assert swap0["KIND"] == "swap"
    assert swap0["DISKSIZE"] == "1.0G"
    assert swap0["POOL"] == "256.0M"
    assert (swap0["DATA"], swap0["COMPR"], swap0["USED"]) == ("8.0M", "1.0M", "2.0M")
    assert swap0["RATIO"] == "4.00"
    assert (swap0["STATE"], swap0["PRESSURE"], swap0["LOOP"]) == ("ok", "0", "-")
    assert node0["RATIO"] == "1.25"
    assert (node0["STATE"], node0["PRESSURE"]) == ("pressure", "1000")


def test_status_columns_line_up(mounted):
    make_device(mounted, "a", mm=(8 * MIB, MIB, 2 * MIB))
    make_device(mounted, "long_device_name", mm=(4096, 100, 4096))
    lines = cli.status(mounted).splitlines()
    # RATIO is right-aligned: every line's RATIO column ends at the same position.
    ends = {line.index(value) + len(value)
            for line, value in zip(lines, ("RATIO", "4.00", "1.00"), strict=True)}
    assert len(ends) == 1


def test_status_empty_device_has_no_ratio(mounted):
    make_device(mounted, "swap0")
    (row,) = rows(cli.status(mounted))[1:]
    assert row[COLUMNS.index("RATIO")] == "-"
    assert row[COLUMNS.index("DATA")] == "0B"


def test_status_shows_loop_devices(mounted, monkeypatch):
    make_device(mounted, "swap0")
    monkeypatch.setattr(cli, "loops_of", lambda data: ["/dev/loop3", "/dev/loop4"])
    (row,) = rows(cli.status(mounted))[1:]
    assert row[-1] == "/dev/loop3,/dev/loop4"


def test_status_without_devices_is_just_the_header(mounted):
    assert rows(cli.status(mounted)) == [list(COLUMNS)]


def test_unmounted_mountpoint(tmp_path):
    with pytest.raises(CliError, match="is not mounted"):
        cli.status(tmp_path)
    with pytest.raises(CliError, match="is not mounted"):
        cli.device_dir(tmp_path, "swap0")


def test_missing_device_names_the_ones_there(mounted):
    make_device(mounted, "swap0")
    make_device(mounted, "node0")
    with pytest.raises(CliError) as info:
        cli.device_dir(mounted, "swap9")
    message = str(info.value)
    assert "'swap9'" in message
    assert "node0, swap0" in message


def test_missing_device_when_there_are_none(mounted):
    with pytest.raises(CliError, match=r"\(have: none\)"):
        cli.device_dir(mounted, "swap0")


def test_device_dir_found(mounted):
    make_device(mounted, "swap0")
    assert cli.device_dir(mounted, "swap0") == mounted / "swap0"


def test_swapoff_not_attached(mounted):
    make_device(mounted, "swap0")
    with pytest.raises(CliError, match="not attached"):
        cli.swapoff(mounted, "swap0")


def test_swapon_already_attached(mounted, monkeypatch):
    make_device(mounted, "swap0")
    monkeypatch.setattr(cli, "loops_of", lambda data: ["/dev/loop7"])
    with pytest.raises(CliError, match="already attached to /dev/loop7"):
        cli.swapon(mounted, "swap0", None)


def test_run_errors():
    with pytest.raises(CliError, match="not found"):
        cli._run("cramfs-no-such-program-xyz")
    with pytest.raises(CliError, match="^false: 1$"):
        cli._run("false")
    assert cli._run("echo", "hi") == "hi\n"


def test_default_mountpoint(monkeypatch, tmp_path):
    monkeypatch.setattr(configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    assert str(cli.default_mountpoint()) == "/run/cramfs"
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense = [")
    monkeypatch.setattr(configuration, "DEFAULT_PATH", bad)
    assert str(cli.default_mountpoint()) == "/run/cramfs"


# -- main: exit 1 with one "cramfs:" line ------------------------------------------------

def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("cramfs:")]


def test_main_status_unmounted(tmp_path, capsys):
    assert cli.main(["--mountpoint", str(tmp_path), "status"]) == 1
    (line,) = error_lines(capsys)
    assert "is not mounted" in line


@pytest.mark.parametrize("command", [["swapon", "nope"], ["swapoff", "nope"],
                                     ["watch", "nope", "--count", "1"]])
def test_main_missing_device(mounted, capsys, command):
    make_device(mounted, "swap0")
    assert cli.main(["--mountpoint", str(mounted), *command]) == 1
    (line,) = error_lines(capsys)
    assert "no device 'nope'" in line


def test_main_status(mounted, capsys):
    make_device(mounted, "swap0", mm=(8 * MIB, MIB, 2 * MIB))
    assert cli.main(["--mountpoint", str(mounted), "status"]) == 0
    out = capsys.readouterr().out
    assert rows(out)[0] == list(COLUMNS)
    assert rows(out)[1][0] == "swap0"


def test_main_watch_once(mounted, capsys):
    make_device(mounted, "swap0", state="pressure", pressure=420)
    assert cli.main(["--mountpoint", str(mounted), "watch", "swap0", "--count", "1"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split()[1:] == ["swap0", "pressure", "pressure=420"]


def test_main_needs_a_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_loops_of_parses_losetup(monkeypatch):
    out = ("/dev/loop0: []: (/run/cramfs/swap0/data)\n"
           "/dev/loop5: [0045]:3 (/run/cramfs/swap0/data)\n")
    monkeypatch.setattr(cli, "_run", lambda *command: out)
    assert cli.loops_of(os.devnull) == ["/dev/loop0", "/dev/loop5"]


# -- swapon and discard -------------------------------------------------------------------

@pytest.fixture
def commands(monkeypatch):
    """Record the commands swapon runs; losetup --find answers /dev/loop9."""
    ran: list[tuple[str, ...]] = []

    def run(*command: str) -> str:
        ran.append(command)
        return "/dev/loop9\n" if command[:2] == ("losetup", "--find") else ""

    monkeypatch.setattr(cli, "_run", run)
    return ran


@pytest.mark.parametrize("support, advertised, flag, expect", [
    ("1", True, True, True), ("1", True, False, False), ("0", True, True, False),
    ("1", False, True, False)])
def test_swapon_discards_when_the_daemon_and_the_loop_can(mounted, commands, monkeypatch,
                                                          support, advertised, flag, expect):
    make_device(mounted, "swap0")
    (mounted / "swap0" / "discard_support").write_text(support + "\n")
    monkeypatch.setattr(cli, "loop_discards", lambda loop: advertised)
    notes: list[str] = []
    assert cli.swapon(mounted, "swap0", 5, discard=flag, notes=notes) == "/dev/loop9"
    swapon = [c for c in commands if c[0] == "swapon"][0]
    assert swapon == ("swapon", "-p", "5") + (("--discard=pages",) if expect else ()) + (
        "/dev/loop9",)
    assert bool(notes) == (flag and not expect)


def test_main_swapon_no_discard_and_notes(mounted, commands, monkeypatch, capsys):
    make_device(mounted, "swap0")  # an old daemon: no discard_support file
    assert cli.main(["--mountpoint", str(mounted), "swapon", "swap0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "/dev/loop9\n"
    assert "discard unavailable" in captured.err
    commands.clear()
    assert cli.main(["--mountpoint", str(mounted), "swapon", "swap0", "--no-discard"]) == 0
    assert capsys.readouterr().err == ""
    assert ("swapon", "/dev/loop9") in commands


def test_loop_discards_reads_the_queue_limit(monkeypatch, tmp_path):
    assert cli.loop_discards("/dev/no-such-loop") is False


@pytest.mark.parametrize("pool, policy, hazard", [
    (1 << 30, "throttle", None), (1 << 30, "none", None), (1 << 30, "reject", "reject"),
    (256 * MIB, "throttle", "smaller than its size"), (256 * MIB, "none", "pages are lost")])
def test_swapon_on_a_device_that_can_refuse_needs_force(mounted, commands, pool, policy,
                                                        hazard):
    make_device(mounted, "swap0", pool=pool, policy=policy)
    (mounted / "swap0" / "discard_support").write_text("0\n")
    if hazard is None:
        assert cli.swapon(mounted, "swap0", None) == "/dev/loop9"
        return
    with pytest.raises(CliError, match=hazard) as info:
        cli.swapon(mounted, "swap0", None)
    assert "--force" in str(info.value) and "retries a refused swap-out forever" in str(
        info.value)
    assert commands == []  # nothing attached
    assert cli.swapon(mounted, "swap0", None, force=True) == "/dev/loop9"


def test_main_swapon_explains_and_exits_1_without_force(mounted, commands, capsys):
    make_device(mounted, "node0", "node", 512 * MIB, 16 * MIB, policy="reject")
    assert cli.main(["--mountpoint", str(mounted), "swapon", "node0"]) == 1
    (line,) = error_lines(capsys)
    assert "can wedge the host" in line
    assert cli.main(["--mountpoint", str(mounted), "swapon", "node0", "--force"]) == 0


def test_swap_hazard_with_unreadable_sizes_judges_the_policy_alone(mounted):
    make_device(mounted, "swap0", policy="reject")
    (mounted / "swap0" / "disksize").write_text("garbage\n")
    hazard = cli.swap_hazard(mounted / "swap0")
    assert hazard is not None and "'reject'" in hazard and "smaller" not in hazard
    (mounted / "swap0" / "write_policy").write_text("throttle\n")
    assert cli.swap_hazard(mounted / "swap0") is None


def test_swapon_detaches_the_loop_when_mkswap_fails(mounted, monkeypatch):
    make_device(mounted, "swap0")
    (mounted / "swap0" / "discard_support").write_text("0\n")

    def run(*command: str) -> str:
        if command[0] == "mkswap":
            raise CliError("mkswap: failed")
        return "/dev/loop9\n"

    detached: list[list[str]] = []
    monkeypatch.setattr(cli, "_run", run)
    monkeypatch.setattr(cli.subprocess, "run",
                        lambda command, **kwargs: detached.append(command))
    with pytest.raises(CliError, match="mkswap: failed"):
        cli.swapon(mounted, "swap0", None)
    assert detached == [["losetup", "-d", "/dev/loop9"]]


def test_swapoff_turns_off_active_swap_then_detaches(mounted, monkeypatch):
    make_device(mounted, "swap0")
    monkeypatch.setattr(cli, "loops_of", lambda data: ["/dev/loop8", "/dev/loop9"])
    ran: list[tuple[str, ...]] = []
    monkeypatch.setattr(cli, "_run", lambda *command: ran.append(command) or "")
    real_read_text = cli.Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) == "/proc/swaps":  # only loop9 is swapped on
            return "Filename Type Size Used Priority\n/dev/loop9 partition 1024 0 -2\n"
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(cli.Path, "read_text", read_text)
    assert cli.swapoff(mounted, "swap0") == ["/dev/loop8", "/dev/loop9"]
    assert ran == [("losetup", "-d", "/dev/loop8"), ("swapoff", "/dev/loop9"),
                   ("losetup", "-d", "/dev/loop9")]


# -- trace --------------------------------------------------------------------------------

def test_trace_start_and_stop_write_the_control_file(mounted, tmp_path, monkeypatch, capsys):
    make_device(mounted, "swap0")
    control = mounted / "swap0" / "trace"
    control.write_text("off\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--mountpoint", str(mounted), "trace", "start", "swap0", "t.trace"]) == 0
    assert control.read_text() == f"start {tmp_path / 't.trace'}"  # made absolute
    assert capsys.readouterr().out == f"start {tmp_path / 't.trace'}\n"
    assert cli.trace(mounted, "swap0", "stop", None) == "stop"
    assert control.read_text() == "stop"


def test_trace_refusals(mounted, tmp_path, monkeypatch):
    make_device(mounted, "swap0")
    with pytest.raises(CliError, match="cannot record traces"):
        cli.trace(mounted, "swap0", "stop", None)
    control = mounted / "swap0" / "trace"
    control.write_text(f"recording {tmp_path}/a.trace\n")
    with pytest.raises(CliError, match="is not a directory"):
        cli.trace(mounted, "swap0", "start", tmp_path / "no" / "t.trace")
    with pytest.raises(CliError, match="already recording .*cramfs trace stop swap0 first"):
        cli.trace(mounted, "swap0", "start", tmp_path / "t.trace")
    control.write_text("off\n")
    real_write_text = cli.Path.write_text

    def refuse(self, *args, **kwargs):
        if self == control:
            raise OSError(22, "Invalid argument")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(cli.Path, "write_text", refuse)
    with pytest.raises(CliError, match=r"the daemon refused 'stop' \(Invalid argument\)"):
        cli.trace(mounted, "swap0", "stop", None)


def test_main_trace_error_exits_1(mounted, capsys):
    make_device(mounted, "swap0")
    assert cli.main(["--mountpoint", str(mounted), "trace", "stop", "swap0"]) == 1
    (line,) = error_lines(capsys)
    assert "cannot record traces" in line


# -- watch --------------------------------------------------------------------------------

def test_watch_prints_a_line_per_wake_up(mounted, capsys):
    make_device(mounted, "swap0", state="pressure", pressure=420)
    cli.watch(mounted, "swap0", 2)  # a regular file polls readable at once
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.endswith("swap0 pressure pressure=420")
                                   for line in lines)


def test_main_interrupted_watch_exits_130(mounted, monkeypatch):
    make_device(mounted, "swap0")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "watch", interrupted)
    assert cli.main(["--mountpoint", str(mounted), "watch", "swap0"]) == 130


# -- the subcommands of other modules -----------------------------------------------------

@pytest.mark.parametrize("argv, module", [(["estimate", "--file", "/x"], "estimate_cli"),
                                          (["replay", "/x.trace"], "replay_cli")])
def test_main_hands_estimate_and_replay_to_their_modules(monkeypatch, argv, module):
    seen: list[object] = []
    monkeypatch.setattr(getattr(cli, module), "run", lambda args: seen.append(args) or 7)
    assert cli.main(argv) == 7
    assert len(seen) == 1 and seen[0].command == argv[0]


# -- install-units / uninstall-units ------------------------------------------------------

def test_install_and_uninstall_units_under_a_root(tmp_path, capsys):
    root = tmp_path / "root"
    assert cli.main(["install-units", "--root", str(root), "--bindir", "/opt/bin",
                     "--no-link"]) == 0
    printed = capsys.readouterr().out.split()
    units = root / "etc/systemd/system"
    config = root / "etc/cramfs/cramfs.toml"
    assert printed == [str(units / "cramfs.service"), str(units / "cramfs-swap@.service"),
                       str(config)]
    service = (units / "cramfs.service").read_text()
    assert "/opt/bin/cramfsd" in service and "/usr/local/bin/" not in service
    assert configuration.load(config).devices  # the example config is a valid one
    config.write_text(config.read_text() + "# mine\n")  # an edited config is kept
    assert cli.install_units(root, cli.Path("/opt/bin"), False) == [
        units / "cramfs.service", units / "cramfs-swap@.service"]
    assert cli.main(["uninstall-units", "--root", str(root), "--bindir", "/opt/bin"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == [
        f"removed {units / 'cramfs.service'}", f"removed {units / 'cramfs-swap@.service'}"]
    assert not (units / "cramfs.service").exists() and config.exists()
    config.write_text((cli._unit_sources() / "cramfs.toml").read_text())  # as shipped
    assert cli.uninstall_units(root, cli.Path("/opt/bin")) == [config]


def test_install_units_links_the_installed_binaries(tmp_path, monkeypatch):
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    for name in ("cramfsd", "cramfs"):
        (bindir / name).write_text("#!/bin/sh\n")
    monkeypatch.setattr(cli.sys, "argv", [str(bindir / "cramfs")])
    root = tmp_path / "root"
    target = root / "usr/local/bin"
    target.mkdir(parents=True)
    (target / "cramfs").symlink_to("/nowhere")  # a stale link is replaced
    written = cli.install_units(root, cli.DEFAULT_BINDIR, True)
    assert written[-2:] == [target / "cramfsd", target / "cramfs"]
    assert (target / "cramfs").resolve() == bindir / "cramfs"
    (target / "other").write_text("a real binary\n")
    removed = cli.uninstall_units(root, cli.DEFAULT_BINDIR)
    assert target / "cramfsd" in removed and target / "cramfs" in removed
    assert (target / "other").exists()


def test_install_units_outside_an_installation_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.sys, "argv", [str(tmp_path / "cramfs")])  # no cramfsd beside it
    assert cli.main(["install-units", "--root", str(tmp_path / "root")]) == 1
    (line,) = error_lines(capsys)
    assert "cramfsd not found: run the installed `cramfs`" in line


def test_units_missing_from_the_tree(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "daemon" / "cli.py"))
    with pytest.raises(CliError, match="unit files not found"):
        cli._unit_sources()
    assert cli.main(["install-units", "--root", str(tmp_path / "root")]) == 1
    assert "unit files not found" in error_lines(capsys)[0]
    assert cli.uninstall_units(tmp_path / "root", cli.DEFAULT_BINDIR) == []
