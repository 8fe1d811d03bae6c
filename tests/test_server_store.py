"""One contract for every store backend: dir: (embedded) and redis:// (a real redis-server)."""
from __future__ import annotations

import os
import time

import pytest

from edgert.errors import ConfigError
from edgert.server.dirstore import DirStore
from edgert.server.backends import open_store
from edgert.server.store import WriteBehind

from fleet_helpers import redis_url  # noqa: F401  (fixture)


@pytest.fixture(params=["dir", "dir-write-behind", "redis"])
def store(request, tmp_path):
    if request.param == "dir":
        s = open_store(f"dir:{tmp_path / 'store'}")
    elif request.param == "dir-write-behind":       # what a server on a dir: store uses
        s = WriteBehind(open_store(f"dir:{tmp_path / 'store'}"))
    else:
        s = open_store(request.getfixturevalue("redis_url"))
    yield s
    s.close()


def test_put_get_many_in_order_with_misses(store):
    store.put_many({"kv:a": b"1", "kv:b": b"\x00" * 1000, "dev:x": b""})
    assert store.get_many(["kv:b", "nope", "kv:a", "dev:x"]) == [b"\x00" * 1000, None, b"1", b""]
    store.put("kv:a", b"2")
    assert store.get("kv:a") == b"2"


def test_keys_by_prefix_and_delete(store):
    store.put_many({"pred:d1:m": b"x", "pred:d2:m": b"y", "dev:d1": b"z", "pred*[x]": b"w"})
    assert sorted(store.keys("pred:")) == ["pred:d1:m", "pred:d2:m"]
    assert store.keys("pred*[") == ["pred*[x]"]          # glob characters are literal
    store.delete("pred:d1:m")
    assert store.get("pred:d1:m") is None and store.keys("pred:d1") == []


def test_ttl_expires_and_untimed_keys_stay(store):
    store.put("kv:short", b"a", ttl_s=0.2)
    store.put("dev:stay", b"b")
    assert store.get("kv:short") == b"a"
    time.sleep(0.4)
    assert store.get_many(["kv:short", "dev:stay"]) == [None, b"b"]
    assert "kv:short" not in store.keys("kv:")


def test_incr_counts_from_zero(store):
    assert [store.incr("seq:d") for _ in range(3)] == [1, 2, 3]
    assert store.incr("seq:d", 10) == 13
    assert store.get("seq:d") == b"13"


def test_sizes_in_one_call(store):
    store.put_many({"kv:a": b"x" * 10, "kv:b": b"y" * 3})
    assert store.sizes(["kv:b", "kv:none", "kv:a"]) == [3, None, 10]


def test_put_incr_writes_and_counts_together(store):
    assert store.put_incr({"pred:a": b"1", "hints:a": b"2"}, {"seq:a": 1}) == {"seq:a": 1}
    assert store.put_incr({"pred:a": b"3"}, {"seq:a": 1, "seq:b": 5}) == {"seq:a": 2,
                                                                         "seq:b": 5}
    assert store.get_many(["pred:a", "hints:a", "seq:a"]) == [b"3", b"2", b"2"]


def test_merge_reads_modifies_and_writes(store):
    assert store.merge("pred:fleet", lambda old: (old or b"") + b"a") == b"a"
    assert store.merge("pred:fleet", lambda old: old + b"b") == b"ab"
    assert store.get("pred:fleet") == b"ab"


def test_a_charge_stops_at_the_limit_and_the_window_starts_again(store):
    assert store.charge("kvq:d", 60, 100, window_s=0.5)
    assert store.charge("kvq:d", 40, 100, window_s=0.5)          # exactly at the limit
    assert not store.charge("kvq:d", 1, 100, window_s=0.5)       # past it: refused,
    assert store.get("kvq:d") == b"100"                          # the counter unchanged
    assert not store.charge("kvq:e", 101, 100, window_s=0.5)     # per key; one too large
    assert store.charge("kvq:e", 100, 100, window_s=0.5)
    time.sleep(0.8)                                              # the window is over
    assert store.get("kvq:d") is None
    assert store.charge("kvq:d", 100, 100, window_s=0.5)


def test_merges_from_two_clients_lose_nothing(redis_url):  # noqa: F811
    """Two server processes folding into one shared key (the fleet's predictor)."""
    import threading
    a, b = open_store(redis_url), open_store(redis_url)

    def add(s):
        for _ in range(100):
            s.merge("pred:n", lambda old: str(int(old or b"0") + 1).encode())
    ts = [threading.Thread(target=add, args=(s,)) for s in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert a.get("pred:n") == b"200"
    a.close()
    b.close()


def test_stats_report_keys_and_bytes(store):
    store.put("kv:big", b"x" * 100_000)
    st = store.stats()
    assert st["backend"] in ("dir", "redis") and st["keys"] >= 1
    assert st["bytes"] >= 100_000


def test_bad_keys_are_refused(store):
    with pytest.raises(ValueError, match="store key"):
        store.put("k" * 101, b"x")


# --- the embedded store across crashes ------------------------------------------------------
def test_dir_store_rebuilds_its_index_and_drops_damage(tmp_path):
    s = DirStore(tmp_path)
    s.put_many({"a": b"alpha", "b": b"beta", "c": b"gamma"})
    s.close()
    data = tmp_path / "data"
    (data / ".deadbeef.123.tmp").write_bytes(b"half a write")       # a crash mid-write
    (data / "b".encode().hex()).write_bytes(b"short")                # a damaged header
    path_c = data / "c".encode().hex()
    raw = bytearray(path_c.read_bytes())
    raw[-1] ^= 0xFF                                                  # a flipped value byte
    path_c.write_bytes(bytes(raw))
    s = DirStore(tmp_path)
    assert sorted(os.listdir(data)) == sorted(["a".encode().hex(), "c".encode().hex()])
    assert s.get_many(["a", "b", "c"]) == [b"alpha", None, None]    # c fails its checksum
    assert s.keys("") == ["a"]
    s.close()


def test_dir_store_serves_one_process(tmp_path):
    s = DirStore(tmp_path)
    with pytest.raises(ConfigError, match="another edgert server uses this directory"):
        DirStore(tmp_path)
    s.close()
    DirStore(tmp_path).close()


def test_unreachable_redis_and_bad_specs_are_one_line():
    with pytest.raises(ConfigError, match="cannot reach Redis"):
        open_store("redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="expected dir:PATH or redis://"):
        open_store("mysql://x")


def test_write_behind_writes_back_on_flush_and_close(tmp_path):
    s = WriteBehind(DirStore(tmp_path))
    s.put("pred:x", b"state")
    s.incr("seq:x")
    assert not (tmp_path / "data" / "pred:x".encode().hex()).exists()   # in memory only
    s.flush()
    assert (tmp_path / "data" / "pred:x".encode().hex()).exists()
    s.put("pred:y", b"later")
    s.close()                                   # a clean stop writes back the rest
    d = DirStore(tmp_path)
    assert d.get_many(["pred:x", "seq:x", "pred:y"]) == [b"state", b"1", b"later"]
    d.close()
