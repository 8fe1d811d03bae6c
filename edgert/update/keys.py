"""Ed25519 signing keys for pack updates, with `cryptography` (never our own crypto).

The private key is PKCS#8 PEM, written with mode 0600 from the first byte; the public key
is SubjectPublicKeyInfo PEM. Devices pin the public key (``updates.public_key`` in the
device config, or ``--public-key``).
"""
from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import ConfigError

PRIVATE = "signing.key"
PUBLIC = "signing.pub"


def generate(directory) -> tuple[str, str]:
    """Write DIR/signing.key (0600) and DIR/signing.pub; refuses to overwrite either."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    priv, pub = os.path.join(directory, PRIVATE), os.path.join(directory, PUBLIC)
    for p in (priv, pub):
        if os.path.exists(p):
            raise ConfigError(f"{p} exists; remove it first (a new key breaks every device "
                              "that pins the old public key)")
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    with open(pub, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _read(path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def load_private(path) -> Ed25519PrivateKey:
    raw = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: not a PEM private key (`edgert keys signing DIR` writes "
                          "one)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key")
    return key


def load_public(path) -> Ed25519PublicKey:
    raw = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: not a PEM public key (the signing.pub that "
                          "`edgert keys signing DIR` writes)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


def verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
        return True
    except InvalidSignature:
        return False
