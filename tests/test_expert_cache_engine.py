"""The expert cache under the MoE engine: exact at any policy, lossy within its band."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from edgert.experts.cache import ExpertCache
from edgert.pack import PackReader
from edgert.pack.hf_import import pack_hf
from moe_models import mixtral_config, prompt, runtime, save


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    cfg = mixtral_config(num_local_experts=8, num_hidden_layers=3)
    d = save(cfg, tmp_path_factory.mktemp("m") / "ckpt")
    p = d.parent / "model.edgepack"
    pack_hf(d, p, progress=False)
    return p


def decode(rt, pack, ids, **cache_kw):
    """Teacher-forced one-token steps (the decode path); log-probs [N, V] and cache stats."""
    cache = ExpertCache(PackReader(pack, rt.config.storage.read_mode), rt.arena, "test: experts",
                        **cache_kw)
    lm = rt.load(pack, provider=cache)
    seq = lm.sequence()
    try:
        out = [torch.log_softmax(torch.from_numpy(seq.feed([t])), -1) for t in ids]
    finally:
        seq.close()
        lm.close()
        cache.drain()
        stats = cache.stats()
        cache.close()
    return torch.stack(out), stats


@pytest.mark.parametrize("policy", ["lru", "lfu", "gate"])
def test_exact_mode_equals_all_experts_resident(pack, policy):
    rt, ids = runtime(), prompt(24)
    full, _ = decode(rt, pack, ids, num_slots=24, policy="lru", prefetch=False)
    small, st = decode(rt, pack, ids, num_slots=6, policy=policy, prefetch=True,
                       prefetch_min_prob=0.0)
    assert st["total"]["loads"] + st["total"]["ahead_loads"] > 6     # it really evicted and reloaded
    assert torch.equal(small, full)


def test_lossy_substitutes_within_the_band_and_reports_it(pack):
    rt, ids = runtime(), prompt(24)
    exact, _ = decode(rt, pack, ids, num_slots=6, policy="gate", prefetch=False)
    lossy, st = decode(rt, pack, ids, num_slots=6, policy="gate", prefetch=False, lossy_alpha=0.5)
    t = st["total"]
    assert t["substitutions"] > 0
    assert t["effective_hit_rate"] > t["exact_hit_rate"]
    assert t["exact_hits"] + t["substitutions"] + t["misses"] == t["demands"]
    kl = (exact.exp() * (exact - lossy)).sum(-1)
    assert torch.isfinite(lossy).all() and float(kl.mean()) > 0
