"""RedisStore (``redis://HOST:PORT/DB``): one Redis key per value, under ``edgert:``.

Look-ups of many keys are one MGET; writes of many (and counters beside them) one
pipeline without MULTI; a server's burst of requests one pipeline (``RedisBatch``); TTLs
are Redis's own (``PX``). Several server processes may share one Redis: every piece of
state is in it. Where atomicity matters across them: ``merge`` (WATCH/MULTI, retried),
``charge`` (one Lua script), counters (INCRBY). For KV chunks, run Redis with a
``maxmemory`` and ``maxmemory-policy volatile-lru`` (chunks carry TTLs, state does not,
so only chunks are evicted) or ``allkeys-lru`` on a Redis that holds nothing but chunks.
"""
from __future__ import annotations

import redis

from ..errors import ConfigError
from .store import Batch, Store, check_key

PREFIX = "edgert:"
TIMEOUT_S = 2.0          # a Redis that does not answer in this long is down for us
# NOTE: a check-and-add in one atomic step: INCRBY then DECRBY over the limit would let a
# concurrent charge see the overshoot and be refused wrongly. A counter without a TTL (one
# written before quotas had windows) gets one.
CHARGE = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[1])
if n > tonumber(ARGV[2]) then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""


class RedisStore(Store):
    def __init__(self, url: str):
        self.spec = url
        try:
            self.r = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S,
                                          socket_connect_timeout=TIMEOUT_S)
            self.r.ping()
            self._charge = self.r.register_script(CHARGE)
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

    def put_incr(self, items: dict[str, bytes], counters: dict[str, int]) -> dict[str, int]:
        with self.r.pipeline(transaction=False) as p:    # NOTE: no MULTI: one round trip
            for k, v in items.items():
                check_key(k)
                p.set(PREFIX + k, bytes(v))
            for k, by in counters.items():
                check_key(k)
                p.incrby(PREFIX + k, by)
            got = p.execute()
        return {k: int(n) for k, n in zip(counters, got[len(items):])}

    def merge(self, key: str, fn) -> bytes:
        k = PREFIX + key
        check_key(key)
        with self.r.pipeline() as p:
            while True:              # optimistic: WATCH, read, MULTI/EXEC; again if raced
                try:
                    p.watch(k)
                    new = bytes(fn(p.get(k)))
                    p.multi()
                    p.set(k, new)
                    p.execute()
                    return new
                except redis.WatchError:
                    continue

    def charge(self, key: str, by: int, limit: int, window_s: float) -> bool:
        check_key(key)
        return bool(self._charge(keys=[PREFIX + key],
                                 args=[int(by), int(limit), max(1, int(window_s * 1000))]))

    def batch(self) -> RedisBatch:
        return RedisBatch(self)

    def stats(self) -> dict:
        info = self.r.info("memory")
        return {"backend": "redis", "spec": self.spec, "keys": len(self.keys("")),
                "bytes": int(info.get("used_memory", 0)),
                "maxmemory": int(info.get("maxmemory", 0)),
                "maxmemory_policy": info.get("maxmemory_policy", "")}

    def close(self) -> None:
        self.r.close()


class RedisBatch(Batch):
    """Every queued call in one pipeline (no MULTI): one round trip for a burst of requests."""

    def __init__(self, store: RedisStore):
        super().__init__(store)
        self.p = store.r.pipeline(transaction=False)
        self.out: list | None = None
        self.error: Exception | None = None

    def _queue(self, n: int, shape):
        at = len(self.p)

        def get():
            if self.error is not None:
                raise self.error
            got = self.out[at:at + n]
            for g in got:
                if isinstance(g, Exception):
                    raise g
            return shape(got)
        return get

    def sizes(self, keys: list[str]):
        for k in keys:
            check_key(k)
        get = self._queue(len(keys), lambda got: [n if n else None for n in got])
        for k in keys:
            self.p.strlen(PREFIX + k)
        return get

    def put_incr(self, items: dict[str, bytes], counters: dict[str, int]):
        for k in (*items, *counters):
            check_key(k)
        names = list(counters)
        get = self._queue(len(items) + len(counters),
                          lambda got: {k: int(n) for k, n in zip(names, got[len(items):])})
        for k, v in items.items():
            self.p.set(PREFIX + k, bytes(v))
        for k, by in counters.items():
            self.p.incrby(PREFIX + k, by)
        return get

    def run(self) -> None:
        if self.out is not None or self.error is not None:
            return
        try:
            self.out = self.p.execute(raise_on_error=False) if len(self.p) else []
        except (redis.RedisError, OSError) as e:     # Redis gone: every request hears so
            self.error = e
        finally:
            self.p.reset()

    def __len__(self) -> int:
        return len(self.p)
