"""Background updates: a device runtime that checks its fleet server for newer signed
versions of the packs it has loaded, and applies them while it serves.

On when the config has ``server:``, ``updates.public_key`` and ``updates.check_s`` > 0.
Every ``check_s`` seconds one thread asks for the newest envelope of each loaded pack's
lineage and runs `fetch.update` (the same checks, staging and commit as `edgert update`).
The thread is a good neighbour: it lowers its own scheduling priority (Linux: per thread)
and paces the download (``DUTY``), since serving comes first. A loaded model keeps its
version; ``reload`` (the service op) or a new ``rt.load`` moves to the new one. Nothing a
device API call does waits on this thread; a failure is counted and retried next round.
The thread holds the runtime weakly (STYLE.md).
"""
from __future__ import annotations

import logging
import os
import threading
import weakref

from ..errors import EdgertError
from . import keys
from .signed import UpdateRefused

log = logging.getLogger(__name__)
DUTY = 0.5               # the download runs at most half the time while a device serves
NICE = 10                # the updater thread's nice value (higher: yields to serving threads)
TIMEOUT_S = 2.0          # one request's silence before this round gives up (no resend)


class _Stopping(Exception):
    pass


def background_priority() -> None:
    """Lower the calling thread's CPU priority (Linux; elsewhere nothing happens)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except (AttributeError, OSError):
        pass


class AutoUpdater:
    def __init__(self, runtime, endpoints: list[str], public_key_path: str, check_s: float,
                 curve=None):
        self.public_key = keys.load_public(public_key_path)   # ConfigError now, not later
        self.endpoints, self.check_s, self.curve = list(endpoints), float(check_s), curve
        self.counters = {"checks": 0, "updates": 0, "bytes_downloaded": 0, "refused": 0,
                         "errors": 0}
        self.last: dict[str, dict] = {}          # pack path -> its last report or refusal
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=_run, args=(weakref.ref(runtime), self),
                                        daemon=True, name="edgert-updates")
        self._thread.start()

    def check_now(self) -> None:
        """Start a round now (tests, an operator's nudge); returns at once."""
        self._wake.set()

    def stats(self) -> dict:
        return {"check_s": self.check_s, **self.counters,
                "packs": {p: dict(v) for p, v in self.last.items()}}

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            # NOTE: bounded: a request in flight ends within TIMEOUT_S; a download stops at
            # its next batch (what is staged stays for the next run)
            self._thread.join(TIMEOUT_S + 0.5)


def _run(ref, up: AutoUpdater) -> None:
    background_priority()
    k = 0
    while not up._stop.is_set():
        up._wake.wait(up.check_s)
        up._wake.clear()
        if up._stop.is_set():
            return
        rt = ref()
        if rt is None:
            return
        paths = sorted({m["path"] for m in rt.models()})
        del rt
        k = _round(up, paths, k)


def _round(up: AutoUpdater, paths: list[str], k: int) -> int:
    from .fetch import PackSource, update
    endpoint = up.endpoints[k % len(up.endpoints)]
    src = PackSource(endpoint, timeout=TIMEOUT_S, curve=up.curve, retries=0)

    def stopping(rep) -> None:
        if up._stop.is_set():
            raise _Stopping
    try:
        for path in paths:
            if up._stop.is_set():
                break
            up.counters["checks"] += 1
            try:
                rep = update(path, src, up.public_key, duty=DUTY, on_batch=stopping)
            except _Stopping:
                break
            except UpdateRefused as e:
                up.counters["refused"] += 1
                up.last[path] = {"refused": str(e)}
                log.warning("update of %s refused: %s", path, e)
                continue
            except (EdgertError, OSError) as e:      # server gone, disk full: next round
                up.counters["errors"] += 1
                up.last[path] = {"error": str(e)}
                log.info("update of %s not done: %s", path, e)
                return k + 1                          # NOTE: the next endpoint next round
            up.counters["bytes_downloaded"] += rep.bytes_downloaded
            if rep.updated:
                up.counters["updates"] += 1
            up.last[path] = {"version": rep.version_to, "updated": rep.updated,
                             "bytes_downloaded": rep.bytes_downloaded,
                             "changed_bytes": rep.changed_bytes}
    finally:
        src.close()
    return k
