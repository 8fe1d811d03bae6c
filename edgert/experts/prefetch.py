"""PrefetchWorker: the expert cache's one background thread and its queue of read jobs.

The worker knows nothing of slots or experts: it hands each job to `run` in priority order.
The cache front (`cache.py`) queues the jobs and runs them (`ExpertCache._prefetch`).

NOTE: the thread holds the queue and a weak reference to `run` (a `weakref.WeakMethod`),
never its owner, so dropping the cache drops this worker; the worker's finalizer then queues
the stop job and the thread ends once the jobs queued before it are done.
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
_STOP = 9    # after every job already queued


class PrefetchWorker:
    """One daemon thread running `run(*job)` per job, lowest priority first, FIFO within one."""

    def __init__(self, run: weakref.WeakMethod, name: str = "edgert-expert-prefetch"):
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()   # (priority, order, job)
        self._order = itertools.count()
        self._thread: threading.Thread | None = threading.Thread(
            target=_loop, args=(run, self._jobs), name=name, daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, _queue_stop, self._jobs, self._order)

    def submit(self, priority: int, job: tuple) -> None:
        self._jobs.put((priority, next(self._order), job))

    def drain(self) -> None:
        """Wait until every queued job is done."""
        self._jobs.join()

    def close(self) -> None:
        """Stop the thread after the jobs queued so far and wait for it. Idempotent."""
        self._stop()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)


def _loop(run: weakref.WeakMethod, jobs: queue.PriorityQueue) -> None:
    """Runs jobs while their owner lives; the stop job or a dead owner ends it."""
    while True:
        _, _, job = jobs.get()
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
            jobs.task_done()


def _queue_stop(jobs: queue.PriorityQueue, order) -> None:
    jobs.put((_STOP, next(order), None))
