"""The KV write-behind is bounded (edgert/kv/writer.py): with a disk slower than the producer,
the jobs waiting never need more than the bound, and the producer waits (back-pressure)
instead of piling up page copies outside every budget."""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import replace

import pytest
import torch

from edgert.kv.writer import TierWriter

torch.set_num_threads(1)


def wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


class SlowDisk:
    """A run() that blocks until the gate opens, noting what the writer held meanwhile."""

    def __init__(self):
        self.gate = threading.Event()
        self.done = []

    def run(self, job):
        self.gate.wait()
        self.done.append(job)


def test_a_writer_behind_a_slow_disk_holds_its_bound_and_the_producer_waits():
    disk = SlowDisk()
    w = TierWriter(weakref.WeakMethod(disk.run), bound=3000)
    submitted = []

    def produce():
        for i in range(10):
            assert w.admit(1000)
            w.submit(i, 1000)
            submitted.append(i)

    p = threading.Thread(target=produce, daemon=True)
    p.start()
    wait_for(lambda: w.stats()["waits"] == 1)       # the 4th job waits for room
    assert submitted == [0, 1, 2] and w.stats()["held_bytes"] == 3000
    disk.gate.set()
    p.join(timeout=30)
    w.drain()
    st = w.stats()
    assert disk.done == list(range(10)) and st["held_bytes"] == 0
    assert st["peak_bytes"] == 3000 and st["waits"] >= 1 and st["wait_s"] > 0
    w.close()
    assert not w.admit(1000)                         # closed: nothing admitted, nothing waits


def test_a_job_larger_than_the_bound_runs_alone():
    disk = SlowDisk()
    w = TierWriter(weakref.WeakMethod(disk.run), bound=1000)
    assert w.admit(500)
    w.submit("small", 500)
    t = threading.Thread(target=lambda: (w.admit(5000), w.submit("large", 5000)), daemon=True)
    t.start()
    wait_for(lambda: w.stats()["waits"] == 1)
    disk.gate.set()
    t.join(timeout=30)
    w.drain()
    assert disk.done == ["small", "large"] and w.stats()["peak_bytes"] == 5000
    with pytest.raises(ValueError, match="bound"):
        TierWriter(weakref.WeakMethod(disk.run), bound=0)
    w.close()


def test_a_prefill_faster_than_the_disk_waits_for_it_within_the_bound(tmp_path):
    """The model's cache wires the bound: with every disk write stalled, a long prefill's
    pages queued for the writer stay within the bound (before, all of them were queued,
    and their copies piled up when the arena took the pages back)."""
    pytest.importorskip("transformers")
    import edgert
    from edgert.config import KvCache
    from edgert.pack.hf_import import pack_hf
    from moe_models import device_config, mixtral_config, prompt, save

    d = save(mixtral_config(max_position_embeddings=2048), tmp_path / "m", seed=0)
    pack_hf(d, tmp_path / "m.edgepack", progress=False)
    budget = 48 << 10                                # one chunk file fits; the bound is this
    cfg = replace(device_config(), kv_cache=KvCache(True, 64, 0, budget, str(tmp_path / "kv")))
    lm = edgert.Runtime(cfg).load(tmp_path / "m.edgepack", expert_budget=1.0)
    page = lm.kv.pages.nbytes
    ids = prompt(12 * 64 + 5, seed=1)                # 12 chunks of 4 pages
    assert 12 * 4 * page > 4 * budget                # more than the bound if all were queued
    real, gate = lm.kv.disk.write, threading.Event()
    lm.kv.disk.write = lambda *a: (gate.wait(), real(*a))[1]
    out, peak = [], 0
    g = threading.Thread(target=lambda: out.append(lm.generate(ids, max_new_tokens=2)),
                         daemon=True)
    g.start()
    while g.is_alive():
        peak = max(peak, len(lm.kv._pending) * page)
        if lm.kv.stats()["prefix"].get("writer", {}).get("waits"):
            break                                    # the prefill waits for the disk
        time.sleep(0.002)
    assert peak <= budget and g.is_alive()
    assert lm.kv.stats()["prefix"]["writer"]["held_bytes"] <= budget
    gate.set()
    g.join(timeout=120)
    lm.kv.drain()
    assert out and len(out[0]) == 2
    assert lm.kv.stats()["prefix"]["tiers"]["disk"]["writes"] == 12
    lm.close()
