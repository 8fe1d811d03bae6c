"""Readiness for a service manager: systemd's notify protocol, without libsystemd.

A unit with `Type=notify` starts its process with `NOTIFY_SOCKET` set to a Unix datagram
socket (a path, or `@name` for the abstract namespace); the process sends newline-separated
`KEY=VALUE` lines to it. edgert sends `READY=1` once every pack is loaded and the socket
is bound, `STOPPING=1` when a stop begins, and a `STATUS=` line with each. Outside systemd
(no `NOTIFY_SOCKET`) every call is a no-op, so `edgert serve` behaves the same anywhere.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)
ENV = "NOTIFY_SOCKET"


def _address(raw: str) -> str | None:
    if raw.startswith("@"):
        return "\0" + raw[1:]            # abstract namespace (Linux)
    if raw.startswith("/"):
        return raw
    return None                          # e.g. vsock addresses: not for a device service


def notify(**fields: str) -> bool:
    """Send `fields` (e.g. `READY="1", STATUS="..."`) to the service manager.

    True when sent; False when not under a notify-type unit or when sending failed (logged:
    a readiness message that cannot be delivered must not stop the service itself)."""
    raw = os.environ.get(ENV)
    if not raw:
        return False
    addr = _address(raw)
    if addr is None:
        log.warning("%s=%r is not a Unix socket address; readiness not sent", ENV, raw)
        return False
    msg = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(msg.encode())
    except OSError as e:
        log.warning("could not notify the service manager at %s: %s", raw, e)
        return False
    return True
