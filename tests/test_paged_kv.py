"""Paged KV: pages from the arena's kv pool, block tables, ref counts, LRU reuse, budget."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert.errors import BudgetExceeded
from edgert.kv.paged import PAGE_TOKENS, PagedKV, PagePool
from edgert.memory import Arena
from moe_models import device_config

torch.set_num_threads(1)
LAYERS, HEADS, DIM = 3, 2, 8  # one page: 3*2*2*16*8*4 B = 6 KiB -> an 8 KiB slot


def make_pool(kv="64 KiB"):
    arena = Arena(device_config(kv=kv))
    cap = arena.budget.kv
    return arena, PagePool(arena, "test: kv pages", LAYERS, HEADS, DIM, cap=cap)


def test_pages_are_arena_slots():
    arena, pages = make_pool()
    assert pages.page_bytes == 8192 and pages.capacity == 8
    ids = pages.allocate(3)
    assert arena.stats()["holders"]["test: kv pages"]["bytes"] == 3 * 8192
    t = pages.page(ids[0])
    assert t.shape == (LAYERS, 2, PAGE_TOKENS, HEADS, DIM)
    t.fill_(7.0)  # zero copy: the bytes live in the arena
    view = arena.view(ids[0])[: t.numel() * 4].view("float32")
    assert (view == 7.0).all()
    pages.decref(ids)
    pages.close()
    assert arena.in_use_bytes() == 0


def test_budget_exceeded_changes_nothing():
    _, pages = make_pool()
    held = pages.allocate(6)
    with pytest.raises(BudgetExceeded):
        pages.allocate(3)
    assert pages.num_free == 2 and pages.num_in_use == 6
    pages.decref(held[:1])
    assert len(pages.allocate(3)) == 3


def test_ref_counts_and_lru_reuse():
    _, pages = make_pool(kv="32 KiB")  # 4 pages
    a, b, c, d = pages.allocate(4)
    evicted = []
    pages.on_evict = evicted.append
    pages.incref(b)                     # shared by two sequences
    pages.decref([c, a, b])             # a and c idle (c first); b still held once
    assert pages.num_in_use == 2 and pages.num_free == 2
    pages.incref(a)                     # a revived (e.g. a prefix hit): no longer idle
    assert pages.allocate(1) == [c] and evicted == [c]
    with pytest.raises(BudgetExceeded):
        pages.allocate(1)
    pages.decref([b])
    assert pages.allocate(1) == [b] and evicted == [c, b]


@settings(max_examples=30, deadline=None)
@given(chunks=st.lists(st.integers(1, 40), min_size=1, max_size=5))
def test_write_then_gather_is_the_concatenation(chunks):
    _, pages = make_pool(kv="128 KiB")
    kv = PagedKV(pages)
    seq = kv.new_sequence()
    ks, vs = [], []
    for n in chunks:
        kv.reserve(seq, n)
        for layer in range(LAYERS):
            k = torch.randn(HEADS, n, DIM)
            v = torch.randn(HEADS, n, DIM)
            kv.write(seq, layer, k, v)
            if layer == 1:
                ks.append(k), vs.append(v)
        kv.advance(seq, [0] * n)
    assert len(seq.block_table) == -(-sum(chunks) // PAGE_TOKENS)
    k, v = kv.read(seq, 1, seq.length)          # one gather over the arena's pages
    assert torch.equal(k, torch.cat(ks, 1)) and torch.equal(v, torch.cat(vs, 1))
    k2, v2 = kv.gather(seq, 1, seq.length)      # page by page
    assert torch.equal(k, k2) and torch.equal(v, v2)
    kv.release(seq)
    assert pages.num_in_use == 0


def test_reserve_fails_before_anything_changes():
    _, pages = make_pool(kv="32 KiB")  # 4 pages = 64 tokens
    kv = PagedKV(pages)
    seq = kv.new_sequence()
    kv.reserve(seq, 40)
    kv.advance(seq, [0] * 40)
    with pytest.raises(BudgetExceeded):
        kv.reserve(seq, 40)
    assert len(seq.block_table) == 3 and seq.length == 40 and pages.num_free == 1


def test_engine_raises_budget_exceeded_and_recovers(tmp_path):
    pytest.importorskip("transformers")
    from edgert.pack.hf_import import pack_hf
    from moe_models import mixtral_config, prompt, runtime, save
    d = save(mixtral_config(), tmp_path / "m")
    pack_hf(d, tmp_path / "m.edgepack", progress=False)
    # page = 2 layers * K,V * 2 kv heads * 16 tokens * 8 dims * 4 B = 4 KiB, plus the last
    # token's hidden state (32 * 4 B) for the prefix cache: an 8 KiB slot; 3 pages = 48 tokens
    lm = runtime(kv="24 KiB").load(tmp_path / "m.edgepack", expert_budget=1.0)
    assert lm.pages.capacity == 3
    with pytest.raises(BudgetExceeded):
        lm.logits(prompt(60))
    # out of KV memory mid-generation: the tokens made so far are kept, and the reason said
    res = lm.generate(prompt(40), max_new_tokens=20, details=True)
    part = res.output
    assert 0 < len(part) < 20 and res.stop_reason == "kv_budget" and res.tokens == len(part)
    roomy = runtime().load(tmp_path / "m.edgepack", expert_budget=1.0)
    assert roomy.generate(prompt(40), max_new_tokens=20)[:len(part)] == part
    assert lm.pages.num_in_use == 0
    assert len(lm.generate(prompt(40), max_new_tokens=8)) == 8
    lm.close()
