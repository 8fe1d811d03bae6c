"""ExpertCache.close with prefetches queued and one read in flight (issue 17, item 7)."""
import threading

import torch

from edgert.experts.cache import ExpertCache
from edgert.experts.prefetch import PrefetchWorker
from edgert.pack import PackReader
from test_expert_cache import GatedReader, arena, pack, reader_expert_block  # noqa: F401

LABEL = "test: experts"


class SeenWorker(PrefetchWorker):
    """The real worker; says when close() began and keeps its thread to look at later."""

    made: list = []

    def __init__(self, run):
        super().__init__(run)
        self.closing = threading.Event()
        self.thread = self._thread
        SeenWorker.made.append(self)

    def close(self):
        self.closing.set()
        super().close()


def offset(reader, layer, expert):
    return reader.blocks[reader_expert_block(reader, layer, expert)].offset


def test_close_drops_queued_prefetches_and_waits_for_the_read_in_flight(pack):
    gated = offset(PackReader(pack), 0, 5)
    storage = GatedReader(pack, gated)
    ar = arena()
    SeenWorker.made.clear()
    cache = ExpertCache(storage, ar, LABEL, 9, policy="gate", prefetch=True, worker=SeenWorker)
    worker, = SeenWorker.made
    predict = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.3, 0.7]])       # experts 5 then 4
    cache.hint(0, predict)
    assert storage.started.wait(10)            # the worker is reading expert 5 of layer 0
    cache.hint(1, predict)                     # queued behind it
    cache.hint(2, predict)
    closer = threading.Thread(target=cache.close)
    closer.start()
    assert worker.closing.wait(10)
    closer.join(0.05)
    # NOTE: the read cannot end before `go`: close must still be waiting, the slots held
    assert closer.is_alive() and LABEL in ar.stats()["holders"]
    storage.go.set()
    closer.join(10)
    assert not closer.is_alive() and not worker.thread.is_alive()
    # only the read in flight ran: not the rest of its job (expert 4), not the queued hints
    assert storage.offsets == [gated]
    assert LABEL not in ar.stats()["holders"] and ar.in_use_bytes() == 0
    drained = threading.Thread(target=cache.drain, daemon=True)
    drained.start()
    drained.join(10)
    assert not drained.is_alive(), "drain waits for jobs that close dropped"
    cache.close()                                                  # idempotent

