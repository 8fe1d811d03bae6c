"""PrefetchWorker: the expert cache's one background thread and its queue of read jobs.

The worker knows nothing of slots or experts: it hands each job to `run` in priority order.
The cache front (`cache.py`) queues the jobs and runs them (`ExpertCache._prefetch`).

NOTE: the thread holds the queue and a weak reference to `run` (a `weakref.WeakMethod`),
never its owner, so dropping the cache drops this worker; the worker's finalizer then
cancels the queued jobs and stops the thread.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import weakref

log = logging.getLogger(__name__)

AHEAD = 0    # routed experts that acquire will need next: before any hint
HINT = 1     # predicted experts of an upcoming layer
_STOP = -1   # before every job: nothing queued runs once the worker is closed


class _Jobs:
    """The queue and whether it is closed; shared by the worker, its thread and its finalizer."""

    def __init__(self):
        self.queue: queue.PriorityQueue = queue.PriorityQueue()   # (priority, order, job)
        self.order = itertools.count()
        self.lock = threading.Lock()      # NOTE: orders submit against cancel: none slips past
        self.closed = False


class PrefetchWorker:
    """One daemon thread running `run(*job)` per job, lowest priority first, FIFO within one.

    `close()` drops the queued jobs (they never run), waits for the job running, if any,
    however long it takes, and ends the thread. Jobs submitted after close are dropped.
    """

    def __init__(self, run: weakref.WeakMethod, name: str = "edgert-expert-prefetch"):
        self._jobs = jobs = _Jobs()
        self._thread: threading.Thread | None = threading.Thread(
            target=_loop, args=(run, jobs), name=name, daemon=True)
        self._thread.start()
        self._cancel = weakref.finalize(self, _cancel, jobs)

    @property
    def closed(self) -> bool:
        """True once close() has dropped the queued jobs."""
        with self._jobs.lock:
            return self._jobs.closed

    def submit(self, priority: int, job: tuple) -> None:
        jobs = self._jobs
        with jobs.lock:
            if not jobs.closed:
                jobs.queue.put((priority, next(jobs.order), job))

    def drain(self) -> None:
        """Wait until every queued job is done (or dropped by close)."""
        self._jobs.queue.join()

    def close(self) -> None:
        """Drop the queued jobs, wait for the one running, end the thread. Idempotent."""
        self._cancel()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join()   # NOTE: no timeout: the owner ends a running job soon (cache: one read)


def _loop(run: weakref.WeakMethod, jobs: _Jobs) -> None:
    """Runs jobs while their owner lives; the stop job or a dead owner ends it."""
    while True:
        _, _, job = jobs.queue.get()
        try:
            fn = run() if job is not None else None
            if fn is None:
                return
            try:
                fn(*job)
            except Exception:   # NOTE: a failed job must not end the worker (drain would hang)
                log.exception("expert prefetch job failed; prefetching goes on")
            del fn
        finally:
            jobs.queue.task_done()


def _cancel(jobs: _Jobs) -> None:
    """Drop every queued job (counted done, so drain returns) and queue the stop job."""
    with jobs.lock:
        if jobs.closed:
            return
        while True:
            try:
                jobs.queue.get_nowait()
            except queue.Empty:
                break
            jobs.queue.task_done()
        jobs.queue.put((_STOP, next(jobs.order), None))
        jobs.closed = True
