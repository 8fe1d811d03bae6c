"""Store: where every piece of fleet-server state lives, behind one small interface.

Keys are short strings with a namespace prefix (``dev:``, ``pred:``, ``seq:``, ``kv:``);
values are bytes. Two backends pass one contract suite (tests/test_server_store.py):

- ``dir:PATH`` (DirStore): one file per key, crash-safe, for a single server process;
- ``redis://HOST:PORT/DB`` (RedisStore): one key per value, batched round trips, shared
  by several server processes.

``open_store(spec)`` (backends.py) picks the backend; this module is the interface both
implement, so it imports neither.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

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
    def charge(self, key: str, by: int, limit: int, window_s: float) -> bool:
        """Add ``by`` to the counter at ``key`` unless that takes it past ``limit`` (then
        False, the counter unchanged), atomically; a counter lives ``window_s`` from its
        first charge (a quota per window), then starts again from 0."""

    @abstractmethod
    def stats(self) -> dict:
        """``backend``, ``keys``, ``bytes`` (memory or disk the store uses)."""

    def put_incr(self, items: dict[str, bytes], counters: dict[str, int]) -> dict[str, int]:
        """Write ``items`` and add to ``counters`` in one round trip (the two not atomic
        together); the counters' new values."""
        self.put_many(items)
        return {k: self.incr(k, by) for k, by in counters.items()}

    def merge(self, key: str, fn) -> bytes:
        """Replace the value at ``key`` with ``fn(old)`` (old: None when absent), atomically
        against other processes sharing the store; the new value. ``fn`` may run more than
        once (a backend retries when another process wrote meanwhile)."""
        new = fn(self.get(key))
        self.put(key, new)
        return new

    def close(self) -> None:
        pass

    def batch(self) -> Batch:
        """Calls to queue and make in one round trip (``Batch``)."""
        return Batch(self)

    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self.put_many({key: value}, ttl_s)


class Batch:
    """Store calls of several requests made in one round trip: each call returns a getter
    that gives its result (or raises its error) once ``run()`` has been called. This one
    makes each call at once (a store without round trips); RedisStore's queues them in one
    pipeline. Getters are valid only after ``run()``."""

    def __init__(self, store: Store):
        self.store = store

    def _now(self, fn, *args):
        try:
            got = fn(*args)
        except Exception as e:       # NOTE: handed to the one request that made the call
            def fail(e=e):
                raise e
            return fail
        return lambda: got

    def sizes(self, keys: list[str]):
        return self._now(self.store.sizes, keys)

    def put_incr(self, items: dict[str, bytes], counters: dict[str, int]):
        return self._now(self.store.put_incr, items, counters)

    def run(self) -> None:
        pass

    def __len__(self) -> int:
        return 0


def check_key(key: str) -> bytes:
    b = key.encode()
    if not key or len(b) > MAX_KEY:
        raise ValueError(f"store key {key!r}: 1 to {MAX_KEY} bytes")
    return b


class WriteBehind(Store):
    """A store's small state (everything but ``kv:`` chunks) held in memory and written
    back in one batch by ``flush()`` (the server calls it every FLUSH_S and at stop).
    For a store one process owns (DirStore): a report then costs no fsync, and a crash
    loses at most the last FLUSH_S of learning, never a half-written value."""

    FLUSH_S = 0.5
    # KV chunks and quota counters go straight through (they carry TTLs; chunks are
    # large); so do pack blocks and signed pack envelopes (a device must see what the store
    # holds, and another process may publish them)
    PASS = ("kv:", "kvq:", "blk:", "pk:")

    def __init__(self, inner: Store):
        import threading
        self.inner, self.spec = inner, inner.spec
        self._lock = threading.Lock()
        self._mem: dict[str, bytes | None] = {}     # None: deleted
        self._dirty: set[str] = set()

    def _load(self, keys: list[str]) -> None:
        miss = [k for k in keys if k not in self._mem]
        for k, v in zip(miss, self.inner.get_many(miss) if miss else []):
            self._mem[k] = v

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        small = [k for k in keys if not k.startswith(self.PASS)]
        big = [k for k in keys if k.startswith(self.PASS)]
        got = dict(zip(big, self.inner.get_many(big))) if big else {}
        with self._lock:
            self._load(small)
            got.update((k, self._mem[k]) for k in small)
        return [got[k] for k in keys]

    def sizes(self, keys: list[str]) -> list[int | None]:
        return self.inner.sizes(keys)

    def put_many(self, items: dict[str, bytes], ttl_s: float | None = None) -> None:
        big = {k: v for k, v in items.items() if k.startswith(self.PASS) or ttl_s}
        if big:
            self.inner.put_many(big, ttl_s)
        with self._lock:
            for k, v in items.items():
                if k not in big:
                    check_key(k)
                    self._mem[k] = bytes(v)
                    self._dirty.add(k)

    def delete(self, key: str) -> None:
        with self._lock:
            self._mem[key] = None
            self._dirty.discard(key)
        self.inner.delete(key)

    def keys(self, prefix: str) -> list[str]:
        self.flush()
        return self.inner.keys(prefix)

    def charge(self, key: str, by: int, limit: int, window_s: float) -> bool:
        if not key.startswith(self.PASS):
            raise ValueError(f"store key {key!r}: a charged counter's key starts with kvq:")
        return self.inner.charge(key, by, limit, window_s)

    def merge(self, key: str, fn) -> bytes:
        with self._lock:
            self._load([key])
            new = self._mem[key] = bytes(fn(self._mem[key]))
            self._dirty.add(key)
            return new

    def incr(self, key: str, by: int = 1) -> int:
        with self._lock:
            self._load([key])
            n = int(self._mem[key] or b"0") + by
            self._mem[key] = str(n).encode()
            self._dirty.add(key)
            return n

    def flush(self) -> None:
        with self._lock:
            items = {k: self._mem[k] for k in self._dirty if self._mem[k] is not None}
            self._dirty.clear()
        if items:
            self.inner.put_many(items)

    def stats(self) -> dict:
        self.flush()
        return self.inner.stats()

    def close(self) -> None:
        self.flush()
        self.inner.close()
