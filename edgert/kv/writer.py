"""TierWriter: the KV cache's one background thread, writing pages to the host and disk tiers.

It runs ``run(job)`` for each job in FIFO order. NOTE: the thread holds the queue and a weak
reference to `run` (a `weakref.WeakMethod`), never its owner, so dropping the KV cache ends
it; `close()` stops it after the jobs already queued (that is how closing a model leaves
every full chunk on disk).
"""
from __future__ import annotations

import logging
import queue
import threading
import weakref

log = logging.getLogger(__name__)
_STOP = object()


class TierWriter:
    def __init__(self, run: weakref.WeakMethod, name: str = "edgert-kv-writer"):
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = threading.Thread(
            target=_loop, args=(run, self._jobs), name=name, daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, self._jobs.put, _STOP)

    def submit(self, job) -> None:
        self._jobs.put(job)

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


def _loop(run: weakref.WeakMethod, jobs: queue.Queue) -> None:
    while True:
        job = jobs.get()
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
            jobs.task_done()
