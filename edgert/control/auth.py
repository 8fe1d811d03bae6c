"""CurveZMQ for the device service: key files, the allow list, the admin list.

Key files are ZeroMQ certificates (``zmq.auth.create_certificates``): ``NAME.key`` holds the
public key, ``NAME.key_secret`` both keys. The service accepts a client only when its public
key is in the allow directory (ZAP, through ``zmq.auth.thread.ThreadAuthenticator``); libzmq
drops a refused or plain-text peer during the handshake, so such a client receives nothing.
ZAP names an accepted peer by its z85 public key (the frame property "User-Id"); admin-only
ops compare that against the admin directory, and the service's caps count every socket
of one key as one caller. The client side (client.py) watches its socket's handshake
events, so a refused key raises ServiceUnavailable at once instead of hanging in a send.
"""
from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ..errors import ConfigError


def public_keys(directory) -> set[bytes]:
    """z85 public keys of every ``*.key`` file in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"key directory {d} does not exist")
    keys = set()
    for f in sorted(d.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{f}: not a ZeroMQ public key file ({e})") from None
        if public:
            keys.add(public)
    if not keys:
        raise ConfigError(f"key directory {d} holds no public key (*.key); "
                          "`edgert keys generate` writes one")
    return keys


def key_pair(secret_file) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{secret_file}: cannot read a key pair ({e})") from None
    if not secret:
        raise ConfigError(f"{secret_file} holds no secret key (use the .key_secret file)")
    return public, secret


def server_public_key(public_file) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(public_file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{public_file}: cannot read a public key ({e})") from None
    if not public:
        raise ConfigError(f"{public_file} holds no public key")
    return public


class _AllowList:
    """ZAP credentials provider: a fixed set of z85 public keys."""

    def __init__(self, keys: set[bytes]):
        self.keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def start_authenticator(ctx: zmq.Context, allowed: set[bytes]) -> ThreadAuthenticator:
    """A ZAP handler on ``ctx`` that accepts CURVE clients whose key is in ``allowed``.
    Start it before binding: libzmq admits everyone when no handler answers."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    # NOTE: a callback rather than configure_curve(location=DIR): that call only logs a bad
    # directory (admitting no one, silently) and cannot merge the admin keys in.
    auth.configure_curve_callback(domain="*", credentials_provider=_AllowList(allowed))
    return auth


def curve_server(sock: zmq.Socket, secret_file) -> None:
    public, secret = key_pair(secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def curve_client(sock: zmq.Socket, server_public_file, client_secret_file) -> None:
    public, secret = key_pair(client_secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public_key(server_public_file)


def generate(directory, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) into ``directory``."""
    d = Path(directory)
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r}: use a plain file name")
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for f in (public, secret):
        if f.exists():
            raise ConfigError(f"{f} exists; remove it first or choose another --name")
    d.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)          # the secret is never readable by others, not even briefly
    try:
        pub, sec = zmq.auth.create_certificates(d, name)
    finally:
        os.umask(old)
    os.chmod(pub, 0o644)
    return Path(pub), Path(sec)
