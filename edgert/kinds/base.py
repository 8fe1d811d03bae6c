"""What every model a Runtime loads has in common: a name, a kind, its memory, and one end.

    with rt.load("tasks.edgepack") as m:    # or m.close(), or drop the last reference
        ...

A model owns what it takes (arena extents and slot pools, engine charges, pack file
handles, background threads) as a list of *resources*, each with an idempotent
``close()``. ``close()`` ends them in reverse order; a `weakref.finalize` does the same
when the model is collected, and holds the resources, never the model, so dropping the
last reference releases everything. A closed model raises `ModelClosed`.
"""
from __future__ import annotations

import threading
import weakref

from ..errors import ModelClosed


class LoadedModel:
    kind = "model"

    def __init__(self, rt, reader, name: str):
        self.rt, self.reader, self.name = rt, reader, name
        self.path = reader.path
        self._lock = threading.RLock()
        self._resources: list = [reader]          # closed last
        self._finalizer = weakref.finalize(self, _close_all, self._resources)

    def _own(self, resource):
        """Take ownership of ``resource`` (anything with close()); returns it."""
        self._resources.append(resource)
        return resource

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise ModelClosed(f"{self.kind} {self.name!r} ({self.path}) is closed; load the "
                              "pack again")

    def memory(self) -> dict:
        """Arena bytes this model holds, and how many of them are reclaimable cache."""
        return self.rt._memory_of(self.name)

    def close(self) -> None:
        """Give back everything the model took. Idempotent; also run at garbage collection.

        It closes now, not when the work is done: it waits only for the call in progress
        (a run, a switch, one token of a generation) to release the model's lock, and a
        generation still being iterated then ends with ModelClosed. To let work finish
        first, stop giving the model new work and wait for what holds it, as the service's
        `unload` and `reload` do (in-flight requests drain up to `drain_timeout_s`, then
        end with `reloaded`)."""
        with self._lock:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.name!r} {state}>"


class Call:
    """A resource whose close() calls ``fn(*args)`` once."""

    def __init__(self, fn, *args):
        self._fn, self._args = fn, args

    def close(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn(*self._args)


def _close_all(resources: list) -> None:
    errors = []
    while resources:
        r = resources.pop()
        try:
            r.close()
        except Exception as e:  # keep closing the rest; report the first failure
            errors.append(e)
    if errors:
        raise errors[0]
