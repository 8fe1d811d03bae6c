"""TierWriter: the KV cache's one background thread, writing pages to the host and disk tiers.

It runs ``run(job)`` for each job in FIFO order. NOTE: the thread holds the queue, the
gauge and a weak reference to `run` (a `weakref.WeakMethod`), never its owner, so dropping
the KV cache ends it; `close()` stops it after the jobs already queued (that is how closing
a model leaves every full chunk on disk).

The writer is bounded in bytes: each job states the bytes of the pages it needs, and the
jobs queued or running never need more than `bound` together (one job larger than the
bound runs alone). NOTE: at the bound, `submit` waits (back-pressure: a prefill waits
for the disk) rather than dropping the job: every job is a page copy or a full chunk the
docs promise reaches the disk, and a dropped one is paid later by a recompute. Waits are
counted (``waits``, ``wait_s``) so a disk slower than prefill shows in the stats.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import weakref

log = logging.getLogger(__name__)
_STOP = object()


class _Gauge:
    """Bytes of the jobs queued or running, and the condition producers wait on."""

    def __init__(self, bound: int):
        self.bound = int(bound)
        self.held = 0
        self.peak = 0
        self.waits = 0
        self.wait_s = 0.0
        self.closed = False
        self.cond = threading.Condition()

    def admit(self, nbytes: int) -> bool:
        """Wait until `nbytes` more fit the bound (or nothing is held), then hold them;
        False when the writer is closed."""
        with self.cond:
            if self.held and self.held + nbytes > self.bound and not self.closed:
                t0 = time.perf_counter()
                self.waits += 1
                self.cond.wait_for(lambda: self.closed or not self.held
                                   or self.held + nbytes <= self.bound)
                self.wait_s += time.perf_counter() - t0
            if self.closed:
                return False
            self.held += nbytes
            self.peak = max(self.peak, self.held)
            return True

    def release(self, nbytes: int) -> None:
        with self.cond:
            self.held -= nbytes
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class TierWriter:
    def __init__(self, run: weakref.WeakMethod, bound: int, name: str = "edgert-kv-writer"):
        """`bound`: bytes the queued and running jobs may need together (> 0)."""
        if bound <= 0:
            raise ValueError(f"kv tier writer: bound must be > 0 bytes, got {bound}")
        # NOTE: the queue itself has no maxsize; the gauge bounds it (each job holds >= 1 byte)
        self._jobs: queue.Queue = queue.Queue()
        self._gauge = _Gauge(bound)
        self._thread: threading.Thread | None = threading.Thread(
            target=_loop, args=(run, self._jobs, self._gauge), name=name, daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, _stop, self._jobs, self._gauge)

    @property
    def bound(self) -> int:
        return self._gauge.bound

    def admit(self, nbytes: int) -> bool:
        """Hold `nbytes` for a job about to be submitted, waiting while the writer is at its
        bound. False (nothing held) once the writer is closed. Then `submit` the job."""
        return self._gauge.admit(nbytes)

    def submit(self, job, nbytes: int) -> None:
        """Queue `job`, whose `nbytes` were admitted."""
        self._jobs.put((job, nbytes))

    def drain(self) -> None:
        """Wait until every queued job is done."""
        if self._thread is not None:
            self._jobs.join()

    def close(self) -> None:
        """Stop after the jobs queued so far and wait for the thread. Idempotent."""
        self._stop()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout=60)

    def stats(self) -> dict:
        g = self._gauge
        with g.cond:
            return {"bound": g.bound, "held_bytes": g.held, "peak_bytes": g.peak,
                    "waits": g.waits, "wait_s": g.wait_s}


def _stop(jobs: queue.Queue, gauge: _Gauge) -> None:
    gauge.close()
    jobs.put((_STOP, 0))


def _loop(run: weakref.WeakMethod, jobs: queue.Queue, gauge: _Gauge) -> None:
    while True:
        job, nbytes = jobs.get()
        try:
            if job is _STOP:
                return
            fn = run()
            if fn is None:
                return
            try:
                fn(job)
            except Exception:   # NOTE: a failed job must not end the writer (drain would hang)
                log.exception("kv tier write failed; the writer goes on")
            del fn
        finally:
            gauge.release(nbytes)
            jobs.task_done()
