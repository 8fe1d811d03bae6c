"""The device service: one Runtime behind a ZeroMQ ROUTER socket (`edgert serve`).

    svc = Service(rt, models={"tasks": m, "lm": lm})    # bind=None: the default ipc endpoint
    svc.start()          # the socket loop on its own thread (or svc.run() on this one)
    ...
    svc.stop(); svc.wait()

One poll loop owns the ROUTER socket; nothing else touches it. It decodes each request,
checks it (protocol.py, ops.py), answers `hello`, `health` and `cancel` itself, and hands
everything else to worker threads: `stats` to a thread of its own, streams (`generate`)
to the stream pool, the rest to the worker pool. Workers never touch the ROUTER: they post
their replies to an inproc PUSH socket, and the loop forwards them from its PULL side.
Requests of one client for one model run in order (one lane per (client, model)); other
lanes run in parallel. While a request is queued or at work, its client hears a beat every
HEARTBEAT_S, so a client's timeout means "the service is silent", not "the work is long".

Stopping (`stop()`, the `shutdown` op, SIGINT/SIGTERM in `edgert serve`): new requests are
refused with "shutting_down", queued work and streams end with "cancelled", work already
running finishes, the replies are flushed, then the models are closed.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import zmq

from ..version import __version__
from . import ops
from .auth import curve_server, public_keys, start_authenticator
from .endpoint import check_endpoint, default_endpoint
from .protocol import (MAX_ARRAYS, MAX_ENVELOPE, MAX_MESSAGE, ProtocolError, decode_request,
                       encode_beat, encode_error, encode_reply, error_code, failure_id)
from .workers import CTL, Bench, Job, Outbox, describe, work

log = logging.getLogger(__name__)

POLL_MS = 100              # housekeeping period: stop requests, beats
HEARTBEAT_S = 1.0          # beats to a client waiting on queued or running work; well under
                           # the client's default 5 s timeout
BATCH = 256                # messages taken from one socket per turn: fair to the other one
ROUTER_HWM = 1024          # messages queued per peer, each way. Inbound, the per-client
                           # in-flight cap refuses long before this; outbound, a client this
                           # far behind is not reading, and its replies are dropped (counted)
SHUTDOWN_LINGER_MS = 500   # how long closing waits to flush the last replies to slow peers
MAX_QUEUED_BYTES = 1 << 30  # request bytes held by queued and running work, all clients


class Service:
    """Serves the models of one runtime. ``models``: name -> loaded model (what `edgert
    serve --pack` loaded); more come and go with load / unload / reload."""

    def __init__(self, rt, bind: str | None = None, *, models: dict | None = None,
                 workers: int = 4, max_inflight_per_client: int = 16,
                 curve_secret=None, allow_dir=None, admin_dir=None,
                 max_message: int = MAX_MESSAGE, max_queued_bytes: int = MAX_QUEUED_BYTES):
        if (curve_secret is None) != (allow_dir is None):
            raise ValueError("CURVE needs both a secret key file and an allow directory")
        if admin_dir is not None and curve_secret is None:
            raise ValueError("admin keys need CURVE (--curve-secret and --allow-dir)")
        if workers < 1 or max_inflight_per_client < 1:
            raise ValueError("workers and max_inflight_per_client must be at least 1")
        self.rt = rt
        self.table = ops.ModelTable(rt, models)
        self.max_inflight = max_inflight_per_client
        self.max_message = max_message
        self.max_queued_bytes = max_queued_bytes
        self.counters = {"requests": 0, "replies_dropped": 0, "errors": {}}
        self._admins = public_keys(admin_dir) if admin_dir is not None else None
        allowed = public_keys(allow_dir) if allow_dir is not None else None
        self._ctx = zmq.Context()
        self._auth = None
        try:
            if allowed is not None:
                self._auth = start_authenticator(self._ctx, allowed | (self._admins or set()))
            self._router = self._ctx.socket(zmq.ROUTER)
            r = self._router
            r.linger = 0
            r.maxmsgsize = max_message
            r.rcvhwm = r.sndhwm = ROUTER_HWM
            r.router_mandatory = 1        # a reply to a gone or stuck peer raises: counted
            if curve_secret is not None:
                curve_server(r, curve_secret)
            endpoint = check_endpoint(bind) if bind else default_endpoint()
            r.bind(endpoint)
            self.endpoint = r.last_endpoint.decode()
            addr = f"inproc://edgert-results-{id(self)}"
            self._results = self._ctx.socket(zmq.PULL)
            self._results.rcvhwm = 0
            self._results.linger = 0
            self._results.bind(addr)
            self._outbox = Outbox(self._ctx, addr)
        except BaseException:
            self._close_sockets()
            raise
        self._bench = Bench(self.table, self._outbox)
        self._pools = {"work": ThreadPoolExecutor(workers, "edgert-serve-work"),
                       "stream": ThreadPoolExecutor(workers, "edgert-serve-stream"),
                       "stats": ThreadPoolExecutor(1, "edgert-serve-stats")}
        # loop state: touched by the loop thread only
        self._seq = itertools.count()
        self._jobs: dict[int, Job] = {}
        self._by_request: dict[tuple[bytes, int], Job] = {}
        self._inflight: dict[bytes, int] = {}
        self._lanes: dict[tuple, deque[Job]] = {}
        self._queued_bytes = 0
        self._stopping = False
        self._stop_asked = False          # set from any thread or a signal handler
        self._thread: threading.Thread | None = None
        self._ran = False
        self._done = threading.Event()

    # --- life ---------------------------------------------------------------------------------
    def start(self) -> "Service":
        """Run the loop on a thread of its own."""
        self._ran = True
        self._thread = threading.Thread(target=self.run, name="edgert-serve-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the loop to stop (thread-safe, signal-safe); it finishes as described above."""
        self._stop_asked = True

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def close(self) -> None:
        """Stop and wait; or, when the loop never ran, close what __init__ opened."""
        if self._ran:
            self.stop()
            self._done.wait()
        elif not self._done.is_set():
            self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self) -> None:
        """The socket loop, until stopped; then everything is closed."""
        self._ran = True
        try:
            self._loop()
        except Exception:
            log.exception("the service loop failed; stopping")
            for job in self._jobs.values():
                job.why = "the service failed"
                job.cancel.set()
        finally:
            self._close()

    def _close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self._router.linger = SHUTDOWN_LINGER_MS
        self._close_sockets()
        try:
            self.table.close()
        finally:
            self._done.set()

    def _close_sockets(self) -> None:
        for name in ("_outbox", "_results", "_router"):
            s = getattr(self, name, None)
            if s is not None:
                s.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    # --- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._results, zmq.POLLIN)
        next_beat = time.monotonic() + HEARTBEAT_S
        while True:
            ready = dict(poller.poll(POLL_MS))
            if self._results in ready:
                self._drain(self._results, self._on_result)
            if self._router in ready:
                self._drain(self._router, self._on_request)
            if self._stop_asked and not self._stopping:
                self._begin_stop()
            if self._stopping and not self._jobs:
                return
            now = time.monotonic()
            if now >= next_beat:
                self._beat(now)
                next_beat = now + HEARTBEAT_S

    def _drain(self, sock: zmq.Socket, handle) -> None:
        for _ in range(BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    def _send(self, ident: bytes, frames: list) -> None:
        try:
            self._router.send_multipart([ident, *frames], zmq.NOBLOCK, copy=False)
        except (zmq.Again, zmq.ZMQError):     # peer gone (EHOSTUNREACH) or not reading
            self.counters["replies_dropped"] += 1

    def _error(self, ident: bytes, rid, code: str, message: str) -> None:
        errs = self.counters["errors"]
        errs[code] = errs.get(code, 0) + 1
        self._send(ident, encode_error(rid, code, message))

    # --- requests -----------------------------------------------------------------------------
    def _on_request(self, frames: list) -> None:
        if len(frames) < 2:
            return          # a ROUTER always prepends the identity; nothing to answer
        ident, payload = frames[0].bytes, frames[1:]
        self.counters["requests"] += 1
        try:
            req = decode_request(payload)
        except ProtocolError as e:
            self._error(ident, failure_id(e), e.code, e.message)
            return
        try:
            self._dispatch(ident, payload[0], req)
        except ProtocolError as e:
            self._error(ident, req.id, e.code, e.message)
        except Exception as e:    # a check raised what it should not have: still an answer
            code = error_code(e)
            if code == "internal":
                log.exception("while checking %s", req.op)
            self._error(ident, req.id, code, describe(e))

    def _dispatch(self, ident: bytes, first, req) -> None:
        op = req.op
        args = ops.check_args(op, req.args)
        if op == "health":
            self._send(ident, encode_reply(req.id, self._health()))
            return
        if op == "hello":
            self._send(ident, encode_reply(req.id, ops.hello(self.table, __version__,
                                                             self.limits())))
            return
        if op == "cancel":
            self._send(ident, encode_reply(req.id, {"cancelled": self._cancel(ident,
                                                                              args["id"])}))
            return
        if self._stopping:
            raise ProtocolError("shutting_down", "the service is shutting down")
        if op in ops.ADMIN_OPS and self._admins is not None:
            user = first.get("User-Id")
            if user.encode() not in self._admins:
                raise ProtocolError("forbidden", f"{op} is for admin keys only")
        if op == "shutdown":
            self._send(ident, encode_reply(req.id, {"stopping": True}))
            self._stop_asked = True
            return
        if (ident, req.id) in self._by_request:
            raise ProtocolError("bad_request", f"request id {req.id} is already at work")
        if self._inflight.get(ident, 0) >= self.max_inflight:
            raise ProtocolError("busy", f"{self.max_inflight} requests of this client are "
                                "at work already; wait for a reply")
        if self._queued_bytes + req.nbytes > self.max_queued_bytes:
            raise ProtocolError("busy", "the service holds as much queued input as it takes")
        model = lane = None
        kind = ops.MODEL_KIND.get(op)
        if kind is not None:
            model, m = self.table.resolve(args["model"], kind)
            self.table.check(op, model, m, args)
            lane = (ident, model)
        elif op in ("load", "unload", "reload"):
            lane = (ident, "admin")         # one client's admin ops run in order
        self._admit(Job(next(self._seq), ident, req.id, op, args, lane, model, req.nbytes))

    def _health(self) -> dict:
        return {"status": "stopping" if self._stopping else "ok",
                "models": len(self.table.names()), "jobs": len(self._jobs)}

    def limits(self) -> dict:
        return {"max_message": self.max_message, "max_envelope": MAX_ENVELOPE,
                "max_arrays": MAX_ARRAYS, "max_inflight_per_client": self.max_inflight}

    def stats_of_service(self) -> dict:
        return {"endpoint": self.endpoint, "jobs": len(self._jobs),
                "clients": len(self._inflight), "queued_bytes": self._queued_bytes,
                "curve": self._auth is not None, **self.counters,
                "errors": dict(self.counters["errors"])}

    # --- jobs ---------------------------------------------------------------------------------
    def _admit(self, job: Job) -> None:
        job.heard = time.monotonic()
        self._jobs[job.seq] = job
        self._by_request[(job.ident, job.rid)] = job
        self._inflight[job.ident] = self._inflight.get(job.ident, 0) + 1
        self._queued_bytes += job.nbytes
        if job.lane is None:
            self._start(job)
            return
        lane = self._lanes.setdefault(job.lane, deque())
        lane.append(job)
        if len(lane) == 1:
            self._start(job)

    def _start(self, job: Job) -> None:
        job.started = True
        if job.op == "stats":
            job.args["service"] = self.stats_of_service()   # loop state, read on the loop
            pool = self._pools["stats"]
        else:
            pool = self._pools["stream" if job.op in ops.STREAM_OPS else "work"]
        pool.submit(work, self._bench, job)

    def _on_result(self, frames: list) -> None:
        seq, final = CTL.unpack(frames[0].bytes)
        job = self._jobs.get(seq)
        if job is not None:
            job.heard = time.monotonic()
            if final:
                self._finish(job)         # NOTE: first: a client that has its reply sees the
                                          # job gone (its in-flight count, stats, health)
        self._send(frames[1].bytes, frames[2:])

    def _finish(self, job: Job) -> None:
        del self._jobs[job.seq]
        self._by_request.pop((job.ident, job.rid), None)
        n = self._inflight[job.ident] - 1
        if n:
            self._inflight[job.ident] = n
        else:
            del self._inflight[job.ident]       # nothing kept for idle clients
        self._queued_bytes -= job.nbytes
        if job.lane is None:
            return
        lane = self._lanes[job.lane]
        lane.remove(job)
        if not lane:
            del self._lanes[job.lane]
        elif not lane[0].started:
            self._start(lane[0])

    def _cancel(self, ident: bytes, rid: int, why: str = "cancelled by the client") -> bool:
        job = self._by_request.get((ident, rid))
        if job is None:
            return False
        job.why = why
        job.cancel.set()                  # a running stream sees it before its next token
        if not job.started:
            self._error(ident, rid, "cancelled", why)
            self._finish(job)
        return True

    def _begin_stop(self) -> None:
        self._stopping = True
        for job in self._jobs.values():
            if job.op in ops.STREAM_OPS or not job.started:
                # NOTE: flagged, not finished here: a queued job still starts in its turn,
                # and _work answers "cancelled" at once; running work other than streams ends
                job.why = "the service is shutting down"
                job.cancel.set()

    def _beat(self, now: float) -> None:
        for job in self._jobs.values():
            if now - job.heard >= HEARTBEAT_S:
                self._send(job.ident, encode_beat(job.rid))
                job.heard = now


