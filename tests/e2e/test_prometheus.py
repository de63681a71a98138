"""A real Prometheus server scrapes cramfs and sees what the device reports in mm_stat.

Two sources, same checks: the mounted daemon (root, /dev/fuse), and ``Metrics.start()`` served
in-process over a device written directly (no root), so the Prometheus round trip is tested on
any machine that has the ``prometheus`` package. promtool checks the live scrape too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cramfs import PAGE_SIZE
from cramfs.device import CompressedDevice, DeviceConfig
from daemon.devices import DeviceEntry
from daemon.metrics import Metrics

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
MM_STAT_FIELDS = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit",
                  "mem_used_max", "same_pages", "pages_compacted", "huge_pages",
                  "huge_pages_since")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return reply.read()


def payload(pages: int) -> bytes:
    """Text pages (compress ~10:1), a few same-filled and incompressible ones; deterministic."""
    line = b"cramfs page %06d: the quick brown fox jumps over the lazy dog\n"
    text = b"".join(line % i for i in range(pages * PAGE_SIZE // len(line) + 1))
    text = bytearray(text[:pages * PAGE_SIZE])
    text[:2 * PAGE_SIZE] = b"\x5a" * (2 * PAGE_SIZE)  # same-filled
    text[-PAGE_SIZE:] = os.urandom(PAGE_SIZE)  # huge
    return bytes(text)


class Prometheus:
    """/usr/bin/prometheus scraping one target every second, in a temporary directory."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.workdir = workdir
        self.target = target
        self.address = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "prometheus.log"

    def start(self, timeout: float = 60) -> None:
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: cramfs\n"
            "    static_configs:\n"
            f"      - targets: ['{self.target}']\n")
        (self.workdir / "data").mkdir(exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["/usr/bin/prometheus", f"--config.file={config}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address={self.address}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            with contextlib.suppress(OSError):
                if b"Ready" in http_get(f"http://{self.address}/-/ready", timeout=2):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait(timeout=30)

    def query(self, expr: str) -> list[dict]:
        url = f"http://{self.address}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        reply = json.loads(http_get(url))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def wait_for(self, expr: str, expected: Callable[[float], bool], timeout: float = 30
                 ) -> float:
        """Poll ``expr`` (one series) until ``expected(value)``; returns the value."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            result = self.query(expr)
            if len(result) == 1:
                last = float(result[0]["value"][1])
                if expected(last):
                    return last
            if time.monotonic() > deadline:
                targets = http_get(f"http://{self.address}/api/v1/targets").decode()[:2000]
                raise AssertionError(f"{expr}: last result {result!r} (value {last}) after "
                                     f"{timeout}s; targets: {targets}")
            time.sleep(0.5)


@pytest.fixture
def prometheus(require, tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    require("prometheus", "promtool")
    servers: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        workdir = tmp_path / f"prometheus{len(servers)}"
        workdir.mkdir()
        server = Prometheus(workdir, target)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def check_scrape_with_promtool(address: str) -> None:
    body = http_get(f"http://{address}/metrics")
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout and not result.stderr, result


def check_against_mm_stat(prom: Prometheus, device: str, mm: dict[str, int]) -> None:
    sel = f'{{job="cramfs",device="{device}"}}'
    prom.wait_for('up{job="cramfs"}', lambda v: v == 1)
    pages = mm["orig_data_size"] // PAGE_SIZE
    assert pages > 0
    assert prom.wait_for(f"cramfs_stored_pages{sel}", lambda v: v == pages) == pages
    ratio = mm["compr_data_size"] / (mm["orig_data_size"] - mm["same_pages"] * PAGE_SIZE)
    got = prom.wait_for(f"cramfs_compression_ratio{sel}",
                        lambda v: v == pytest.approx(ratio, rel=1e-9))
    assert 0 < got < 1
    for metric, field in (("cramfs_compressed_bytes", "compr_data_size"),
                          ("cramfs_original_bytes", "orig_data_size"),
                          ("cramfs_pool_used_bytes", "mem_used_total"),
                          ("cramfs_pool_capacity_bytes", "mem_limit"),
                          ("cramfs_same_pages", "same_pages"),
                          ("cramfs_huge_pages", "huge_pages")):
        [series] = prom.query(f"{metric}{sel}")
        assert float(series["value"][1]) == mm[field], (metric, series, mm)
    # the one-hot state and the gauge histogram survive the round trip
    states = {s["metric"]["state"]: float(s["value"][1])
              for s in prom.query(f"cramfs_watermark_state{sel}")}
    assert states == {"ok": 1.0, "pressure": 0.0, "full": 0.0}
    [objects] = prom.query(f"cramfs_stored_object_bytes_gcount{sel}")
    assert float(objects["value"][1]) == pages - mm["same_pages"]
    [info] = prom.query(f"cramfs_device_info{sel}")
    assert info["metric"]["kind"]


def check_dashboard_queries(prom: Prometheus) -> None:
    """Every PromQL expression of the Grafana dashboard parses and returns data."""
    dashboard = json.loads((ROOT / "dashboards" / "cramfs.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    assert exprs
    for expr in exprs:
        expr = expr.replace("$device", ".*").replace("$__rate_interval", "1m")
        result = prom.query(expr)  # asserts status "success": the expression parses
        if "rate(" not in expr and "increase(" not in expr:  # those need two scrapes
            assert result, expr


# -- in-process: Metrics.start() over a device written directly -----------------------------
def test_prometheus_scrapes_metrics_served_in_process(prometheus):
    device = CompressedDevice(DeviceConfig(size=64 * MiB, pool=16 * MiB, threads=1))
    metrics = Metrics(lambda: [DeviceEntry("swap0", "swap", device)])
    try:
        data = payload(64)
        device.write(0, data)
        assert device.read(0, len(data)) == data
        metrics.observe("swap0", "write", 0.0004)
        metrics.start("127.0.0.1:0")
        check_scrape_with_promtool(metrics.address)
        prom = prometheus(metrics.address)
        mm = dict(zip(MM_STAT_FIELDS, device.mm_stat(), strict=True))
        check_against_mm_stat(prom, "swap0", mm)
        sel = '{job="cramfs",device="swap0"}'
        [written] = prom.query(f'cramfs_io_bytes_total{{op="write",{sel[1:-1]}}}')
        assert float(written["value"][1]) == len(data)
        [count] = prom.query(f'cramfs_request_duration_seconds_count{{op="write",{sel[1:-1]}}}')
        assert float(count["value"][1]) == 1

        check_dashboard_queries(prom)

        # the next scrape follows the device
        device.write(MiB, payload(8)[2 * PAGE_SIZE:])
        pages = device.pages_stored
        prom.wait_for(f"cramfs_stored_pages{sel}", lambda v: v == pages)
    finally:
        metrics.close()
        device.close()


# -- the mounted daemon ---------------------------------------------------------------------
CONFIG = """
mountpoint = "/run/cramfs-unused"
metrics_address = ""

[device.swap0]
kind = "swap"
size = "64M"
pool = "16M"

[device.node0]
kind = "node"
size = "32M"
pool = "4M"
"""


def read_mm_stat(mountpoint: Path, device: str) -> dict[str, int]:
    fields = (mountpoint / device / "mm_stat").read_text().split()
    return dict(zip(MM_STAT_FIELDS, map(int, fields), strict=True))


def test_prometheus_scrapes_the_mounted_daemon(prometheus, start_daemon):
    address = f"127.0.0.1:{free_port()}"
    daemon = start_daemon(CONFIG, metrics_address=address)
    data = payload(64)
    fd = os.open(daemon.mountpoint / "swap0" / "data", os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 0) == len(data)
        os.fsync(fd)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    mm = read_mm_stat(daemon.mountpoint, "swap0")
    assert mm["orig_data_size"] == len(data)

    check_scrape_with_promtool(address)
    prom = prometheus(address)
    check_against_mm_stat(prom, "swap0", mm)
    kinds = {s["metric"]["device"]: s["metric"]["kind"]
             for s in prom.query('cramfs_device_info{job="cramfs"}')}
    assert kinds == {"swap0": "swap", "node0": "node"}
    [written] = prom.query('cramfs_io_bytes_total{job="cramfs",device="swap0",op="write"}')
    assert float(written["value"][1]) >= len(data)
    # the FUSE handlers record latency for every request
    [count] = prom.query(
        'cramfs_request_duration_seconds_count{job="cramfs",device="swap0",op="write"}')
    assert float(count["value"][1]) >= 1
    # an untouched device is there with zeros
    assert prom.wait_for('cramfs_stored_pages{job="cramfs",device="node0"}',
                         lambda v: v == 0) == 0
    assert daemon.stop() == 0
