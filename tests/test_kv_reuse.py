"""Prefix reuse on the device: exact at every prompt length and tier, partial pages,
sharing then diverging, copy on write, fully cached prompts, chunked prefill, prefix-closed
eviction, salts, and rollback on refusal. Reference: transformers on the same checkpoint."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import edgert
from edgert.config import KvCache, parse_bytes
from edgert.errors import BudgetExceeded
from edgert.kv.paged import PAGE_TOKENS
from edgert.pack.hf_import import pack_hf
from moe_models import device_config, mixtral_config, prompt, ref_logits, reference, save

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = save(mixtral_config(max_position_embeddings=2048), tmp_path_factory.mktemp("kv") / "m")
    pack = d.parent / "m.edgepack"
    pack_hf(d, pack, progress=False)
    return pack, reference(d)


def config(tmp_path=None, kv="4 MiB", host="0", disk="0", chunk=256, prefix=True):
    kvc = KvCache(prefix, chunk, parse_bytes(host, "host"), parse_bytes(disk, "disk"),
                  str(tmp_path / "kv") if tmp_path is not None else "")
    return replace(device_config(kv=kv), kv_cache=kvc)


def load(pack, cfg, **kw):
    return edgert.Runtime(cfg).load(pack, expert_budget=1.0, **kw)


def run(lm, ids, steps=3, salt=None):
    """Logits of the prompt's last token and of `steps` greedy decode steps; the tokens."""
    out, toks = [], []
    with lm.sequence(salt) as s:
        logits = s.feed(ids)
        for _ in range(steps):
            out.append(logits)
            toks.append(int(logits.argmax()))
            logits = s.feed([toks[-1]])
    return np.stack(out), toks


def greedy_ref(ref, ids, steps=3):
    seq, out = list(ids), []
    for _ in range(steps):
        lg = ref_logits(ref, seq)[-1]
        out.append(lg)
        seq.append(int(lg.argmax()))
    return np.stack(out), seq[len(ids):]


def prefix_stats(lm) -> dict:
    return lm.stats()["kv"]["prefix"]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 255, 256, 257, 1024])
def test_equal_with_and_without_the_cache_at_every_length(model, n):
    pack, ref = model
    ids = prompt(n, seed=n)
    want, want_toks = greedy_ref(ref, ids)
    off = load(pack, config(), prefix_cache=False)
    got_off, toks_off = run(off, ids)
    on = load(pack, config())
    first, toks_first = run(on, ids)                  # fills the cache
    before = prefix_stats(on)
    again, toks_again = run(on, ids)                  # reuses every full page
    after = prefix_stats(on)
    for got in (got_off, first, again):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert toks_off == toks_first == toks_again == want_toks
    np.testing.assert_allclose(again, got_off, atol=1e-4, rtol=0)
    full = n // PAGE_TOKENS * PAGE_TOKENS
    assert after["hit_tokens"] - before["hit_tokens"] == full
    # a prompt that is entirely cached computes nothing before its first token
    assert after["computed_tokens"] - before["computed_tokens"] == n - full
    assert off.stats()["kv"]["prefix"]["hit_tokens"] == 0
    assert on.stats()["kv"]["in_use"] == 0


def test_every_tier_gives_the_same_tokens_and_logits(model, tmp_path):
    pack, _ = model
    ids = prompt(1024 + 32, seed=7)
    want, want_toks = run(load(pack, config(), prefix_cache=False), ids)
    np.testing.assert_allclose(want[0], ref_logits(model[1], ids)[-1], atol=1e-4, rtol=0)
    cfg = config(tmp_path, host="4 MiB", disk="16 MiB", chunk=64)
    lm = load(pack, cfg)
    run(lm, ids)
    lm.kv.drain()
    seen = {}
    for tier, clear in (("arena", ()), ("host", ("arena",)), ("disk", ("arena", "host"))):
        lm.kv.clear(clear)
        before = prefix_stats(lm)["tiers"][tier]["hit_tokens"]
        got, toks = run(lm, ids)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert toks == want_toks, tier
        seen[tier] = prefix_stats(lm)["tiers"][tier]["hit_tokens"] - before
        lm.kv.drain()
    assert seen == {"arena": 1024 + 32, "host": 1024 + 32, "disk": 1024}   # disk: whole chunks
    lm.rt.close()
    fresh = load(pack, cfg)                            # a new runtime: the disk tier only
    got, toks = run(fresh, ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert toks == want_toks
    st = prefix_stats(fresh)
    assert st["tiers"]["disk"]["hit_tokens"] == 1024 and st["computed_tokens"] == 32
    assert st["tiers"]["disk"]["bytes_read"] == 1024 // PAGE_TOKENS * fresh.pages.nbytes


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen2_moe_dense0", "mixtral_window_tied"])
def test_cache_hits_are_exact_for_every_family(tmp_path, family):
    from test_moe_reference import MODELS
    d = save(MODELS[family](), tmp_path / "m")
    pack = tmp_path / "m.edgepack"
    pack_hf(d, pack, progress=False)
    ref = reference(d)
    ids = prompt(75, seed=21)                          # 4 full pages and 11 tokens
    want, want_toks = greedy_ref(ref, ids, 4)
    cfg = config(tmp_path, host="1 MiB", disk="4 MiB", chunk=32)
    lm = load(pack, cfg)
    for clear in ((), (), ("arena",), ("arena", "host")):   # compute, arena, host, disk
        lm.kv.drain()
        lm.kv.clear(clear)
        got, toks = run(lm, ids, steps=4)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert toks == want_toks, clear
    tiers = prefix_stats(lm)["tiers"]
    assert tiers["arena"]["hit_tokens"] == 64 and tiers["host"]["hit_tokens"] == 64
    assert tiers["disk"]["hit_tokens"] == 64


def test_partial_pages_shared_then_diverging(model):
    pack, ref = model
    lm = load(pack, config())
    base = prompt(40, seed=3)                          # 2 full pages and 8 tokens
    a, b = base + prompt(20, seed=4), base + prompt(9, seed=5)
    sa, sb = lm.sequence(), lm.sequence()
    la = sa.feed(a)
    lb = sb.feed(b)                                    # shares a's 2 full pages
    ta, tb = sa._seq.block_table, sb._seq.block_table
    assert ta[:2] == tb[:2] and not set(ta[2:]) & set(tb[2:])
    assert all(lm.pages.ref_count(p) == 2 for p in ta[:2])
    np.testing.assert_allclose(la, ref_logits(ref, a)[-1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(lb, ref_logits(ref, b)[-1], atol=1e-4, rtol=0)
    assert prefix_stats(lm)["hit_tokens"] == 32
    # both continue on their own pages
    na, nb = sa.feed([1]), sb.feed([2])
    np.testing.assert_allclose(na, ref_logits(ref, a + [1])[-1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(nb, ref_logits(ref, b + [2])[-1], atol=1e-4, rtol=0)
    sa.close(), sb.close()
    assert lm.pages.num_in_use == 0


def test_a_fork_copies_the_shared_partial_page_before_writing(model):
    pack, ref = model
    lm = load(pack, config())
    ids = prompt(21, seed=8)                           # page 1 holds 5 tokens
    with lm.sequence() as s:
        s.feed(ids)
        t = s.fork()
        partial = s._seq.block_table[1]
        assert t._seq.block_table == s._seq.block_table and lm.pages.ref_count(partial) == 2
        x = t.feed(prompt(6, seed=9))                  # t writes into the shared page: copies it
        assert t._seq.block_table[1] != partial and lm.pages.ref_count(partial) == 1
        y = s.feed(prompt(3, seed=10))                 # s writes into its own page, no copy
        assert s._seq.block_table[1] == partial
        np.testing.assert_allclose(x, ref_logits(ref, ids + prompt(6, seed=9))[-1],
                                   atol=1e-4, rtol=0)
        np.testing.assert_allclose(y, ref_logits(ref, ids + prompt(3, seed=10))[-1],
                                   atol=1e-4, rtol=0)
        t.close()
    assert lm.pages.num_in_use == 0


def test_prefill_runs_in_chunks(model, monkeypatch):
    pack, ref = model
    import edgert.kinds.moe as moe
    widest = []
    real = moe.attention

    def spy(q, k, v, mask):
        widest.append(q.shape[1])
        return real(q, k, v, mask)

    monkeypatch.setattr(moe, "attention", spy)
    ids = prompt(300, seed=11)
    lm = load(pack, config(chunk=64))
    got = lm.logits(ids)
    assert max(widest) == 64                           # never a 300 x 300 attention matrix
    np.testing.assert_allclose(got, ref_logits(ref, ids), atol=1e-4, rtol=0)
    widest.clear()
    with lm.sequence() as s:                           # the cached 288 tokens are not computed
        s.feed(ids)
    assert max(widest) == 300 - 288


def test_eviction_under_a_tiny_budget_is_prefix_closed(model):
    pack, ref = model
    lm = load(pack, config(kv="48 KiB"))               # 6 pages of 8 KiB
    assert lm.pages.capacity == 6
    a, b = prompt(64, seed=12), prompt(40, seed=13)
    run(lm, a, steps=1)                                # a's 4 full pages (+1 for the decode) idle
    chain = list(lm.kv.index.run(_hashes(lm, a)))
    assert len(chain) == 4
    run(lm, b, steps=1)                                # 3 pages: the arena must give some back
    cached = lm.kv.index.run(_hashes(lm, a))
    alive = [h in lm.kv.index for h in _hashes(lm, a)]
    assert alive == [True] * len(cached) + [False] * (4 - len(cached))   # a prefix survives
    assert 0 < len(cached) < 4
    before = prefix_stats(lm)["hit_tokens"]
    got, _ = run(lm, a, steps=1)
    assert prefix_stats(lm)["hit_tokens"] - before == 16 * len(cached)
    np.testing.assert_allclose(got[0], ref_logits(ref, a)[-1], atol=1e-4, rtol=0)
    # another consumer of the arena takes idle pages: leaves go first there too
    from edgert.memory import SlotPool
    other = SlotPool(lm.rt.arena, "other", lm.pages.page_bytes)
    free = lm.rt.arena.free_pages * 4096 // lm.pages.page_bytes
    other.alloc(free + 2, reclaim=True)
    alive = [h in lm.kv.index for h in _hashes(lm, a)]
    k = sum(alive)
    assert alive == [True] * k + [False] * (4 - k)
    other.close()


def _hashes(lm, ids):
    from edgert.kv.prefix import chain_hashes
    return chain_hashes(lm.kv.fp, ids, PAGE_TOKENS)


def test_different_salts_never_share_pages(model):
    pack, _ = model
    lm = load(pack, config())
    ids = prompt(48, seed=14)
    want, _ = run(lm, ids, salt="alice")
    hits = lambda: prefix_stats(lm)["hit_tokens"]      # noqa: E731
    h0 = hits()
    got, _ = run(lm, ids, salt="bob")
    assert hits() == h0                                # bob sees none of alice's pages
    run(lm, ids)
    assert hits() == h0                                # nor does an unsalted prompt
    run(lm, ids, salt="alice")
    assert hits() == h0 + 48
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert lm.generate(ids, max_new_tokens=3, cache_salt="carol") == \
        lm.generate(ids, max_new_tokens=3, cache_salt="carol")
    assert hits() == h0 + 96


def test_a_refused_prefill_leaves_the_sequence_as_it_was(model):
    pack, _ = model
    lm = load(pack, config(kv="48 KiB"))               # 6 pages
    ids = prompt(64, seed=15)
    run(lm, ids, steps=1)
    with lm.sequence() as s:
        with pytest.raises(BudgetExceeded):
            s.feed(ids + prompt(100, seed=16))         # 4 cached pages + 7 more: too many
        assert s.length == 0 and s._seq.block_table == []
        assert lm.pages.num_in_use == 0
        s.feed(ids)                                    # and the cache still answers
    assert prefix_stats(lm)["hit_tokens"] >= 2 * 64 - 64
