"""DirStore: the embedded store (``dir:PATH``), one file per key, safe across crashes.

    PATH/.lock              held (flock) by the one server process using PATH
    PATH/data/<key hex>     [magic "EDGESTO1" | f64 expiry (0: none) | u64 length |
                             blake3(value)[:16]] value

A write goes to a temporary file (``.NAME.tmp``) that is fsynced, renamed over the key's
file, and the directory fsynced: a crash leaves the old value or the new one, never a
mix. At start the index (key -> expiry, size) is rebuilt from the files; temporary files
and files whose header is damaged are deleted. A read checks the length and sum; a bad
file is deleted and reads as absent.
"""
from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
from pathlib import Path

import blake3

from ..errors import ConfigError
from .store import Store, check_key

log = logging.getLogger(__name__)
MAGIC = b"EDGESTO1"
_HEAD = struct.Struct("<8sdQ16s")
TMP = ".tmp"


class DirStore(Store):
    exclusive = True            # one process: the server may keep small state in memory

    def __init__(self, path):
        self.root = Path(path)
        self.spec = f"dir:{self.root}"
        self.data = self.root / "data"
        try:
            self.data.mkdir(parents=True, exist_ok=True)
            self._lockf = open(self.root / ".lock", "a+b")
        except OSError as e:
            raise ConfigError(f"store {self.spec}: {e.strerror}") from None
        try:
            fcntl.flock(self._lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lockf.close()
            raise ConfigError(f"store {self.spec}: another edgert server uses this directory "
                              "(a dir: store serves one process; use redis:// for several)") \
                from None
        self._lock = threading.Lock()
        self._index: dict[str, tuple[float, int]] = {}
        self._scan()

    def _scan(self) -> None:
        for f in self.data.iterdir():
            if f.name.endswith(TMP):
                f.unlink(missing_ok=True)       # a write a crash interrupted
                continue
            try:
                key = bytes.fromhex(f.name).decode()
                with open(f, "rb") as fh:
                    magic, expiry, n, _ = _HEAD.unpack(fh.read(_HEAD.size))
                if magic != MAGIC or f.stat().st_size != _HEAD.size + n:
                    raise ValueError("bad header or length")
            except (ValueError, UnicodeDecodeError, struct.error, OSError) as e:
                log.warning("%s: dropping a damaged entry %s (%s)", self.spec, f.name, e)
                f.unlink(missing_ok=True)
                continue
            self._index[key] = (expiry, n)

    def _path(self, key: str) -> Path:
        return self.data / check_key(key).hex()

    def _live(self, key: str, now: float) -> bool:
        e = self._index.get(key)
        if e is None:
            return False
        if e[0] and e[0] <= now:
            self._drop(key)
            return False
        return True

    def _drop(self, key: str) -> None:
        self._index.pop(key, None)
        self._path(key).unlink(missing_ok=True)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        now, out = time.time(), []
        with self._lock:
            for k in keys:
                out.append(self._read(k) if self._live(k, now) else None)
        return out

    def _read(self, key: str) -> bytes | None:
        try:
            raw = self._path(key).read_bytes()
            magic, _, n, digest = _HEAD.unpack_from(raw)
            value = raw[_HEAD.size:]
            if magic != MAGIC or len(value) != n or blake3.blake3(value).digest(16) != digest:
                raise ValueError("length or checksum")
        except (OSError, ValueError, struct.error) as e:
            log.warning("%s: %r unreadable (%s); dropped", self.spec, key, e)
            self._drop(key)
            return None
        return value

    def sizes(self, keys: list[str]) -> list[int | None]:
        now = time.time()
        with self._lock:
            return [self._index[k][1] if self._live(k, now) else None for k in keys]

    def put_many(self, items: dict[str, bytes], ttl_s: float | None = None) -> None:
        expiry = time.time() + ttl_s if ttl_s else 0.0
        with self._lock:
            for k, v in items.items():
                self._write(k, bytes(v), expiry)
            _fsync_dir(self.data)

    def _write(self, key: str, value: bytes, expiry: float) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP}")
        head = _HEAD.pack(MAGIC, expiry, len(value), blake3.blake3(value).digest(16))
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(value)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        self._index[key] = (expiry, len(value))

    def delete(self, key: str) -> None:
        with self._lock:
            self._drop(key)
            _fsync_dir(self.data)

    def keys(self, prefix: str) -> list[str]:
        now = time.time()
        with self._lock:
            return [k for k in list(self._index) if k.startswith(prefix) and self._live(k, now)]

    def incr(self, key: str, by: int = 1) -> int:
        with self._lock:
            old = self._read(key) if self._live(key, time.time()) else None
            n = int(old or b"0") + by
            self._write(key, str(n).encode(), 0.0)
            _fsync_dir(self.data)
            return n

    def charge(self, key: str, by: int, limit: int, window_s: float) -> bool:
        now = time.time()
        with self._lock:
            live = self._live(key, now)
            old = int(self._read(key) or b"0") if live else 0
            if old + by > limit:
                return False
            expiry = self._index[key][0] if live and self._index[key][0] else now + window_s
            self._write(key, str(old + by).encode(), expiry)
            _fsync_dir(self.data)
            return True

    def stats(self) -> dict:
        with self._lock:
            return {"backend": "dir", "spec": self.spec, "keys": len(self._index),
                    "bytes": sum(_HEAD.size + n for _, n in self._index.values())}

    def close(self) -> None:
        if not self._lockf.closed:
            self._lockf.close()             # releases the flock


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
