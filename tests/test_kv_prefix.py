"""Prefix hashing (canonical, tagged, stable across processes and hash seeds), the page
index against a pool that reuses pages, and the prefix-closed eviction order."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgert.kv.paged import PagePool
from edgert.kv.prefix import (PageIndex, PrefixLRU, chain_hashes, extra_keys,
                              model_fingerprint, page_hash)
from edgert.memory import Arena
from moe_models import device_config

ROOT = bytes(range(16))


def test_page_hash_is_canonical_and_pinned():
    # NOTE: these values are the on-disk names of cached pages: changing them orphans every
    # disk tier in the field. Change FORMAT in prefix.py when the recipe has to change.
    assert page_hash(ROOT, list(range(16))).hex() == "5d70a914c0003075539b0d6a171ac328"
    hs = chain_hashes(ROOT, list(range(40)), 16, extra_keys({"salt": "abc"}))
    assert len(hs) == 2 and hs[1].hex() == "654986e425d53a96a60980d274b5e7be"
    assert hs[1] == page_hash(hs[0], list(range(16, 32)), extra_keys({"salt": "abc"}))
    assert chain_hashes(ROOT, list(range(40)), 16, extra_keys({"salt": "abc"}), parent=hs[0],
                        start=16) == hs[1:]


def test_extra_keys_are_tagged_by_source_and_type():
    toks = list(range(16))
    variants = [{}, {"salt": "1"}, {"salt": 1}, {"salt": b"1"}, {"lora": "1"},
                {"salt": "1", "lora": "1"}, {"salt": ""}, {"salt": "a", "lora": "b"},
                {"salt": "b", "lora": "a"}]
    names = {page_hash(ROOT, toks, extra_keys(v)) for v in variants}
    assert len(names) == len(variants)
    assert extra_keys({"salt": None}) == ()                      # no salt = no key
    assert extra_keys({"b": "x", "a": "y"}) == extra_keys({"a": "y", "b": "x"})
    # a salt cannot pass for token ids nor a token run for another split of the same bytes
    assert page_hash(ROOT, toks) != page_hash(ROOT, toks[:8] + [0] * 8)
    with pytest.raises(TypeError):
        extra_keys({"salt": 1.5})


def _fingerprint_script(pack: Path) -> str:
    return (
        "import json, sys\n"
        "from edgert.pack import PackReader\n"
        "from edgert.kv.prefix import model_fingerprint, chain_hashes, extra_keys\n"
        f"r = PackReader({str(pack)!r})\n"
        "fp = model_fingerprint(r, 'float32', (2, 2, 16, 2, 8), 32)\n"
        "hs = chain_hashes(fp, list(range(50)), 16, extra_keys({'salt': 'tenant-7'}))\n"
        "print(json.dumps([fp.hex()] + [h.hex() for h in hs]))\n")


def test_hashes_are_identical_across_processes_and_hash_seeds(tmp_path):
    pytest.importorskip("transformers")
    from edgert.pack.hf_import import pack_hf
    from moe_models import mixtral_config, save
    pack = tmp_path / "m.edgepack"
    pack_hf(save(mixtral_config(), tmp_path / "m"), pack, progress=False)
    from edgert.pack import PackReader
    with PackReader(pack) as r:
        fp = model_fingerprint(r, "float32", (2, 2, 16, 2, 8), 32)
        assert model_fingerprint(r, "float16", (2, 2, 16, 2, 8), 32) != fp   # KV dtype
        assert model_fingerprint(r, "float32", (2, 2, 16, 2, 8), 0) != fp    # page layout
    here = [fp.hex()] + [h.hex() for h in
                         chain_hashes(fp, list(range(50)), 16, extra_keys({"salt": "tenant-7"}))]
    root = Path(__file__).resolve().parent.parent
    for seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", _fingerprint_script(pack)], env=env,
                             capture_output=True, text=True, check=True, cwd=tmp_path)
        assert json.loads(out.stdout) == here, seed
    # the same checkpoint packed again (another file, same weights): the same fingerprint;
    # other weights: another one
    again = tmp_path / "again.edgepack"
    pack_hf(tmp_path / "m", again, progress=False)
    other = tmp_path / "o.edgepack"
    pack_hf(save(mixtral_config(), tmp_path / "o", seed=1), other, progress=False)
    with PackReader(again) as a, PackReader(other) as o:
        assert model_fingerprint(a, "float32", (2, 2, 16, 2, 8), 32) == fp
        assert model_fingerprint(o, "float32", (2, 2, 16, 2, 8), 32) != fp


def test_prefix_lru_evicts_leaves_least_recently_used_first():
    lru = PrefixLRU()
    lru.add("a", None, tick=1)
    lru.add("b", "a", tick=2)
    lru.add("c", "b", tick=3)
    lru.add("x", None, tick=4)
    lru.touch("a", tick=10)             # the root used last: still not before its children
    order = [lru.pop() for _ in range(4)]
    assert order == ["c", "b", "x", "a"]
    assert lru.pop() is None
    # children that arrive before their parent wait for it
    lru.add("k", "j", tick=5)
    lru.add("j", None, tick=1)
    assert lru.pop() == "k" and lru.pop() == "j"
    # a forced removal of a parent leaves its children evictable
    lru.add("p", None, tick=1)
    lru.add("q", "p", tick=2)
    lru.remove("p")
    assert lru.pop() == "q" and len(lru) == 0


def test_page_index_claims_only_pages_that_still_carry_the_hash():
    arena = Arena(device_config(kv="16 KiB"))      # 4 KiB pages: a cap of 4
    pages = PagePool(arena, "t: kv pages", 2, 2, 8, cap=arena.budget.kv)
    index = PageIndex()
    a, b = pages.allocate(2)
    for pid, h in ((a, b"A" * 16), (b, b"B" * 16)):
        pages.set_tag(pid, h)
        index.add(h, pid)
    pages.on_evict = lambda pid: index.forget(pages.tags[pid], pid)
    pages.decref([b, a])                 # idle, still findable
    assert index.run([b"A" * 16, b"B" * 16]) == [a, b]
    assert pages.share_tagged(zip([a, b], [b"A" * 16, b"B" * 16])) == [a, b]
    pages.decref([b, a])
    stale = index.run([b"A" * 16, b"B" * 16])
    got = pages.allocate(4)              # the whole cap: both idle pages handed out again
    assert b in got and a in got and len(index) == 0
    assert pages.share_tagged(zip(stale, [b"A" * 16, b"B" * 16])) == []   # a miss, not bytes
    pages.decref(got)
    pages.close()
