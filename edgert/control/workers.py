"""The device service's work, on worker threads: what a job is, how its replies reach the
socket loop (the Outbox), and the function each worker runs. Nothing here touches the
ROUTER socket or the loop's state; a job's ``cancel`` event is the one thing both share.
"""
from __future__ import annotations

import logging
import math
import struct
import threading
import time
from dataclasses import dataclass, field

import zmq

from . import ops
from .protocol import ProtocolError, encode_error, encode_reply, error_code

log = logging.getLogger(__name__)
CTL = struct.Struct("<QBd")   # the loop's header on a posted reply: job seq, final, CPU
                              # seconds the job spent after its caller had gone
STREAM_INTERVAL_S = 0.02      # a stream replies at most this often, each reply carrying the
                              # pieces made since the last: at hundreds of tokens/s a reply
                              # per token costs the generation ~10% (wakeups of the loop, the
                              # I/O threads and the client per token). A piece waits at most
                              # this plus one token; slower streams send every piece at once.


@dataclass(eq=False)
class Job:
    seq: int
    ident: bytes
    rid: int
    op: str
    args: dict
    lane: tuple | None
    model: str | None
    nbytes: int
    caller: bytes = b""          # whom the caps count it against (CURVE key or socket)
    tokens: int = 0              # generation tokens admitted for it
    cancel: threading.Event = field(default_factory=threading.Event)
    why: str = ""                # why it was cancelled
    code: str = "cancelled"      # the error code it ends with when cancelled
    gone: float | None = None    # when its caller vanished (monotonic), set by the loop
    started: bool = False
    heard: float = 0.0           # when its client last heard about it
    cpu_mark: float = 0.0        # worker thread CPU time when the job last found its caller
                                 # alive (an upper bound for what it spent on nobody)

    def retire(self, why: str) -> None:
        """End the job at its next step with ``reloaded`` (its model is being replaced)."""
        self.why, self.code = why, "reloaded"
        self.cancel.set()

    def alive(self) -> bool:
        """False once cancelled; otherwise moves the CPU mark (the caller is still there)."""
        if self.cancel.is_set():
            return False
        self.cpu_mark = time.thread_time()
        return True


class Outbox:
    """Workers' side of the inproc pipe to the loop. One PUSH socket behind a lock (a zmq
    socket may change threads between calls, never be used by two at once)."""

    def __init__(self, ctx: zmq.Context, addr: str):
        self._sock = ctx.socket(zmq.PUSH)
        # NOTE: unbounded, so a worker never waits on the loop (a stopping loop could not
        # drain it). What workers post is bounded by the work the loop admitted.
        self._sock.sndhwm = 0
        self._sock.linger = 0
        self._sock.connect(addr)
        self._lock = threading.Lock()

    def post(self, job: Job, frames: list, final: bool) -> None:
        orphan = 0.0
        if final and job.gone is not None:
            orphan = max(0.0, time.thread_time() - job.cpu_mark)
        with self._lock:
            self._sock.send_multipart([CTL.pack(job.seq, final, orphan), job.ident, *frames],
                                      copy=False)

    def close(self) -> None:
        with self._lock:
            self._sock.close(linger=0)


@dataclass
class Bench:
    """What a worker needs, and nothing of the Service (which a thread must not keep)."""
    table: ops.ModelTable
    outbox: Outbox


# --- the work ---------------------------------------------------------------------------------
def work(bench: Bench, job: Job) -> None:
    job.cpu_mark = time.thread_time()
    release = None
    try:
        if not job.alive():
            raise _Cancelled(job.why)
        if job.model is not None:
            m, release = bench.table.lease(job.model, lambda: job.retire(
                f"model {job.model!r} was reloaded or unloaded while this request ran; it "
                "ended after the drain timeout: send it again"))
        if job.op in ops.STREAM_OPS:
            _stream(bench, job, m)
            return
        result = _RUN[job.op](bench.table, job) if job.model is None else \
            _ON_MODEL[job.op](m, job.args)
        frames = encode_reply(job.rid, result)
    except Exception as e:
        frames = _failure(job, e)
    finally:
        if release is not None:
            release()
    bench.outbox.post(job, frames, final=True)


def _stream(bench: Bench, job: Job, m) -> None:
    """Pieces leave in replies of one or more, at most every STREAM_INTERVAL_S; the first at
    once. The cancel flag is looked at between tokens. The final reply says why it stopped."""
    n, pending, last = 0, [], -math.inf

    def flush():
        nonlocal pending, last
        bench.outbox.post(job, encode_reply(job.rid, pending, more=True), final=False)
        pending, last = [], time.monotonic()

    try:
        it = ops.generate(m, job.args)
        try:
            for piece in it:
                pending.append(piece)
                n += 1
                if time.monotonic() - last >= STREAM_INTERVAL_S:
                    flush()
                if not job.alive():           # NOTE: checked before the next token is made
                    raise _Cancelled(job.why)
        finally:
            it.close()                        # gives the sequence's KV pages back
        if pending:
            flush()
        frames = encode_reply(job.rid, {"pieces": n,
                                        "stop": getattr(it, "stop_reason", None)})
    except Exception as e:
        if pending and not isinstance(e, _Cancelled):
            flush()                           # what was made before the failure
        frames = _failure(job, e)
    bench.outbox.post(job, frames, final=True)


class _Cancelled(Exception):
    pass


def _failure(job: Job, e: Exception) -> list:
    if isinstance(e, _Cancelled):
        return encode_error(job.rid, job.code, str(e) or "cancelled")
    code = error_code(e)
    if code == "internal":
        log.exception("%s failed", job.op)
    return encode_error(job.rid, code, describe(e))


def describe(e: BaseException) -> str:
    msg = e.message if isinstance(e, ProtocolError) else str(e)
    return msg if error_code(e) != "internal" else f"{type(e).__name__}: {msg}"


_ON_MODEL = {"switch": ops.switch, "infer": ops.infer, "prewarm": ops.prewarm}
_RUN = {
    "stats": lambda t, j: ops.stats(t, j.args["model"], j.args["service"]),
    "load": lambda t, j: t.load(j.args["path"], j.args["name"], j.args["options"]),
    "unload": lambda t, j: t.unload(j.args["name"]),
    "reload": lambda t, j: t.reload(j.args["name"], j.args["path"]),
}
