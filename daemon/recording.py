"""Recording a device's traffic into a trace file (cramfs.trace), for ``cramfs replay``.

The daemon records on its Trio thread, in the order the device saw each request, right where
the device answered (no await between the answer and the record, so the order is the
device's). A trace that fails (disk full, a write error in its background thread) is closed
and logged; it never fails the request it was recording.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from cramfs.errors import DeviceError, InjectedFault
from cramfs.trace import STATUS_OK, TraceError, start_trace, status_of
from daemon.devices import DeviceEntry

log = logging.getLogger("cramfs.trace")


def start(entry: DeviceEntry, path: Path) -> None:
    """Begin recording ``entry`` into ``path`` (absolute). ValueError (EINVAL at the file)
    when it is already recording or the file cannot be created."""
    if entry.trace is not None:
        raise ValueError(f"{entry.name} is already recording to {entry.trace.path}")
    if not path.is_absolute():
        raise ValueError(f"the trace file must be an absolute path, got {str(path)!r}")
    device = entry.device
    backing = getattr(device.backing, "path", None)
    try:
        entry.trace = start_trace(path, entry.name, entry.kind, device, device.codec.compressor,
                                  str(backing) if backing is not None else None)
    except TraceError as exc:
        raise ValueError(str(exc)) from None
    log.info("%s: recording to %s", entry.name, path)


def stop(entry: DeviceEntry) -> None:
    """Stop recording (nothing to do when not recording)."""
    trace, entry.trace = entry.trace, None
    if trace is None:
        return
    try:
        trace.close()
    except TraceError as exc:
        log.error("%s: the trace ended with an error: %s", entry.name, exc)
        return
    log.info("%s: trace written to %s", entry.name, trace.path)


def _failed(entry: DeviceEntry, exc: TraceError) -> None:
    log.error("%s: recording stopped: %s", entry.name, exc)
    trace, entry.trace = entry.trace, None
    if trace is not None:
        with contextlib.suppress(TraceError):  # already failing: the first error was logged
            trace.close()


def request(entry: DeviceEntry, op: str, offset: int, data: Any, exc: BaseException | None
            ) -> None:
    """One request the device answered (``exc`` None) or refused. ``data`` is the written
    bytes for a write, the length for a read or a discard. An injected fault never reached
    the device: it is recorded as an event."""
    trace = entry.trace
    if trace is None:
        return
    try:
        t = trace.now()
        if exc is None:
            status = STATUS_OK
        elif isinstance(exc, InjectedFault):
            trace.event(t, "fault", op=op)
            return
        elif isinstance(exc, DeviceError):
            status = status_of(exc)
        else:
            return  # not the device's answer (a bug's traceback): nothing to replay
        if op == "write":
            trace.write(t, offset, data, status)
        elif op == "read":
            trace.read(t, offset, data, status)
        else:
            trace.discard(t, offset, data, status)
    except TraceError as error:
        _failed(entry, error)


def event(entry: DeviceEntry, kind: str, **fields: Any) -> None:
    """A change of device state outside requests: a flush, a writeback batch, compaction,
    a tunable set by an attribute file or SIGHUP."""
    trace = entry.trace
    if trace is None:
        return
    try:
        trace.event(trace.now(), kind, **fields)
    except TraceError as error:
        _failed(entry, error)
