"""PackShelf: the server side of signed pack updates (`edgert server --packs DIR
--signing-key FILE`, docs/updates.md).

Every ``*.edgepack`` in DIR is read (its manifest, and every block verified once when
published); per lineage the newest version is published: its stored blocks under
``blk:<hash hex>`` (only those the store lacks), then its signed envelope under
``pk:<lineage hex>``, in that order, so no device sees a manifest whose blocks are not
there. DIR is read at start (before the server says it is ready), then watched by a
thread of its own every REFRESH_S, so an ``edgert pack ... --append`` into DIR is served
without a restart and the server's loop never waits on publishing: until a new version is
in the store, devices get the previous one. The store is the truth a device reads: a
second server on the same Redis serves the same versions.

ops (protocol v1, as the rest of the fleet server):

    pack_latest {lineage: hex}      -> {envelope: bytes}   the signed newest version
    pack_blocks {hashes: [hex, ...]} -> {blocks: [uint8 array | None, ...]}
    pack_list   {}                  -> {packs: [{lineage, version, file}]}
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref

import numpy as np

from ..control.protocol import MAX_ARRAYS, ProtocolError
from ..errors import ConfigError
from ..pack.reader import PackReader
from ..update import signed

log = logging.getLogger(__name__)
REFRESH_S = 1.0          # DIR is listed again this often
MAX_HASHES = MAX_ARRAYS  # blocks in one pack_blocks request: one array frame each
MAX_REPLY_BYTES = 64 << 20   # bytes of blocks in one reply (the device batches below it)
PUT_BATCH_BYTES = 16 << 20   # bytes of blocks in one store round trip while publishing
HASH_HEX = re.compile(r"[0-9a-f]{32}")


def block_key(h: bytes) -> str:
    return f"blk:{h.hex()}"


def envelope_key(lineage: bytes) -> str:
    return f"pk:{lineage.hex()}"


class PackShelf:
    def __init__(self, directory, signing_key, store):
        self.dir = os.fspath(directory)
        if not os.path.isdir(self.dir):
            raise ConfigError(f"--packs {self.dir}: not a directory")
        self.key, self.store = signing_key, store
        self._seen: dict[str, tuple[int, int]] = {}     # file -> (size, mtime_ns) published
        self._checked = 0.0
        self.published: dict[str, dict] = {}            # lineage hex -> {version, file}
        self.counters = {"published": 0, "blocks_put": 0, "bytes_put": 0, "blocks_served": 0,
                         "bytes_served": 0}
        self._lock = threading.Lock()            # one refresh at a time
        self._stop = threading.Event()
        self.refresh(force=True)
        self._thread = threading.Thread(target=_watch, args=(weakref.ref(self), self._stop),
                                        daemon=True, name="edgert-packs")
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(30)             # NOTE: a publish in progress finishes its batch

    def ops(self) -> dict:
        return {"pack_latest": self._latest, "pack_blocks": self._blocks,
                "pack_list": self._list}

    # --- publishing --------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked < REFRESH_S:
                return
            self._checked = now
            self._refresh()

    def _refresh(self) -> None:
        for name in sorted(os.listdir(self.dir)):
            if self._stop.is_set():
                return
            path = os.path.join(self.dir, name)
            if not name.endswith(".edgepack") or not os.path.isfile(path):
                continue
            st = os.stat(path)
            if self._seen.get(path) == (st.st_size, st.st_mtime_ns):
                continue
            try:
                self._publish(path)
            except Exception as e:       # NOTE: one bad file must not stop the others
                log.warning("--packs: %s not published: %s", path, e)
            self._seen[path] = (st.st_size, st.st_mtime_ns)

    def _publish(self, path: str) -> None:
        with PackReader(path, read_mode="buffered") as r:
            lineage = signed.lineage_of(r)
            have = self._stored_version(lineage)
            if have is not None and have >= r.generation:
                self.published.setdefault(lineage.hex(), {"version": have,
                                                          "file": os.path.basename(path)})
                return               # never move a lineage back, nor sign the same twice
            self._put_blocks(r)
            env = signed.sign(self.key, lineage, r.manifest)
            self.store.put(envelope_key(lineage), env.encode())
            self.published[lineage.hex()] = {"version": r.generation,
                                             "file": os.path.basename(path)}
            self.counters["published"] += 1
            log.info("published %s: lineage %s version %d", path, lineage.hex(), r.generation)

    def _stored_version(self, lineage: bytes) -> int | None:
        """The version the store holds for ``lineage``, if this server's key signed it (an
        envelope of another key, after a key change, is replaced)."""
        raw = self.store.get(envelope_key(lineage))
        if raw is None:
            return None
        try:
            env = signed.decode(raw)
        except signed.UpdateRefused:
            return None
        return env.version if signed.signed_by(env, self.key.public_key()) else None

    def _put_blocks(self, r: PackReader) -> None:
        stored = {}
        for i, b in enumerate(r.blocks):
            if not b.zero and b.hash not in stored:
                stored[b.hash] = i
        hashes = list(stored)
        sizes = []
        for k in range(0, len(hashes), 1024):
            sizes += self.store.sizes([block_key(h) for h in hashes[k:k + 1024]])
        todo = [h for h, n in zip(hashes, sizes) if n is None and r.blocks[stored[h]].length]
        batch, nbytes = {}, 0
        for h in todo:
            data = r.read_block(stored[h])     # verified against its hash
            batch[block_key(h)] = data
            nbytes += len(data)
            if nbytes >= PUT_BATCH_BYTES:
                self._put(batch, nbytes)
                batch, nbytes = {}, 0
        if batch:
            self._put(batch, nbytes)

    def _put(self, batch: dict, nbytes: int) -> None:
        self.store.put_many(batch)
        self.counters["blocks_put"] += len(batch)
        self.counters["bytes_put"] += nbytes

    # --- ops -----------------------------------------------------------------------------
    def _latest(self, args: dict) -> dict:
        lineage = args.get("lineage")
        if not isinstance(lineage, str) or not HASH_HEX.fullmatch(lineage):
            raise ProtocolError("bad_request", "'lineage' must be 32 lowercase hex digits")
        env = self.store.get(f"pk:{lineage}")
        if env is None:
            raise ProtocolError("unknown_model", f"no pack of lineage {lineage} on this server")
        return {"envelope": env}

    def _blocks(self, args: dict) -> dict:
        hashes = args.get("hashes")
        if not isinstance(hashes, list) or not 1 <= len(hashes) <= MAX_HASHES or not all(
                isinstance(h, str) and HASH_HEX.fullmatch(h) for h in hashes):
            raise ProtocolError("bad_request", f"'hashes' must be a list of 1 to {MAX_HASHES} "
                                "block hashes (32 lowercase hex digits)")
        sizes = self.store.sizes([f"blk:{h}" for h in hashes])
        if sum(n or 0 for n in sizes) > MAX_REPLY_BYTES:
            raise ProtocolError("too_large", f"those blocks hold more than {MAX_REPLY_BYTES} "
                                "bytes; ask for fewer at a time")
        got = self.store.get_many([f"blk:{h}" for h in hashes])
        self.counters["blocks_served"] += sum(g is not None for g in got)
        self.counters["bytes_served"] += sum(len(g) for g in got if g is not None)
        return {"blocks": [None if g is None else np.frombuffer(g, np.uint8) for g in got]}

    def _list(self, args: dict) -> dict:
        return {"packs": [{"lineage": k, **v} for k, v in sorted(self.published.items())]}

    def stats(self) -> dict:
        return {"dir": self.dir, "lineages": len(self.published), **self.counters}



def _watch(ref, stop: threading.Event) -> None:
    while not stop.wait(REFRESH_S):
        shelf = ref()
        if shelf is None:
            return
        try:
            shelf.refresh()
        except OSError as e:           # NOTE: DIR gone or unreadable: keep serving the store
            log.warning("--packs: cannot list %s: %s", shelf.dir, e)
        del shelf
