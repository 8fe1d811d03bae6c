"""open_store: the fleet server's store backend from its spec (``--store``)."""
from __future__ import annotations

from ..errors import ConfigError
from .dirstore import DirStore
from .store import Store


def open_store(spec: str) -> Store:
    """``dir:PATH`` or ``redis://HOST:PORT/DB``; ConfigError names what is wrong."""
    if spec.startswith("dir:"):
        if not spec[4:]:
            raise ConfigError("--store dir:PATH needs a path")
        return DirStore(spec[4:])
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from .redisstore import RedisStore  # redis-py loads only for a Redis store
        return RedisStore(spec)
    raise ConfigError(f"store {spec!r}: expected dir:PATH or redis://HOST:PORT/DB")
