"""Where the device service listens: the default endpoint and the checks on a chosen one.

Default: ``ipc://$XDG_RUNTIME_DIR/edgert/edgert.sock`` (the user's runtime directory, mode
0700), else a private directory under /tmp. TCP only when the endpoint says so; all
interfaces (``*``, ``0.0.0.0``, ``::``) only when the endpoint names them.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import stat
import tempfile
from pathlib import Path

import zmq

from ..errors import ConfigError

SCHEMES = ("ipc", "tcp", "inproc")
IPC_PATH_MAX = 107          # sun_path of a Unix socket address, less the final NUL
ALL_INTERFACES = ("*", "0.0.0.0", "[::]", "::")


def default_endpoint() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        d = Path(base) / "edgert"
    else:
        d = Path(tempfile.gettempdir()) / f"edgert-{os.getuid()}"
    private_dir(d)
    return f"ipc://{d}/edgert.sock"


def private_dir(d: Path) -> None:
    """Make ``d`` (mode 0700), or check that it is ours and private."""
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(d)
    except OSError as e:
        raise ConfigError(f"cannot make the socket directory {d}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(f"{d} must be a directory owned by this user with mode 0700 "
                          "(another user could reach the socket otherwise)")


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` if it is one the service may bind; ConfigError says why not."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in SCHEMES or not rest:
        raise ConfigError(f"endpoint {endpoint!r}: expected ipc://PATH, tcp://HOST:PORT or "
                          "inproc://NAME")
    if scheme == "ipc":
        if len(rest.encode()) > IPC_PATH_MAX:
            raise ConfigError(f"endpoint {endpoint!r}: an ipc path has at most {IPC_PATH_MAX} "
                              "bytes")
        parent = Path(rest).parent
        if not parent.is_dir():
            raise ConfigError(f"endpoint {endpoint!r}: no directory {parent}")
        if _listening(rest):
            raise ConfigError(f"endpoint {endpoint!r}: another service listens there")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not (port == "*" or port.isdigit()):
            raise ConfigError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT (PORT may be "
                              "0 or * for any free port)")
    return endpoint


def all_interfaces(endpoint: str) -> bool:
    scheme, _, rest = endpoint.partition("://")
    return scheme == "tcp" and rest.rpartition(":")[0] in ALL_INTERFACES


def loopback(endpoint: str) -> bool:
    """Whether a tcp endpoint binds a loopback address only (127.0.0.0/8, ::1, localhost)."""
    scheme, _, rest = endpoint.partition("://")
    host = rest.rpartition(":")[0].strip("[]")
    if scheme != "tcp":
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plain_tcp(endpoint: str, curve: bool) -> None:
    """Plain TCP carries no authentication: the service takes it on loopback only, where
    the peers are local processes (as on an ipc socket, less the directory's mode)."""
    if endpoint.startswith("tcp://") and not curve and not loopback(endpoint):
        raise ConfigError(f"endpoint {endpoint}: plain TCP is unauthenticated, so edgert "
                          "serves it on loopback only (tcp://127.0.0.1:PORT); to serve other "
                          "hosts, turn CURVE on (--curve-secret and --allow-dir, docs/deploy.md)")


def _listening(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path`` (a file left by
    a service that died does not count: binding replaces it)."""
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def bind_router(sock, endpoint: str) -> None:
    """Bind, turning "in use" into one line that names the endpoint."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        if e.errno == zmq.EADDRINUSE:
            raise ConfigError(f"endpoint {endpoint}: address already in use (another "
                              "service or program listens there)") from None
        raise ConfigError(f"endpoint {endpoint}: cannot bind: {e.strerror}") from None


