"""`cramfs replay TRACE`: run a recorded trace through the device model under other settings.

Wired into daemon/cli.py with two lines: ``replay_cli.add_parser(commands)`` beside the other
subcommands, and ``if args.command == "replay": return replay_cli.run(args)``. No mount and
no root: the replay is cramfs.replay on the trace file alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cramfs.replay import (
    ReplayError,
    Settings,
    as_json,
    check_plot_path,
    load_pyplot,
    parse_settings,
    plot,
    render_table,
    replay_all,
)
from cramfs.trace import TraceError

EPILOG = """\
Settable keys: the device's (pool, level, low, high, policy, failure_mode, huge_threshold,
zero_flush_interval, throttle_max_delay, no_alloc_on_full, compressor where this build has
it, ...) and zswap's max_pool_percent and accept_threshold_percent. Values as in the config
file: sizes with K/M/G/T, fractions, names. size cannot change (the trace's offsets are for
it). Example:
  cramfs replay swap0.trace --set pool=64M --set pool=64M,policy=throttle --plot pool.png
"""


def add_parser(subparsers: Any) -> None:
    """Add ``replay`` to the admin tool's subcommands."""
    parser = subparsers.add_parser(
        "replay", help="run a recorded trace through the device model under other settings",
        description="Replay a trace (cramfs trace start) through the device model: variant "
        "1 is the device as recorded, each --set adds one. No mount, no root.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path, help="a trace file")
    parser.add_argument("--set", dest="variants", action="append", default=[],
                        metavar="KEY=VALUE[,KEY=VALUE...]",
                        help="one more variant: the recorded device with these changes")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw pool use over trace time per variant (needs matplotlib)")
    parser.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                        help="variants run at once, in processes (default: one per CPU)")


def run(args: argparse.Namespace) -> int:
    """Exit 0, or 2 with one line on stderr for bad settings, a bad trace or a plot problem
    (no traceback)."""
    try:
        variants: list[Settings] = [{}] + [parse_settings(text) for text in args.variants]
        if args.jobs is not None and args.jobs < 1:
            raise ReplayError("--jobs: must be at least 1")
        if args.plot is not None:
            check_plot_path(args.plot)  # fail before the replay, not after it
            load_pyplot()
        results = replay_all(args.trace, variants, args.jobs)
        if args.plot is not None:
            plot(results, args.plot)
    except (ReplayError, TraceError) as exc:
        print(f"cramfs: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cramfs: {exc.filename or args.trace}: {exc.strerror}", file=sys.stderr)
        return 1
    trace = results[0]["trace"]
    if trace["truncated"] and args.json:
        print(f"cramfs: note: {args.trace} ends early (torn or not closed); replayed up to "
              "its last complete chunk", file=sys.stderr)
    for key in trace["unknown_settings"]:
        print(f"cramfs: note: the trace records {key!r}, which this cramfs does not know; "
              "replayed without it", file=sys.stderr)
    if args.json:
        json.dump(as_json(results), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (tests, and until daemon/cli.py carries the subcommand)."""
    parser = argparse.ArgumentParser(prog="cramfs")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
