"""Store: where every piece of fleet-server state lives, behind one small interface.

Keys are short strings with a namespace prefix (``dev:``, ``pred:``, ``seq:``, ``kv:``);
values are bytes. Two backends pass one contract suite (tests/test_server_store.py):

- ``dir:PATH`` (DirStore): one file per key, crash-safe, for a single server process;
- ``redis://HOST:PORT/DB`` (RedisStore): one key per value, batched round trips, shared
  by several server processes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from ..errors import ConfigError

MAX_KEY = 100            # bytes of one key: a DirStore file name is its hex (<= 255 bytes)


class Store(ABC):
    """Bytes under string keys. Thread-safe. ``ttl_s`` makes a key expire (KV chunks);
    keys without one stay until deleted."""

    spec: str

    @abstractmethod
    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Values of ``keys`` in order (None where absent or expired), in one round trip."""

    @abstractmethod
    def sizes(self, keys: list[str]) -> list[int | None]:
        """Byte sizes of ``keys`` in order (None where absent), in one round trip."""

    @abstractmethod
    def put_many(self, items: dict[str, bytes], ttl_s: float | None = None) -> None:
        """Write every item (one round trip)."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """Every live key that starts with ``prefix``."""

    @abstractmethod
    def incr(self, key: str, by: int = 1) -> int:
        """Add ``by`` to the counter at ``key`` (0 when absent) atomically; the new value."""

    @abstractmethod
    def stats(self) -> dict:
        """``backend``, ``keys``, ``bytes`` (memory or disk the store uses)."""

    def close(self) -> None:
        pass

    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self.put_many({key: value}, ttl_s)


def check_key(key: str) -> bytes:
    b = key.encode()
    if not key or len(b) > MAX_KEY:
        raise ValueError(f"store key {key!r}: 1 to {MAX_KEY} bytes")
    return b


def open_store(spec: str) -> Store:
    """``dir:PATH`` or ``redis://HOST:PORT/DB``; ConfigError names what is wrong."""
    if spec.startswith("dir:"):
        from .dirstore import DirStore
        if not spec[4:]:
            raise ConfigError("--store dir:PATH needs a path")
        return DirStore(spec[4:])
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from .redisstore import RedisStore
        return RedisStore(spec)
    raise ConfigError(f"store {spec!r}: expected dir:PATH or redis://HOST:PORT/DB")
