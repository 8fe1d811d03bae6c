"""ServerLink: a device's background connection to the fleet server.

One thread owns one DEALER socket. It registers, beats every ``heartbeat_s``, sends the
reports queued by ``send()`` and hands replies to its owner; nothing a device API call does
waits on it: ``send()`` puts into a bounded queue and returns (a full queue drops the
report and counts it). When the server has been silent for ``LIVENESS`` heartbeats the
link closes the socket, backs off (``BACKOFF_S`` doubling to ``BACKOFF_MAX_S``), moves to
the next endpoint of its list and registers again (zguide's Paranoid Pirate). ``close()``
gives the reports still queued or in flight at most ``flush_s`` to be answered.

The thread holds its owner weakly (STYLE.md): the owner implements ``_link_register() ->
args`` and ``_link_reply(op, args, reply)``; ``reply`` is a protocol Reply.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import weakref

import zmq

from ..control.auth import curve_client
from ..control.protocol import ProtocolError, decode_reply, encode_request

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0        # until the server says its own
LIVENESS = 3             # heartbeats of silence before the link reconnects
BACKOFF_S = 0.1
BACKOFF_MAX_S = 2.0
QUEUE = 256              # reports waiting to be sent; beyond: dropped and counted
QUEUE_BYTES = 64 << 20   # bytes of arrays (KV chunks) waiting to be sent; beyond: dropped
POLL_MS = 50
CONNECT_GRACE_S = 0.5    # a closing link waits this long for a connection to come up


class ServerLink:
    def __init__(self, owner, endpoints: list[str], *, curve=None,
                 heartbeat_s: float = HEARTBEAT_S):
        self.endpoints = list(endpoints)
        self.curve = curve
        self.heartbeat_s = heartbeat_s
        self.connected = False
        self.current = 0                 # index of the endpoint in use
        self.counters = {"connects": 0, "reconnects": 0, "dropped": 0, "errors": 0}
        self._q: queue.Queue = queue.Queue(QUEUE)
        self._bytes_lock = threading.Lock()
        self._queued_bytes = 0
        self._stop = threading.Event()
        self._flush_until = 0.0
        self._thread = threading.Thread(target=_run, args=(weakref.ref(owner), self),
                                        daemon=True, name="edgert-server-link")
        self._thread.start()

    def send(self, op: str, args: dict, nbytes: int = 0) -> bool:
        """Queue a request for the server (``nbytes``: its arrays' size); False (and
        counted) when the queue is full or the link is not connected and ``nbytes`` > 0."""
        with self._bytes_lock:
            if nbytes and (not self.connected or self._queued_bytes + nbytes > QUEUE_BYTES):
                self.counters["dropped"] += 1
                return False
            try:
                self._q.put_nowait((op, args, nbytes))
            except queue.Full:
                self.counters["dropped"] += 1
                return False
            self._queued_bytes += nbytes
            return True

    def _taken(self, nbytes: int) -> None:
        with self._bytes_lock:
            self._queued_bytes -= nbytes

    def close(self, flush_s: float = 2.0) -> None:
        """Stop the thread; it sends what is queued and waits for its replies up to
        ``flush_s`` (only while connected: a gone server costs nothing)."""
        self._flush_until = time.monotonic() + flush_s
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(flush_s + 1.0)


def _run(ref, link: ServerLink) -> None:
    ctx = zmq.Context.instance()
    ids = itertools.count(1)
    backoff, k = BACKOFF_S, 0
    while not link._stop.is_set():
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.immediate = 1               # nothing queues towards a peer that is not there
        try:
            if link.curve is not None:
                curve_client(sock, *link.curve)
            link.current = k % len(link.endpoints)
            sock.connect(link.endpoints[link.current])
            healthy = _session(ref, link, sock, ids)
        except zmq.ZMQError as e:
            log.info("server link: %s", e)
            healthy = False
        finally:
            sock.close(0)
            link.connected = False
        if link._stop.is_set() or ref() is None:
            break
        backoff = BACKOFF_S if healthy else min(BACKOFF_MAX_S, backoff * 2)
        k += 1
        link.counters["reconnects"] += 1
        link._stop.wait(backoff)


def _session(ref, link: ServerLink, sock, ids) -> bool:
    """One connection, until the server goes silent or the link stops. True when it was
    registered (the next reconnect starts with a short backoff)."""
    pending: dict[int, tuple[str, dict]] = {}
    heard = time.monotonic()
    next_beat = 0.0
    registered = False

    def send(op: str, args: dict) -> bool:
        rid = next(ids)
        try:
            sock.send_multipart(encode_request(rid, op, args), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        pending[rid] = (op, args)
        return True

    next_register = 0.0
    born = time.monotonic()
    while True:
        now = time.monotonic()
        if not registered and now >= next_register:
            owner = ref()
            if owner is None:
                return False
            # NOTE: a send fails until the connection is up (immediate): retry soon
            sent = send("register", owner._link_register())
            del owner
            next_register = now + (link.heartbeat_s if sent else POLL_MS / 1000)
        stopping = link._stop.is_set()
        reg_sent = registered or "register" in (o for o, _ in pending.values())
        if stopping and (now > link._flush_until or (not pending and link._q.empty())
                         or (not reg_sent and now - born > CONNECT_GRACE_S)):
            return registered       # NOTE: a register that could not even be sent: no server
        if now - heard > LIVENESS * link.heartbeat_s:
            log.info("server link: silent for %d heartbeats; reconnecting", LIVENESS)
            return registered
        if registered:
            while len(pending) < QUEUE:
                try:
                    op, args, nbytes = link._q.get_nowait()
                except queue.Empty:
                    break
                link._taken(nbytes)
                if not send(op, args):
                    link.counters["dropped"] += 1
            if now >= next_beat and not stopping:
                owner = ref()
                if owner is None:
                    return registered
                send("beat", {"device": owner.device_id})
                del owner
                next_beat = now + link.heartbeat_s
        if not sock.poll(POLL_MS):
            continue
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            heard = time.monotonic()
            try:
                rep = decode_reply(frames)
            except ProtocolError:
                link.counters["errors"] += 1
                continue
            op, args = pending.pop(rep.id, ("?", {}))
            if op == "register" and rep.ok:
                registered = link.connected = True
                link.counters["connects"] += 1
                hb = rep.result.get("heartbeat_s") if isinstance(rep.result, dict) else None
                if isinstance(hb, (int, float)) and 0.01 <= hb <= 60:
                    link.heartbeat_s = float(hb)
            elif not rep.ok:
                link.counters["errors"] += 1
                if rep.code == "unregistered":
                    registered = link.connected = False
                    next_register = 0.0
                    if op not in ("beat", "register", "snapshot"):
                        link.send(op, args)         # sent again once registered
            owner = ref()
            if owner is None:
                return registered
            try:
                owner._link_reply(op, args, rep)
            except Exception as e:       # NOTE: a bad reply never stops the link
                link.counters["errors"] += 1
                log.warning("server link: reply to %s not usable: %s", op, e)
            del owner
