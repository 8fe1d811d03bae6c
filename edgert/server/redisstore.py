"""RedisStore (``redis://HOST:PORT/DB``): one Redis key per value, under ``edgert:``.

Look-ups of many keys are one MGET; writes of many one pipeline; TTLs are Redis's own
(``PX``). Several server processes may share one Redis: every piece of state is in it,
counters use INCR. For KV chunks, run Redis with a ``maxmemory`` and
``maxmemory-policy volatile-lru`` (chunks carry TTLs, state does not, so only chunks are
evicted) or ``allkeys-lru`` on a Redis that holds nothing but chunks.
"""
from __future__ import annotations

import redis

from ..errors import ConfigError
from .store import Store, check_key

PREFIX = "edgert:"
TIMEOUT_S = 2.0          # a Redis that does not answer in this long is down for us


class RedisStore(Store):
    def __init__(self, url: str):
        self.spec = url
        try:
            self.r = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S,
                                          socket_connect_timeout=TIMEOUT_S)
            self.r.ping()
        except (redis.RedisError, ValueError) as e:
            raise ConfigError(f"store {url}: cannot reach Redis ({e})") from None

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        return self.r.mget([PREFIX + k for k in keys if check_key(k)])

    def sizes(self, keys: list[str]) -> list[int | None]:
        with self.r.pipeline(transaction=False) as p:
            for k in keys:
                check_key(k)
                p.strlen(PREFIX + k)
            got = p.execute()
        return [n if n else None for n in got]     # NOTE: STRLEN of a missing key is 0

    def put_many(self, items: dict[str, bytes], ttl_s: float | None = None) -> None:
        px = max(1, int(ttl_s * 1000)) if ttl_s else None
        with self.r.pipeline(transaction=False) as p:
            for k, v in items.items():
                check_key(k)
                p.set(PREFIX + k, bytes(v), px=px)
            p.execute()

    def delete(self, key: str) -> None:
        self.r.delete(PREFIX + key)

    def keys(self, prefix: str) -> list[str]:
        pat = PREFIX + "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
        return [k.decode()[len(PREFIX):] for k in self.r.scan_iter(match=pat, count=1000)]

    def incr(self, key: str, by: int = 1) -> int:
        return int(self.r.incrby(PREFIX + key, by))

    def stats(self) -> dict:
        info = self.r.info("memory")
        return {"backend": "redis", "spec": self.spec, "keys": len(self.keys("")),
                "bytes": int(info.get("used_memory", 0)),
                "maxmemory": int(info.get("maxmemory", 0)),
                "maxmemory_policy": info.get("maxmemory_policy", "")}

    def close(self) -> None:
        self.r.close()
