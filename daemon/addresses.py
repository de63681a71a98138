"""``HOST:PORT``, the one way cramfsd reads a listening address (``metrics_address`` and
``--metrics-address``; the metrics endpoint binds what this returns).

Forms, and what they mean:

- ``127.0.0.1:9469``, ``localhost:9469`` -- a host name or IPv4 address and a port;
- ``[::1]:9469`` -- an IPv6 address, in brackets (``::1:9469`` is refused: ambiguous);
- ``:9469`` -- an empty host: every IPv4 interface (``0.0.0.0``), as Prometheus's own
  ``--web.listen-address=":9090"`` means; write ``[::]:9469`` for IPv6 (and IPv4 where the
  host allows dual-stack sockets);
- port ``0`` -- any free port; the daemon logs the one it bound.

Names are not resolved here: that happens when the endpoint binds, and a name that does not
resolve fails then, still naming the key. The empty string means "no endpoint" and is the
caller's to handle before calling :func:`parse_address`.
"""

from __future__ import annotations

import ipaddress

ALL_INTERFACES = "0.0.0.0"


class AddressError(ValueError):
    """A malformed ``HOST:PORT``; the message is one line naming the key."""


def parse_address(text: str, key: str) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT``; ``key`` names the setting in the error message."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit() \
            or not 0 <= int(port_text) <= 65535:
        raise AddressError(f"{key}: {text!r} is not HOST:PORT with a port in 0..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{key}: {text!r}: {host!r} is not an IPv6 address") from None
        return host, int(port_text)
    if ":" in host or "[" in host or "]" in host:
        raise AddressError(f"{key}: {text!r}: write an IPv6 host in brackets, like [::1]:9469")
    if any(ch.isspace() for ch in host):
        raise AddressError(f"{key}: {text!r}: the host has white space in it")
    return host or ALL_INTERFACES, int(port_text)
