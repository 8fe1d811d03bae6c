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

Work belongs to a live caller: a reply, a stream piece or a beat that libzmq cannot route
(ROUTER_MANDATORY: the peer's connection is gone) marks the peer gone, and every job it had
queued or running is cancelled at once; queued jobs are beaten every BEAT_S, so a vanished
caller is found within that. Caps on jobs and on admitted generation tokens hold per caller
(its CURVE key where CURVE is on, else its socket) and for the whole service (the device
config's `service:` section); past one, `busy` with a retry hint, before any work.

Stopping (`stop()`, the `shutdown` op, SIGINT/SIGTERM in `edgert serve`): new requests are
refused with "shutting_down", queued work and streams end with "cancelled", work already
running finishes, the replies are flushed, then the models are closed.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import zmq

from ..heap import give_back_heap
from ..version import __version__
from . import ops
from .auth import curve_server, public_keys, start_authenticator
from .endpoint import bind_router, check_endpoint, check_plain_tcp, default_endpoint
from .protocol import (DTYPES, MAX_ARRAYS, MAX_ENVELOPE, MAX_MESSAGE, ProtocolError,
                       decode_request, encode_beat, encode_error, encode_reply, error_code,
                       failure_id)
from .workers import CTL, Bench, Job, Outbox, describe, work

log = logging.getLogger(__name__)

POLL_MS = 100              # housekeeping period: stop requests, beats
HEARTBEAT_S = 0.5          # beats to a client waiting on queued or running work: well under
                           # the client's default 2 s timeout, and the probe that finds a
                           # vanished caller (a beat it cannot be sent) within a second
RETRY_AFTER_S = 1.0        # the hint sent with "busy": about one beat of the work ahead
BATCH = 256                # messages taken from one socket per turn: fair to the other one
ROUTER_HWM = 1024          # messages queued per peer, each way. Inbound, the per-client
                           # in-flight cap refuses long before this; outbound, a client this
                           # far behind is not reading, and its replies are dropped (counted)
PING_MS = 1000             # ZMTP heartbeats on every connection: a peer whose process is
PING_TIMEOUT_MS = 5000     # stopped or hung (it holds the connection but libzmq in it does
                           # not answer PING) is disconnected after this, and its jobs end
SHUTDOWN_LINGER_MS = 500   # how long closing waits to flush the last replies to slow peers
CAPS = ("client_jobs", "service_jobs", "client_tokens", "service_tokens", "queued_bytes")
STATS_RESERVE = 4          # `stats` requests admitted past max_jobs, so an operator can read a
                           # full service (each still counts against its caller's own cap)
CURVE_SLACK = 1024         # CURVE wraps each frame in a MESSAGE command (name, nonce, MAC,
                           # flags: 33 bytes) and libzmq checks ZMQ_MAXMSGSIZE on that wire
                           # size, so the socket option gets this slack over max_message
TRIM_IDLE_S = 0.5          # idle this long after work: the C heap's free pages go back to
                           # the OS (heap.py), so RSS follows what is in use


class Service:
    """Serves the models of one runtime. ``models``: name -> loaded model (what `edgert
    serve --pack` loaded); more come and go with load / unload / reload."""

    def __init__(self, rt, bind: str | None = None, *, models: dict | None = None,
                 limits=None, workers: int | None = None,
                 max_inflight_per_client: int | None = None, curve_secret=None,
                 allow_dir=None, admin_dir=None, max_message: int | None = None,
                 max_queued_bytes: int | None = None, pack_dirs=None):
        """``limits``: a config.ServiceLimits (default: the runtime's config's ``service``);
        ``workers``, ``max_inflight_per_client`` and ``max_queued_bytes`` override it.
        ``max_message``: the largest frame (default: what the served models can take).
        ``pack_dirs``: directories `load` and `reload` may take packs from."""
        if (curve_secret is None) != (allow_dir is None):
            raise ValueError("CURVE needs both a secret key file and an allow directory")
        if admin_dir is not None and curve_secret is None:
            raise ValueError("admin keys need CURVE (--curve-secret and --allow-dir)")
        lim = limits if limits is not None else rt.config.service
        over = {k: v for k, v in (("workers", workers),
                                  ("max_jobs_per_client", max_inflight_per_client),
                                  ("max_queued_bytes", max_queued_bytes)) if v is not None}
        lim = dataclasses.replace(lim, **over)
        if lim.workers < 1 or lim.max_jobs_per_client < 1 or lim.max_queued_bytes < 1:
            raise ValueError("workers, max_inflight_per_client and max_queued_bytes must be "
                             "at least 1")
        if lim.max_jobs < lim.max_jobs_per_client:
            lim = dataclasses.replace(lim, max_jobs=lim.max_jobs_per_client)
        self.rt = rt
        self.lim = lim
        self.table = ops.ModelTable(rt, models, pack_dirs=pack_dirs,
                                    drain_timeout_s=lim.drain_timeout_s)
        self._fixed_message = max_message
        self.max_message = max_message or frame_limit(self.table, lim, rt.config.budget.total)
        self.max_queued_bytes = lim.max_queued_bytes
        self.counters = {"requests": 0, "replies_dropped": 0, "errors": {},
                         "caps": dict.fromkeys(CAPS, 0), "disconnects": 0,
                         "orphaned": {"jobs": 0, "cpu_s": 0.0}, "heap_trims": 0}
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
            r.maxmsgsize = self._wire_limit(curve_secret is not None)
            r.rcvhwm = r.sndhwm = ROUTER_HWM
            r.router_mandatory = 1        # a reply to a gone peer raises: how we find it gone
            r.heartbeat_ivl, r.heartbeat_timeout = PING_MS, PING_TIMEOUT_MS
            if curve_secret is not None:
                curve_server(r, curve_secret)
            endpoint = check_endpoint(bind or default_endpoint())
            check_plain_tcp(endpoint, curve_secret is not None)
            bind_router(r, endpoint)
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
        self._pools = {"work": ThreadPoolExecutor(lim.workers, "edgert-serve-work"),
                       "stream": ThreadPoolExecutor(lim.workers, "edgert-serve-stream"),
                       "stats": ThreadPoolExecutor(1, "edgert-serve-stats")}
        # loop state: touched by the loop thread only
        self._seq = itertools.count()
        self._jobs: dict[int, Job] = {}
        self._by_request: dict[tuple[bytes, int], Job] = {}
        self._inflight: dict[bytes, int] = {}       # caller -> jobs
        self._tokens: dict[bytes, int] = {}         # caller -> admitted generation tokens
        self._tokens_total = 0
        self._lanes: dict[tuple, deque[Job]] = {}
        self._queued_bytes = 0
        self._worked_at: float | None = None     # when the last job ended, until trimmed
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
            if self._worked_at is not None and not self._jobs \
                    and now - self._worked_at >= TRIM_IDLE_S:
                self._worked_at = None
                give_back_heap()
                self.counters["heap_trims"] += 1

    def _drain(self, sock: zmq.Socket, handle) -> None:
        for _ in range(BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    def _send(self, ident: bytes, frames: list) -> bool:
        try:
            self._router.send_multipart([ident, *frames], zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:                     # the peer is not reading: its queue is full
            self.counters["replies_dropped"] += 1
        except zmq.ZMQError as e:
            self.counters["replies_dropped"] += 1
            if e.errno == zmq.EHOSTUNREACH:   # its connection is gone
                self._gone(ident)
        return False

    def _error(self, ident: bytes, rid, code: str, message: str,
               retry_after_s: float | None = None) -> None:
        errs = self.counters["errors"]
        errs[code] = errs.get(code, 0) + 1
        self._send(ident, encode_error(rid, code, message, retry_after_s))

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
            self._error(ident, req.id, e.code, e.message, getattr(e, "retry_after_s", None))
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
        caller = caller_of(ident, first) if self._auth is not None else ident
        tokens = args["max_new_tokens"] if op in ops.STREAM_OPS else 0
        self._check_caps(caller, tokens, req.nbytes, op)
        model = lane = None
        kind = ops.MODEL_KIND.get(op)
        if kind is not None:
            model, m = self.table.resolve(args["model"], kind)
            self.table.check(op, model, m, args)
            lane = (ident, model)
        elif op in ("load", "unload", "reload"):
            lane = (ident, "admin")         # one client's admin ops run in order
        self._admit(Job(next(self._seq), ident, req.id, op, args, lane, model, req.nbytes,
                        caller=caller, tokens=tokens))

    def _check_caps(self, caller: bytes, tokens: int, nbytes: int, op: str) -> None:
        """``busy`` (with a retry hint) past a cap; ``too_large`` for what never fits."""
        lim = self.lim
        max_jobs = lim.max_jobs + (STATS_RESERVE if op == "stats" else 0)
        if tokens > lim.max_tokens_per_client:
            raise ProtocolError("too_large", f"max_new_tokens {tokens} is more than this "
                                f"service admits for one caller ({lim.max_tokens_per_client})")
        if nbytes > self.max_queued_bytes:
            raise ProtocolError("too_large", f"a request of {nbytes} bytes is more than this "
                                f"service queues ({self.max_queued_bytes})")
        for cap, over, what in (
                ("client_jobs", self._inflight.get(caller, 0) >= lim.max_jobs_per_client,
                 f"{lim.max_jobs_per_client} requests of this caller are at work already"),
                ("service_jobs", len(self._jobs) >= max_jobs,
                 f"the service has {len(self._jobs)} requests at work already"),
                ("client_tokens", self._tokens.get(caller, 0) + tokens >
                 lim.max_tokens_per_client, f"this caller's generations hold "
                 f"{self._tokens.get(caller, 0)} of its {lim.max_tokens_per_client} tokens"),
                ("service_tokens", self._tokens_total + tokens > lim.max_tokens,
                 f"generations hold {self._tokens_total} of the service's "
                 f"{lim.max_tokens} tokens"),
                ("queued_bytes", self._queued_bytes + nbytes > self.max_queued_bytes,
                 "the service holds as much queued input as it takes")):
            if over:
                self.counters["caps"][cap] += 1
                e = ProtocolError("busy", f"{what}; retry after a reply")
                e.retry_after_s = RETRY_AFTER_S
                raise e

    def _health(self) -> dict:
        return {"status": "stopping" if self._stopping else "ok",
                "models": len(self.table.names()), "jobs": len(self._jobs)}

    def limits(self) -> dict:
        lim = self.lim
        return {"max_message": self.max_message, "max_envelope": MAX_ENVELOPE,
                "max_arrays": MAX_ARRAYS, "max_inflight_per_client": lim.max_jobs_per_client,
                "max_jobs": lim.max_jobs, "max_tokens_per_client": lim.max_tokens_per_client,
                "max_tokens": lim.max_tokens, "max_queued_bytes": self.max_queued_bytes,
                "drain_timeout_s": lim.drain_timeout_s}

    def stats_of_service(self) -> dict:
        c = self.counters
        return {"endpoint": self.endpoint, "jobs": len(self._jobs),
                "clients": len(self._inflight), "queued_bytes": self._queued_bytes,
                "admitted_tokens": self._tokens_total, "curve": self._auth is not None,
                "limits": self.limits(), **c, "errors": dict(c["errors"]),
                "caps": dict(c["caps"]), "orphaned": dict(c["orphaned"])}

    # --- jobs ---------------------------------------------------------------------------------
    def _admit(self, job: Job) -> None:
        job.heard = time.monotonic()
        self._jobs[job.seq] = job
        self._by_request[(job.ident, job.rid)] = job
        self._inflight[job.caller] = self._inflight.get(job.caller, 0) + 1
        if job.tokens:
            self._tokens[job.caller] = self._tokens.get(job.caller, 0) + job.tokens
            self._tokens_total += job.tokens
        self._queued_bytes += job.nbytes
        if job.lane is None:
            self._start(job)
            return
        lane = self._lanes.setdefault(job.lane, deque())
        lane.append(job)
        if len(lane) == 1:
            self._start(job)

    def _start(self, job: Job) -> None:
        if job.gone is not None:          # its caller left while it waited: nothing to run
            self._finish(job)
            return
        job.started = True
        if job.op == "stats":
            job.args["service"] = self.stats_of_service()   # loop state, read on the loop
            pool = self._pools["stats"]
        else:
            pool = self._pools["stream" if job.op in ops.STREAM_OPS else "work"]
        pool.submit(work, self._bench, job)

    def _on_result(self, frames: list) -> None:
        seq, final, orphan_cpu = CTL.unpack(frames[0].bytes)
        job = self._jobs.get(seq)
        if job is not None:
            job.heard = time.monotonic()
            if final:
                self.counters["orphaned"]["cpu_s"] += orphan_cpu
                self._finish(job)         # NOTE: first: a client that has its reply sees the
                                          # job gone (its in-flight count, stats, health)
                if job.op in ("load", "reload") and self._fixed_message is None:
                    self._resize_frames()
            if job.gone is not None:
                return                    # nobody to tell
        self._send(frames[1].bytes, frames[2:])

    def _finish(self, job: Job) -> None:
        del self._jobs[job.seq]
        self._worked_at = time.monotonic()
        self._by_request.pop((job.ident, job.rid), None)
        _take(self._inflight, job.caller, 1)       # nothing kept for idle callers
        if job.tokens:
            _take(self._tokens, job.caller, job.tokens)
            self._tokens_total -= job.tokens
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

    def _gone(self, ident: bytes) -> None:
        """``ident``'s connection is gone: cancel its running jobs, drop its queued ones."""
        mine = [j for j in self._jobs.values() if j.ident == ident and j.gone is None]
        if not mine:
            return
        self.counters["disconnects"] += 1
        self.counters["orphaned"]["jobs"] += len(mine)
        now = time.monotonic()
        for job in mine:
            job.gone = now
            job.why = "the caller disconnected"
            job.cancel.set()
        for job in mine:
            if not job.started and job.seq in self._jobs:
                self._finish(job)

    def _resize_frames(self) -> None:
        """A load changed what the models take: new connections get the new frame limit."""
        self.max_message = frame_limit(self.table, self.lim, self.rt.config.budget.total)
        self._router.maxmsgsize = self._wire_limit(self._auth is not None)

    def _wire_limit(self, curve: bool) -> int:
        """ZMQ_MAXMSGSIZE for a frame limit of max_message: on the wire, CURVE adds a few bytes."""
        return self.max_message + (CURVE_SLACK if curve else 0)

    def _begin_stop(self) -> None:
        self._stopping = True
        for job in self._jobs.values():
            if job.op in ops.STREAM_OPS or not job.started:
                # NOTE: flagged, not finished here: a queued job still starts in its turn,
                # and _work answers "cancelled" at once; running work other than streams ends
                job.why = "the service is shutting down"
                job.cancel.set()

    def _beat(self, now: float) -> None:
        for job in list(self._jobs.values()):
            if job.gone is None and now - job.heard >= HEARTBEAT_S:
                job.heard = now
                self._send(job.ident, encode_beat(job.rid))


def _take(counts: dict, key, n: int) -> None:
    left = counts[key] - n
    if left:
        counts[key] = left
    else:
        del counts[key]


def caller_of(ident: bytes, frame) -> bytes:
    """Whom a request counts against: the CURVE public key the ZAP handler let in (the
    same for every socket of that key), else the socket."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return ident
    return user.encode() if user else ident


def frame_limit(table, lim, total: int) -> int:
    """The largest frame the service takes (ZMQ_MAXMSGSIZE, checked by libzmq as it reads):
    what the served task models take in one request of ``lim.max_batch`` items, at least
    the envelope limit, at most the memory budget and MAX_MESSAGE. An input with a dynamic
    dimension other than the batch cannot be sized: then the budget decides."""
    need = MAX_ENVELOPE
    for _, m in table.items():
        for dtype, shape in getattr(getattr(m, "engine", None), "inputs", {}).values() \
                if m.kind == "tasks" else ():
            dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
            if dims and dims[0] is None:
                dims[0] = lim.max_batch
            if None in dims:
                need = max(need, min(MAX_MESSAGE, total))
                continue
            need = max(need, DTYPES.get(getattr(dtype, "name", str(dtype)),
                                        DTYPES["float32"]).itemsize * math.prod(dims))
    return int(min(need, MAX_MESSAGE, max(total, MAX_ENVELOPE)))
