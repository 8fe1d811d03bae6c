"""KV chunks shared between two devices through the fleet server: exact, verified, salted."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import edgert
from edgert.config import KvCache, parse_bytes
from edgert.pack.hf_import import pack_hf
from edgert.server.backends import open_store
from fleet_helpers import ServerThread, wait_for
from moe_models import device_config, mixtral_config, prompt, save

torch.set_num_threads(1)
CHUNK = 64                      # tokens per chunk: 4 pages
N = 3 * CHUNK + 10              # three whole chunks and a tail


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    out = []
    for seed in (0, 1):         # the second is foreign to the first
        d = save(mixtral_config(max_position_embeddings=1024), tmp_path_factory.mktemp("m") / "m",
                 seed=seed)
        pack_hf(d, d.parent / "m.edgepack", progress=False)
        out.append(d.parent / "m.edgepack")
    return out


@pytest.fixture
def server(tmp_path):
    store = open_store(f"dir:{tmp_path / 'store'}")
    srv = ServerThread(store)
    yield srv
    srv.stop()
    store.close()


def cfg():
    kvc = KvCache(True, CHUNK, 0, parse_bytes("0", "disk"), "")   # no host or disk tier
    return replace(device_config(kv="4 MiB"), kv_cache=kvc)


def run(lm, ids, salt=None, steps=3):
    """Logits of the prompt's last token and of greedy steps after it."""
    out = []
    with lm.sequence(salt) as s:
        logits = s.feed(ids)
        for _ in range(steps):
            out.append(logits)
            logits = s.feed([int(logits.argmax())])
    return np.stack(out)


def device(ep, name, pack):
    rt = edgert.Runtime(cfg(), server=ep, device_id=name)
    lm = rt.load(pack, expert_budget=1.0)
    assert wait_for(lambda: rt.stats()["server"]["connected"])
    return rt, lm


def server_tier(lm) -> dict:
    return lm.stats()["kv"]["prefix"]["tiers"]["server"]


def publish(ep, pack, ids, salt=None, name="a"):
    """Device A computes the prompt and closes: its chunks reach the server."""
    rt, lm = device(ep, name, pack)
    want = run(lm, ids, salt)
    assert server_tier(lm)["hit_tokens"] == 0
    lm.kv.drain()                   # the writer has queued every chunk for the link
    assert server_tier(lm)["bytes_written"] > 0
    rt.close()
    assert rt.stats()["server"]["published_chunks"] == 3
    return want


def reference(pack, ids, salt=None):
    rt = edgert.Runtime(cfg())
    try:
        return run(rt.load(pack, expert_budget=1.0), ids, salt)
    finally:
        rt.close()


def test_a_prefix_computed_on_a_is_reused_on_b_exactly(server, packs):
    ids = prompt(N, seed=3)
    publish(server.endpoint, packs[0], ids)
    assert len(server.srv.store.keys("kv:")) == 3
    rt, lm = device(server.endpoint, "b", packs[0])
    got = run(lm, ids)
    st = server_tier(lm)
    assert st["hit_tokens"] == 3 * CHUNK and st["bytes_read"] > 0
    assert rt.stats()["server"]["fetched_chunks"] == 3
    assert lm.stats()["kv"]["prefix"]["computed_tokens"] < N      # only the tail computed
    np.testing.assert_array_equal(got, reference(packs[0], ids))   # as if never shared
    rt.close()


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "foreign"])
def test_a_bad_chunk_in_the_store_is_rejected_and_recomputed(server, packs, damage):
    ids = prompt(N, seed=4)
    publish(server.endpoint, packs[0], ids)
    store = server.srv.store
    keys = sorted(store.keys("kv:"))
    if damage == "foreign":         # another model's chunks put under this model's names
        publish(server.endpoint, packs[1], ids, name="other")
        foreign = sorted(set(store.keys("kv:")) - set(keys))
        for k, f in zip(keys, foreign):
            store.put(k, store.get(f))
    else:
        for k in keys:
            raw = bytearray(store.get(k))
            if damage == "corrupt":
                raw[4096 + 10] ^= 0x01      # one bit of page 0 (the header fits 4 KiB)
            else:
                raw = raw[:len(raw) // 2]
            store.put(k, bytes(raw))
    rt, lm = device(server.endpoint, "b", packs[0])
    got = run(lm, ids)
    assert server_tier(lm)["hit_tokens"] == 0
    assert rt.stats()["server"]["rejected_chunks"] >= 1
    np.testing.assert_array_equal(got, reference(packs[0], ids))
    rt.close()


def test_a_salted_prefix_is_shared_only_with_the_same_salt(server, packs):
    ids = prompt(N, seed=5)
    publish(server.endpoint, packs[0], ids, salt="alice")
    rt, lm = device(server.endpoint, "b", packs[0])
    for salt in ("bob", None):
        np.testing.assert_array_equal(run(lm, ids, salt), reference(packs[0], ids, salt))
        assert server_tier(lm)["hit_tokens"] == 0
    np.testing.assert_array_equal(run(lm, ids, "alice"), reference(packs[0], ids, "alice"))
    assert server_tier(lm)["hit_tokens"] == 3 * CHUNK
    rt.close()


def test_no_server_no_sharing_and_no_wait(packs, tmp_path):
    """A server that is gone: the look-up is skipped (the link is not connected)."""
    from fleet_helpers import free_port
    rt = edgert.Runtime(cfg(), server=f"tcp://127.0.0.1:{free_port()}", device_id="alone")
    lm = rt.load(packs[0], expert_budget=1.0)
    ids = prompt(N, seed=6)
    np.testing.assert_array_equal(run(lm, ids), reference(packs[0], ids))
    assert server_tier(lm)["hit_tokens"] == 0 and rt.stats()["server"]["published_chunks"] == 0
    rt.close()


def test_a_slow_server_is_not_waited_for(server, packs):
    """Look-ups answered after the bound: the prefill computes, and a late answer to an
    earlier look-up is never taken for a later one."""
    import time
    ids = prompt(N, seed=7)
    publish(server.endpoint, packs[0], ids)
    rt, lm = device(server.endpoint, "b", packs[0])
    fast = server.srv._queued["kv_lookup"]      # a look-up as the server's loop makes it

    def slow(args, batch):
        time.sleep(0.6)                 # past LOOKUP_TIMEOUT_S (0.25 s)
        return fast(args, batch)
    server.srv._queued["kv_lookup"] = slow
    for _ in range(2):
        np.testing.assert_array_equal(run(lm, ids), reference(packs[0], ids))
    assert server_tier(lm)["hit_tokens"] == 0
    server.srv._queued["kv_lookup"] = fast
    time.sleep(1.5)                     # the late answers arrive and are skipped
    np.testing.assert_array_equal(run(lm, ids), reference(packs[0], ids))
    rt.close()
