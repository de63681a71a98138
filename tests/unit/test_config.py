"""daemon.config: the TOML configuration, and cramfsd's exit 2 on a bad one."""

from __future__ import annotations

from pathlib import Path

import pytest

from cramfs import PAGE_SIZE
from cramfs.watermarks import FailureMode, Policy
from daemon import config as configuration
from daemon import main as cramfsd
from daemon.config import DEFAULT_LEVEL, ConfigError, parse
from daemon.kinds import Settings, ZswapSettings

GOOD = """
mountpoint = "/run/test"
metrics_address = "127.0.0.1:9469"

[device.swap0]
kind = "swap"
size = "64M"
pool = "16M"
compressor = "zstd"
level = 3

[device.swap0.watermarks]
low = 0.5
high = 0.75
policy = "throttle"
failure_mode = "drop"
"""


def device(body: str = "", marks: str | None = None, name: str = "swap0",
           top: str = "") -> str:
    """A config with one device; ``body`` replaces the default device keys when given."""
    text = top + f"\n[device.{name}]\n"
    text += body if body else 'kind = "swap"\nsize = "64M"\npool = "16M"\n'
    if marks is not None:
        text += f"\n[device.{name}.watermarks]\n{marks}\n"
    return text


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


# -- what parses ------------------------------------------------------------------------

def test_embedded_default_parses():
    config = parse(configuration.default_text(), "embedded default")
    kinds = {spec.name: spec.kind for spec in config.devices}
    assert kinds == {"swap0": "swap", "node0": "node"}
    for spec in config.devices:
        assert spec.compressor == "zstd"
        assert spec.device.size >= spec.device.pool > 0
        assert spec.device.low < spec.device.high
    assert config.source == "embedded default"


def test_load_without_path_uses_embedded_default(monkeypatch, tmp_path):
    monkeypatch.setattr(configuration, "DEFAULT_PATH", tmp_path / "absent.toml")
    config = configuration.load(None)
    assert config.source == "embedded default"
    assert [spec.name for spec in config.devices] == ["swap0", "node0"]


def test_load_reads_the_default_path_when_present(monkeypatch, tmp_path):
    path = tmp_path / "cramfs.toml"
    path.write_text(GOOD)
    monkeypatch.setattr(configuration, "DEFAULT_PATH", path)
    assert configuration.load(None).source == str(path)


def test_full_config_values():
    config = parse(GOOD)
    assert str(config.mountpoint) == "/run/test"
    assert config.metrics_address == "127.0.0.1:9469"
    (spec,) = config.devices
    assert (spec.name, spec.kind, spec.compressor) == ("swap0", "swap", "zstd")
    dev = spec.device
    assert (dev.size, dev.pool, dev.level) == (64 << 20, 16 << 20, 3)
    assert (dev.low, dev.high) == (0.5, 0.75)
    assert dev.policy is Policy.THROTTLE
    assert dev.failure_mode is FailureMode.DROP


def test_defaults_for_optional_keys():
    config = parse(device())
    assert str(config.mountpoint) == "/run/cramfs"
    assert config.metrics_address == "127.0.0.1:9469"
    dev = config.devices[0].device
    assert (dev.level, dev.low, dev.high) == (DEFAULT_LEVEL, 0.80, 0.90)
    assert dev.policy is Policy.REJECT
    assert dev.failure_mode is FailureMode.POISON


def test_empty_metrics_address_turns_metrics_off():
    assert parse(device(top='metrics_address = ""')).metrics_address == ""


@pytest.mark.parametrize("size, expected", [("4096", 4096), ("4K", 4096), (8192, 8192),
                                            ("1G", 1 << 30), ("2T", 2 << 40)])
def test_sizes(size, expected):
    body = f'kind = "node"\nsize = {size!r}\npool = "4K"\n'.replace("'", '"')
    assert parse(device(body)).devices[0].device.size == expected


# -- what does not, and the message names the key ---------------------------------------

def test_unknown_top_level_key():
    assert error_of(device(top="mountpiont = '/x'")).startswith("mountpiont")


def test_unknown_device_key():
    body = 'kind = "swap"\nsize = "64M"\npool = "16M"\ncolour = "red"\n'
    assert error_of(device(body)).startswith("device.swap0.colour")


def test_zswap_keys_are_unknown_on_other_kinds():
    body = 'kind = "swap"\nsize = "64M"\npool = "16M"\nmax_pool_percent = 20\n'
    assert error_of(device(body)).startswith("device.swap0.max_pool_percent")


def test_unknown_watermarks_key():
    message = error_of(device(marks="low = 0.5\nmedium = 0.6\nhigh = 0.7"))
    assert message.startswith("device.swap0.watermarks.medium")


@pytest.mark.parametrize("key", ["size", "pool"])
@pytest.mark.parametrize("value", ['"1Q"', '"-1"', "-1", "0", '"0"', '"5000"', "5000",
                                   "true", "1.5", '""'])
def test_bad_size(key, value):
    values = {"size": '"64M"', "pool": '"16M"'}
    values[key] = value
    body = f'kind = "swap"\nsize = {values["size"]}\npool = {values["pool"]}\n'
    message = error_of(device(body))
    assert message.startswith(f"device.swap0.{key}:")


@pytest.mark.parametrize("key", ["size", "pool"])
def test_missing_size_or_pool(key):
    body = 'kind = "swap"\n' + ('pool = "16M"\n' if key == "size" else 'size = "64M"\n')
    assert error_of(device(body)) == f"device.swap0.{key}: required"


@pytest.mark.parametrize("kind", ['"zram"', '"SWAP"', "1"])
def test_bad_kind(kind):
    message = error_of(device(f'kind = {kind}\nsize = "64M"\npool = "16M"\n'))
    assert message.startswith("device.swap0.kind:")


def test_missing_kind():
    assert error_of(device('size = "64M"\npool = "16M"\n')).startswith("device.swap0.kind:")


ZSWAP = 'kind = "zswap"\nsize = "64M"\npool = "16M"\n'


def test_zswap_needs_a_backing_file():
    # Before zswap devices existed this was "device.swap0.kind: ... not available"; either
    # way the message names the key to fix.
    message = error_of(device(ZSWAP))
    assert message.startswith(("device.swap0.backing_file:", "device.swap0.kind:"))


def test_zswap_keys():
    body = ZSWAP + 'backing_file = "/var/tmp/z.img"\nmax_pool_percent = 30\n'
    try:
        spec = parse(device(body)).devices[0]
    except ConfigError as exc:  # a version without zswap devices
        assert str(exc).startswith("device.swap0.kind:")
        return
    assert spec.kind == "zswap"
    assert spec.settings == ZswapSettings(Path("/var/tmp/z.img"), 30, 90)


def test_other_kinds_have_no_zswap_keys():
    assert parse(device()).devices[0].settings == Settings()


@pytest.mark.parametrize("key, value", [("max_pool_percent", "0"), ("max_pool_percent", "101"),
                                        ("max_pool_percent", '"20"'),
                                        ("accept_threshold_percent", "-1"),
                                        ("accept_threshold_percent", "101"),
                                        ("backing_file", '""'), ("backing_file", "1")])
def test_bad_zswap_keys(key, value):
    keys = {"backing_file": '"/var/tmp/z.img"', key: value}
    body = ZSWAP + "".join(f"{k} = {v}\n" for k, v in keys.items())
    message = error_of(device(body))
    assert message.startswith((f"device.swap0.{key}:", "device.swap0.kind:"))


@pytest.mark.parametrize("compressor", ['"lzo-rle"', '"842"', '"ZSTD"', "1", '""'])
def test_unknown_compressor(compressor):
    body = f'kind = "swap"\nsize = "64M"\npool = "16M"\ncompressor = {compressor}\n'
    message = error_of(device(body))
    assert message.startswith("device.swap0.compressor:") and "lz4hc" in message


@pytest.mark.parametrize("compressor, level, expected", [
    ("lz4", None, 1), ("lz4", 4, 4), ("lz4hc", None, 9), ("lzo", None, None),
    ("deflate", 9, 9), ("zstd", None, DEFAULT_LEVEL)])
def test_zram_compressors_and_their_levels(compressor, level, expected):
    body = f'kind = "swap"\nsize = "64M"\npool = "16M"\ncompressor = "{compressor}"\n'
    if level is not None:
        body += f"level = {level}\n"
    spec = configuration.parse(device(body)).devices[0]
    assert (spec.compressor, spec.device.compressor, spec.device.level) == (
        compressor, compressor, expected)


@pytest.mark.parametrize("compressor, level", [("lzo", 1), ("lz4hc", 13), ("deflate", 0),
                                               ("lz4", 0)])
def test_bad_level_for_the_compressor(compressor, level):
    body = (f'kind = "swap"\nsize = "64M"\npool = "16M"\ncompressor = "{compressor}"\n'
            f"level = {level}\n")
    assert error_of(device(body)).startswith("device.swap0.level:")


@pytest.mark.parametrize("level", ["23", "-8", "1.0", '"1"', "true"])
def test_bad_level(level):
    body = f'kind = "swap"\nsize = "64M"\npool = "16M"\nlevel = {level}\n'
    assert error_of(device(body)).startswith("device.swap0.level:")


@pytest.mark.parametrize("marks", ["low = 0.9\nhigh = 0.9", "low = 0.95\nhigh = 0.9",
                                   "low = 0.95", "high = 0.5"])
def test_low_not_below_high(marks):
    message = error_of(device(marks=marks))
    assert message.startswith("device.swap0.watermarks:")
    assert "low" in message and "high" in message


@pytest.mark.parametrize("marks, key", [("low = -0.1", "low"), ("high = 1.5", "high"),
                                        ("low = 2\nhigh = 3", "low"),
                                        ('high = "0.9"', "high")])
def test_marks_out_of_range(marks, key):
    message = error_of(device(marks=marks))
    assert message.startswith("device.swap0.watermarks:")
    assert key in message


@pytest.mark.parametrize("policy", ['"drop"', '"Reject"', "1"])
def test_bad_policy(policy):
    message = error_of(device(marks=f"policy = {policy}"))
    assert message.startswith("device.swap0.watermarks.policy:")


@pytest.mark.parametrize("mode", ['"reject"', '"panic"', "0"])
def test_bad_failure_mode(mode):
    message = error_of(device(marks=f"failure_mode = {mode}"))
    assert message.startswith("device.swap0.watermarks.failure_mode:")


@pytest.mark.parametrize("address", ['"nonsense"', '"127.0.0.1"', '"host:65536"',
                                     '"host:port"', "9469", '"::1:9469"', '"[nothost]:9469"',
                                     '"127.0.0.1:"', '"host:+80"', '"host:٣"', '"a b:80"'])
def test_bad_metrics_address(address):
    message = error_of(device(top=f"metrics_address = {address}"))
    assert message.startswith("metrics_address:") and "\n" not in message


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:9469", ("127.0.0.1", 9469)), ("localhost:0", ("localhost", 0)),
    ("[::1]:9469", ("::1", 9469)), ("[::]:9469", ("::", 9469)),
    (":9469", ("0.0.0.0", 9469))])  # an empty host: every IPv4 interface
def test_metrics_address_forms(address, expected):
    assert parse(device(top=f'metrics_address = "{address}"')).metrics_address == address
    assert configuration.check_address(address, "metrics_address") == expected


def test_duplicate_device_tables_are_a_toml_error():
    text = device() + device(name="swap0")
    message = error_of(text)
    assert "not valid TOML" in message
    assert "swap0" in message


def test_invalid_toml():
    assert "not valid TOML" in error_of("device = [")


def test_device_that_is_not_a_table():
    assert error_of("[device]\nswap0 = 5\n").startswith("device.swap0: must be a table")


@pytest.mark.parametrize("text", ["device = 5", "", "[device]\n"])
def test_no_devices(text):
    assert error_of(text).startswith("device:")


def test_bad_device_name():
    assert error_of(device(name='"swap-0"')).startswith("device.swap-0:")


def test_watermarks_not_a_table():
    body = 'kind = "swap"\nsize = "64M"\npool = "16M"\nwatermarks = 0.9\n'
    assert error_of(device(body)).startswith("device.swap0.watermarks:")


@pytest.mark.parametrize("delay", ["-1", "61", '"1"', "true"])
def test_bad_throttle_max_delay(delay):
    message = error_of(device(marks=f"throttle_max_delay = {delay}"))
    assert message.startswith("device.swap0.watermarks.throttle_max_delay:")


@pytest.mark.parametrize("value", ["255", "4097", '"1K"'])
def test_bad_huge_threshold(value):
    body = f'kind = "swap"\nsize = "64M"\npool = "16M"\nhuge_threshold = {value}\n'
    assert error_of(device(body)).startswith("device.swap0.huge_threshold:")


@pytest.mark.parametrize("line, key", [("colour = 1", "colour"),
                                       ("read_latency = -1", "read_latency"),
                                       ("write_error_rate = 2", "write_error_rate"),
                                       ('read_bandwidth = "fast"', "read_bandwidth")])
def test_bad_timing(line, key):
    body = f'kind = "swap"\nsize = "64M"\npool = "16M"\n\n[device.swap0.timing]\n{line}\n'
    assert error_of(device(body)).startswith(f"device.swap0.timing.{key}:")


@pytest.mark.parametrize("table, line, key", [
    ("", "zero_flush_interval = 3601", "zero_flush_interval"),
    ("", 'zero_flush_interval = "1"', "zero_flush_interval"),
    ("timing", "write_latency = 61", "timing.write_latency"),
    ("timing", "read_error_rate = -0.5", "timing.read_error_rate"),
    ("timing", "seed = -1", "timing.seed"),
    ("interrupts", "drop_rate = 1.5", "interrupts.drop_rate"),
    ("interrupts", 'delay = "1s"', "interrupts.delay"),
    ("interrupts", "delay = 3601", "interrupts.delay"),
    ("interrupts", "seed = -1", "interrupts.seed"),
    ("timing", "seed = 9223372036854775808", "timing.seed"),
    ("interrupts", "seed = true", "interrupts.seed"),
    ("watermarks", "throttle_max_delay = -0.5", "watermarks.throttle_max_delay"),
    ("watermarks", "throttle_max_delay = 60.5", "watermarks.throttle_max_delay"),
    ("", "huge_threshold = 255", "huge_threshold"),
    ("", "huge_threshold = 4097", "huge_threshold")])
def test_ranges_are_the_devices_and_the_message_names_the_key(table, line, key):
    """config checks types; the object a value configures checks its range, and the config's
    message still names the one key and says the range once."""
    body = 'kind = "swap"\nsize = "64M"\npool = "16M"\n'
    body += f"\n[device.swap0.{table}]\n{line}\n" if table else f"{line}\n"
    message = error_of(device(body))
    assert message.startswith(f"device.swap0.{key}: ") and "\n" not in message
    name = key.rsplit(".", 1)[-1]
    assert name not in message.split(": ", 1)[1], message  # the key is not said twice


def test_values_in_range_reach_the_device():
    body = ('kind = "swap"\nsize = "64M"\npool = "16M"\nzero_flush_interval = 3600\n'
            "\n[device.swap0.timing]\nread_latency = 60\nwrite_error_rate = 1\n"
            "seed = 9223372036854775807\n"
            "\n[device.swap0.interrupts]\ndelay = 0.5\ndrop_rate = 1\nseed = 0\n"
            "\n[device.swap0.watermarks]\nthrottle_max_delay = 60\n")
    dev = parse(device(body)).devices[0].device
    assert dev.zero_flush_interval == 3600
    assert (dev.timing.read_latency, dev.timing.write_error_rate) == (60, 1)
    assert (dev.interrupts.delay, dev.interrupts.drop_rate) == (0.5, 1)
    assert (dev.timing.seed, dev.interrupts.seed) == (2**63 - 1, 0)
    assert dev.throttle_max_delay == 60


# -- a size the machine could never describe ----------------------------------------------

def size_body(size: str) -> str:
    return f'kind = "node"\nsize = "{size}"\npool = "4M"\n'


@pytest.mark.parametrize("size", ["8796093022208T", "9999999999999999999"])
def test_a_size_no_file_can_address_names_the_key(size):
    message = error_of(device(size_body(size)))
    assert message.startswith("device.swap0.size: ") and "address" in message
    assert str(2**63 - 1) in message


def test_a_size_past_the_devices_limit_names_the_key():
    message = error_of(device(size_body("16T")))
    assert message.startswith("device.swap0.size: ") and "16 TiB" in message


def test_a_size_whose_page_table_the_machine_cannot_hold_names_the_key(monkeypatch):
    """The fixed cost is asked of the page table (pagetable.fixed_bytes), never assumed:
    refused past a quarter of MemTotal, accepted at it."""
    from cramfs import pagetable

    fixed = pagetable.fixed_bytes((1 << 40) // PAGE_SIZE)  # what a 1 TiB device costs empty
    monkeypatch.setattr(configuration, "machine_memory",
                        lambda: fixed * configuration.MEMORY_SHARE - 1)
    message = error_of(device(size_body("1T")))
    assert message.startswith("device.swap0.size: '1T' needs ") and "\n" not in message
    assert "memory" in message
    monkeypatch.setattr(configuration, "machine_memory",
                        lambda: fixed * configuration.MEMORY_SHARE)
    assert parse(device(size_body("1T"))).devices[0].device.size == 1 << 40
    monkeypatch.setattr(configuration, "machine_memory", lambda: None)  # no /proc/meminfo
    assert parse(device(size_body("1T"))).devices[0].device.size == 1 << 40


def test_machine_memory_is_memtotal():
    with open("/proc/meminfo") as meminfo:
        first = meminfo.readline().split()
    assert first[0] == "MemTotal:"
    assert configuration.machine_memory() == int(first[1]) * 1024


def test_main_a_size_the_machine_cannot_describe_exits_2(monkeypatch, tmp_path, capsys):
    from cramfs import pagetable

    fixed = pagetable.fixed_bytes((1 << 40) // PAGE_SIZE)
    monkeypatch.setattr(configuration, "machine_memory",
                        lambda: fixed * configuration.MEMORY_SHARE - 1)

    def never(*args):
        raise AssertionError("cramfsd started serving a config it should refuse")

    monkeypatch.setattr(cramfsd.trio, "run", never)
    path = tmp_path / "big.toml"
    path.write_text(device(size_body("1T"), top=f'mountpoint = "{tmp_path / "mnt"}"'))
    assert cramfsd.main(["--config", str(path)]) == 2
    assert one_error_line(capsys).startswith("cramfsd: device.swap0.size: '1T' needs ")


@pytest.mark.parametrize("value", ['""', "1", '"run/cramfs"', '"./mnt"'])
def test_bad_mountpoint(value):
    assert error_of(device(top=f"mountpoint = {value}")).startswith("mountpoint:")


def test_load_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        configuration.load(path)


# -- cramfsd: exit 2 with one line ------------------------------------------------------

@pytest.fixture
def no_system_config(monkeypatch, tmp_path):
    """Keep a real /etc/cramfs/cramfs.toml out of the tests."""
    monkeypatch.setattr(configuration, "DEFAULT_PATH", tmp_path / "absent.toml")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cramfsd:")]
    assert len(lines) == 1, err
    return lines[0]


def test_main_bad_config_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(device(marks="low = 0.9\nhigh = 0.8"))
    assert cramfsd.main(["--config", str(path)]) == 2
    line = one_error_line(capsys)
    assert "device.swap0.watermarks" in line


def test_main_unknown_key_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(device(top="bogus = 1"))
    assert cramfsd.main(["--config", str(path)]) == 2
    assert "bogus" in one_error_line(capsys)


def test_main_missing_config_exits_2(tmp_path, capsys):
    path = tmp_path / "missing.toml"
    assert cramfsd.main(["--config", str(path)]) == 2
    assert "missing.toml" in one_error_line(capsys)


def test_main_bad_metrics_address_exits_2(no_system_config, capsys):
    assert cramfsd.main(["--metrics-address", "nonsense"]) == 2
    assert "--metrics-address" in one_error_line(capsys)


def test_main_bad_command_line_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cramfsd.main(["--log-level", "loud"])
    assert info.value.code == 2


def test_main_undecodable_config_exits_2(tmp_path, capsys):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe[device]\n")
    assert cramfsd.main(["--config", str(path)]) == 2
    assert "binary.toml" in one_error_line(capsys)


def test_main_config_is_a_directory_exits_2(tmp_path, capsys):
    assert cramfsd.main(["--config", str(tmp_path)]) == 2
    one_error_line(capsys)
