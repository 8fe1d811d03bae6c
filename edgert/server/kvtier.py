"""ServerTier: a model's KV chunks shared through the fleet server (the KV cache's last tier).

Publishing is the writer thread's business and never waits: a chunk (the disk tier's
format, named by its last page's hash under the model's KV fingerprint) goes into the
link's queue, within this device's quota. A look-up before a prefill is one round trip on
a socket of the tier's own, bounded by ``LOOKUP_TIMEOUT_S``, and only while the link is
connected (a gone server costs nothing); a fetch is a second one, made only when the KV
cache's measured figures say reading is faster than computing. Every fetched chunk is
checked whole (edgert.kv.disk.check_chunk: format, sums, fingerprint, page names, parent,
token ids); anything in doubt is computed instead, so outputs never depend on the server.
Salted prompts have salted page names, so they only ever match the same salt.
"""
from __future__ import annotations

import itertools
import logging
import threading

import numpy as np
import zmq

from ..control.auth import curve_client
from ..control.protocol import ProtocolError, decode_reply, encode_request
from ..kv.disk import ChunkError, check_chunk, chunk_bytes

log = logging.getLogger(__name__)
LOOKUP_TIMEOUT_S = 0.25  # a prefill waits at most this long per round trip, then computes
QUOTA = 256 << 20        # bytes of chunks one device publishes (the server has its own cap)


class ServerTier:
    name = "server"

    def __init__(self, device, fp: bytes, page_nbytes: int, quota: int = QUOTA):
        self.device, self.fp, self.page_nbytes = device, fp, page_nbytes
        self.model = fp.hex()
        self.quota = quota
        self.published_bytes = 0
        self._published: set[bytes] = set()
        self._lock = threading.Lock()
        self._sock = None
        self._ids = itertools.count(1)
        self._ctx = zmq.Context.instance()

    # --- publishing (the KV writer's thread) ---------------------------------------------
    def has(self, name: bytes) -> bool:
        return name in self._published

    def publish(self, hashes, parent: bytes, tokens, pages) -> int:
        """Queue one chunk for the server; the bytes queued (0: over quota or queue full)."""
        buf = chunk_bytes(self.fp, hashes, parent, tokens, pages, self.page_nbytes)
        if self.published_bytes + buf.size > self.quota:
            return 0
        if not self.device.link.send("kv_put", {"device": self.device.device_id,
                                                "model": self.model, "name": hashes[-1].hex(),
                                                "chunk": buf}, nbytes=buf.size):
            return 0
        self._published.add(hashes[-1])
        self.published_bytes += buf.size
        self.device.counters["published_chunks"] += 1
        return int(buf.size)

    # --- look-up and fetch (the prefill's thread) ----------------------------------------
    def lookup(self, names: list[bytes]) -> list[int | None]:
        r = self._call("kv_lookup", names)
        sizes = r.get("sizes") if isinstance(r, dict) else None
        if not isinstance(sizes, list) or len(sizes) != len(names):
            return []
        return [z if isinstance(z, int) and not isinstance(z, bool) and z > 0 else None
                for z in sizes]

    def fetch(self, names: list[bytes]) -> list:
        r = self._call("kv_get", names)
        chunks = r.get("chunks") if isinstance(r, dict) else None
        if not isinstance(chunks, list):
            return []
        out = []
        for c in chunks:        # the run stops at the first chunk that is gone meanwhile
            if not isinstance(c, np.ndarray) or c.dtype != np.uint8:
                break
            out.append(c)
        return out

    def verify(self, raw, hashes, parent: bytes, tokens):
        """The chunk's pages, or None (counted, logged) when anything is off."""
        try:
            pages = check_chunk(raw, self.fp, self.page_nbytes, list(hashes), parent, tokens)
        except ChunkError as e:
            log.warning("kv server tier: chunk %s rejected (%s); computing it instead",
                        hashes[-1].hex()[:16], e)
            self.device.counters["rejected_chunks"] += 1
            return None
        self.device.counters["fetched_chunks"] += 1
        return pages

    def _call(self, op: str, names: list[bytes]):
        """One request, bounded; None when the server is not there or too slow."""
        link = self.device.link
        if not link.connected:
            return None
        with self._lock:
            if self._sock is None:
                s = self._ctx.socket(zmq.DEALER)
                s.linger = 0        # NOTE: no `immediate`: a request waits for the handshake
                s.sndhwm = 4        # of a fresh socket, within the poll's bound
                if link.curve is not None:
                    curve_client(s, *link.curve)
                s.connect(link.endpoints[link.current % len(link.endpoints)])
                self._sock = s
            rid = next(self._ids)
            args = {"device": self.device.device_id, "model": self.model,
                    "names": [n.hex() for n in names]}
            try:
                self._sock.send_multipart(encode_request(rid, op, args), zmq.NOBLOCK)
                while self._sock.poll(int(LOOKUP_TIMEOUT_S * 1000)):
                    rep = decode_reply(self._sock.recv_multipart())
                    if rep.id == rid:
                        return rep.result if rep.ok else None
                    # NOTE: a late answer to an earlier, timed-out request: skip it
            except (zmq.ZMQError, ProtocolError):
                pass
            self._sock.close(0)         # silent or broken: a fresh socket next time
            self._sock = None
            return None

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(0)
                self._sock = None
