"""Recording a device's traffic into a trace file (cramfs.trace), for ``cramfs replay``.

The daemon records on its Trio thread, in the order the device saw each request, right where
the device answered (no await between the answer and the record, so the order is the
device's). A trace that fails (disk full, a write error in its background thread) is closed
and logged; it never fails the request it was recording.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
    if entry.mountpoint is not None and inside(path, entry.mountpoint):
        raise ValueError(f"the trace file {str(path)!r} is inside the daemon's own mount "
                         f"{str(entry.mountpoint)!r}")
    device = entry.device
    backing = getattr(device.backing, "path", None)
    try:
        entry.trace = start_trace(path, entry.name, entry.kind, device, device.codec.compressor,
                                  str(backing) if backing is not None else None)
    except TraceError as exc:
        raise ValueError(str(exc)) from None
    log.info("%s: recording to %s", entry.name, path)


def inside(path: Path, mountpoint: Path) -> bool:
    """Whether ``path`` (absolute) names something under ``mountpoint``, symlinks followed.

    Written for the daemon's own thread: it never touches anything under the mountpoint,
    since looking there would be a request the daemon itself must answer. Only components
    outside the mount are lstat'ed, to follow a symlink that could lead in."""
    mount = os.path.normpath(mountpoint)
    current = os.path.normpath(path)
    for _ in range(40):  # the kernel's own limit on symlinks in one lookup
        if _under(current, mount):
            return True
        for prefix in _prefixes(current):
            if _under(prefix, mount):
                return True
            if os.path.islink(prefix):
                rest = os.path.relpath(current, prefix)
                target = os.path.join(os.path.dirname(prefix), os.readlink(prefix))
                current = os.path.normpath(os.path.join(target, rest))
                break
        else:
            return False
    return True  # a symlink loop: refuse rather than guess


def _under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def _prefixes(path: str) -> list[str]:
    """"/a/b/c" -> ["/a", "/a/b", "/a/b/c"]."""
    parts = [part for part in path.split("/") if part]
    return ["/" + "/".join(parts[:n]) for n in range(1, len(parts) + 1)]


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
