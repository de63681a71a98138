"""``cramfs estimate``: what a process's memory (or a file) would cost in zram, per compressor.

Wired into daemon/cli.py with ``estimate_cli.add_parser(commands)`` and, for
``args.command == "estimate"``, ``return estimate_cli.run(args)``. The work is
cramfs.estimate's; this module parses, reports and turns failures into one line and an exit
status: 2 for a bad command line, 1 for input that cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from cramfs import PAGE_SIZE
from cramfs.compressors import CompressorUnavailable, parse_spec
from cramfs.estimate import EstimateError, Progress, Report, estimate_file, estimate_pids
from cramfs.sizes import format_size_approx

USAGE_ERROR = 2
RUNTIME_ERROR = 1
# Show a progress bar (on a terminal) only when there is this much to scan.
PROGRESS_MIN_BYTES = 64 << 20
COLUMNS = ("COMPRESSOR", "COMPRESSED", "POOL", "HUGE", "RATIO", "COMP MB/s", "DECOMP MB/s")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``estimate`` to the admin tool's subcommands."""
    parser = subparsers.add_parser(
        "estimate", help="what a process's memory or a file would cost in zram, per compressor",
        description="Compress the private memory of live processes (root) or a file's pages "
        "with zram's compressors and report zram's compr_data_size, this project's pool "
        "usage and the speed of each compressor here.")
    parser.add_argument("--pid", action="extend", nargs="+", default=[], metavar="PID",
                        help="processes to read (several: one set of pages)")
    parser.add_argument("--file", metavar="PATH", help="a file to read as pages")
    parser.add_argument("--compressor", action="append", default=[], metavar="NAME[:LEVEL]",
                        help="zstd, lz4, lz4hc, lzo or deflate, optionally with a level; "
                        "repeat for several (default: all at zram's default levels)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


class UsageError(Exception):
    pass


def _pids(texts: list[str]) -> list[int]:
    pids = []
    for text in texts:
        try:
            pid = int(text)
        except ValueError:
            raise UsageError(f"--pid: not a process id: {text!r}") from None
        if pid <= 0:
            raise UsageError(f"--pid: not a process id: {text!r}")
        pids.append(pid)
    return pids


def _specs(texts: list[str]) -> list[tuple[str, int | None]] | None:
    try:
        return [parse_spec(text) for text in texts] or None
    except ValueError as exc:
        raise UsageError(f"--compressor: {exc}") from None


def _check(args: argparse.Namespace) -> None:
    if bool(args.pid) == (args.file is not None):
        raise UsageError("estimate: give either --pid PID... or --file PATH")


def run(args: argparse.Namespace) -> int:
    """Run ``cramfs estimate``; the exit status."""
    try:
        _check(args)
        specs = _specs(args.compressor)
        pids = _pids(args.pid)
    except UsageError as exc:
        return _fail(str(exc), USAGE_ERROR)
    bar = ProgressBar(sys.stderr)
    try:
        if pids:
            report = estimate_pids(pids, specs, bar.update)
        else:
            report = estimate_file(args.file, specs, bar.update)
    except (EstimateError, CompressorUnavailable) as exc:
        bar.clear()
        return _fail(str(exc), RUNTIME_ERROR)
    except KeyboardInterrupt:
        bar.clear()
        return 130
    bar.clear()
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        sys.stdout.write(format_table(report))
    return 0


def _fail(message: str, status: int) -> int:
    print(f"cramfs: {message}", file=sys.stderr)
    return status


class ProgressBar:
    """``\\r``-redrawn progress on a terminal stderr, for a large input; silent otherwise."""

    def __init__(self, stream: TextIO, interval: float = 0.2) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.interval = interval
        self.last = 0.0
        self.shown = False

    @property
    def update(self) -> Progress:
        return self._update

    def _update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or total < PROGRESS_MIN_BYTES or now - self.last < self.interval:
            return
        self.last = now
        width = 30
        filled = width * done // total
        self.stream.write(f"\rcramfs estimate: [{'#' * filled}{'.' * (width - filled)}] "
                          f"{100 * done // total:3d}% of {format_size_approx(total)}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def _sources(report: Report) -> str:
    parts = []
    for source in report.sources:
        if "pid" in source:
            parts.append(f"pid {source['pid']} ({source['name']})")
        else:
            parts.append(str(source["file"]))
    return ", ".join(parts)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: Report) -> str:
    """The report for people: a summary line, then one row per compressor."""
    head = (f"{_sources(report)}: {report.pages} pages "
            f"({format_size_approx(report.pages * PAGE_SIZE)}), {report.zero_pages} zero, "
            f"{report.same_pages} same-filled")
    if report.unreadable_bytes:
        head += f", {format_size_approx(report.unreadable_bytes)} unreadable"
    rows: list[tuple[str, ...]] = [COLUMNS]
    for r in report.results:
        rows.append((r.spec, format_size_approx(r.compressed_bytes),
                     format_size_approx(r.pool_bytes), str(r.huge_pages), _number(r.ratio, 2),
                     _number(r.compress_mb_s, 1), _number(r.decompress_mb_s, 1)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [" ".join(value.ljust(width) if i == 0 else value.rjust(width)
                      for i, (value, width) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    foot = ("ratio: all pages read / pool bytes; MB/s: one core, 10^6 bytes of the pages that "
            "reach the compressor")
    return "\n".join([head, *lines, foot]) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m daemon.estimate_cli estimate ...``: the subcommand without the rest of the
    admin tool (tests, and until daemon/cli.py wires it in)."""
    parser = argparse.ArgumentParser(prog="cramfs")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
