"""MoeLM equals Hugging Face transformers on tiny checkpoints of every supported family."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from edgert.errors import BudgetExceeded
from edgert.experts.api import ExpertLayout
from edgert.pack.hf_import import pack_hf
from moe_models import (HAS_CACHE, OnDemandExperts, mixtral_config, olmoe_config, packed_models,
                        phimoe_config, prompt, qwen3_config, qwen_config, ref_greedy, ref_logits,
                        runtime, save)

torch.set_num_threads(1)

MODELS = {
    "mixtral": lambda: mixtral_config(),
    "qwen2_moe": lambda: qwen_config(),
    # dense first layer, renormalised top-k, sparse every layer after it
    "qwen2_moe_dense0": lambda: qwen_config(num_hidden_layers=3, mlp_only_layers=[0],
                                            norm_topk_prob=True, num_experts=4),
    # sliding-window attention shorter than the prompt, tied embeddings, no GQA
    "mixtral_window_tied": lambda: mixtral_config(sliding_window=8, tie_word_embeddings=True,
                                                  num_key_value_heads=4),
    # per-head q/k norms, head_dim 16 != hidden / heads, 16 experts top-8, renormalised
    "qwen3_moe": lambda: qwen3_config(),
    # a dense middle layer, sliding window on every layer, attention biases, raw top-k
    "qwen3_moe_dense1_window": lambda: qwen3_config(
        num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=False, attention_bias=True,
        use_sliding_window=True, sliding_window=8),
    # q/k norms over the whole projection, 16 experts top-8
    "olmoe": lambda: olmoe_config(),
    # clip_qkv (clamps most of q/k/v at this init), tied embeddings
    "olmoe_clip_tied": lambda: olmoe_config(clip_qkv=1.5, tie_word_embeddings=True),
    # LayerNorms with bias, sparsemixer top-2
    "phimoe": lambda: phimoe_config(),
    # attention and lm_head biases, sliding window shorter than the prompt
    "phimoe_bias_window": lambda: phimoe_config(attention_bias=True, lm_head_bias=True,
                                                sliding_window=8),
}

FUSED_QKV = {"mixtral_window_tied", "qwen3_moe"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return packed_models(MODELS, tmp_path_factory)


def budgets():
    """Expert budgets from the fewest slots the cache takes (one per sparse layer, and at
    least top-k) to all experts (partial ones need the cache)."""
    partial = pytest.mark.skipif(not HAS_CACHE, reason="edgert.experts.cache not present yet")
    return [pytest.param("fewest", marks=partial), pytest.param(0.5, marks=partial), 1.0]


def _budget(lm_pack, b):
    from edgert.pack import PackReader
    with PackReader(lm_pack) as r:
        lay = ExpertLayout.from_reader(r)
    return max(len(lay.moe_layers), lay.top_k) / len(lay.table) if b == "fewest" else b


@pytest.mark.parametrize("budget", budgets())
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_greedy_equal_transformers(models, name, budget):
    pack, ref = models[name]
    lm = runtime().load(pack, expert_budget=_budget(pack, budget))
    p = prompt(40)  # crosses two 16-token page boundaries
    # q, k, v as one product where the pack's bytes allow it (whole 4 KiB pages, no biases)
    assert any(k.startswith("edgert.qkv.") for k in lm.w) == (name in FUSED_QKV)
    np.testing.assert_allclose(lm.logits(p), ref_logits(ref, p), atol=1e-4, rtol=0)
    want = ref_greedy(ref, p[:5], 32)
    assert len(set(want)) > 4           # not one token repeated: the check has teeth
    assert lm.generate(p[:5], max_new_tokens=32) == want
    assert lm.stats()["kv"]["in_use"] == 0
    lm.close()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe_dense0", "qwen3_moe_dense1_window",
                                  "phimoe"])
def test_exact_mode_is_bitwise_equal_to_all_resident(models, name):
    pack, _ = models[name]
    resident = runtime().load(pack, expert_budget=1.0)
    p = prompt(24, seed=3)
    want = resident.logits(p)
    want_gen = resident.generate(p[:4], max_new_tokens=12)
    rt = runtime()
    from edgert.pack import PackReader
    prov = OnDemandExperts(PackReader(pack))
    lm = rt.load(pack, provider=prov)
    assert np.array_equal(lm.logits(p), want)
    assert lm.generate(p[:4], max_new_tokens=12) == want_gen
    assert not prov.pinned
    moe = lm.cfg.moe_layers
    # the next sparse layer is hinted after every layer that precedes one, with probs [T, E]
    assert {l for l, _ in prov.hints} == set(moe[1:] if moe[0] == 0 else moe)
    assert all(s[1] == lm.cfg.num_experts for _, s in prov.hints)
    if HAS_CACHE:
        for frac in (_budget(pack, "fewest"), 0.5, 0.75):
            small = runtime().load(pack, expert_budget=frac)
            assert np.array_equal(small.logits(p), want), frac
            assert small.generate(p[:4], max_new_tokens=12) == want_gen, frac


def test_stream_and_sampling(models):
    pack, _ = models["mixtral"]
    lm = runtime().load(pack, expert_budget=1.0)
    p = prompt(7, seed=5)
    assert list(lm.generate(p, max_new_tokens=10, stream=True)) == lm.generate(p, max_new_tokens=10)
    a = lm.generate(p, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    b = lm.generate(p, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    assert a == b and len(a) == 10
    assert lm.stats()["decode_tokens"] > 0


def test_eos_stops_generation(tmp_path):
    d = save(mixtral_config(eos_token_id=None), tmp_path / "m")
    pack = tmp_path / "m.edgepack"
    pack_hf(d, pack, progress=False)
    first = runtime().load(pack, expert_budget=1.0).generate(prompt(5), max_new_tokens=8)
    # make the third generated token the EOS: generation must stop right after it
    import json
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = first[2]
    (d / "config.json").write_text(json.dumps(cfg))
    pack_hf(d, pack, progress=False)
    out = runtime().load(pack, expert_budget=1.0).generate(prompt(5), max_new_tokens=8)
    assert out == first[:first.index(first[2]) + 1]


def test_weights_count_against_the_budget(models):
    pack, _ = models["mixtral"]
    rt = runtime()
    lm = rt.load(pack, expert_budget=1.0)
    st = rt.arena.stats()["holders"]
    distinct = {t.data_ptr(): t.numel() * 4 for t in lm.w.values()}
    assert st[f"{lm.name}: dense weights"]["bytes"] >= sum(distinct.values())
    assert st[f"{lm.name}: expert slots"]["bytes"] >= \
        lm.layout.extent_bytes * len(lm.layout.table)
    lm.close()
    assert rt.arena.in_use_bytes() == 0
    dense = lm._weight_bytes
    experts = lm.layout.slot_bytes * len(lm.layout.table)
    with pytest.raises(BudgetExceeded, match="dense weights"):
        runtime(weights=dense - 4096, experts=0, kv=0).load(pack, expert_budget=1.0)
    with pytest.raises(BudgetExceeded, match="expert slots"):
        runtime(weights=dense + experts - 4096, experts=0, kv=0).load(pack, expert_budget=1.0)
    small = runtime(weights=dense + experts, experts=0, kv=0)
    small.load(pack, expert_budget=1.0).close()        # exactly enough: it fits


class SubstitutingExperts(OnDemandExperts):
    """Computes expert `dst` wherever the router picked `src` (in `layer`)."""

    def __init__(self, reader, layer, src, dst):
        super().__init__(reader)
        self.sub = (layer, src, dst)

    def route(self, layer, probs, topk_idx):
        lay, src, dst = self.sub
        return torch.where(topk_idx == src, dst, topk_idx) if layer == lay else topk_idx


def test_substituted_expert_takes_the_replaced_experts_weight(models, tmp_path):
    """Contract: a substitute's output is weighted by the routing weight of the expert it
    replaces. So computing expert 3 wherever 1 was picked equals a model whose expert 1
    has expert 3's weights (and the original router)."""
    from edgert.pack import PackReader
    from transformers import AutoModelForCausalLM
    pack, ref = models["mixtral"]
    lm = runtime().load(pack, provider=SubstitutingExperts(PackReader(pack), 1, src=1, dst=3))
    twin = AutoModelForCausalLM.from_config(ref.config, attn_implementation="eager").eval()
    twin.load_state_dict(ref.state_dict())
    with torch.no_grad():
        experts = twin.model.layers[1].mlp.experts
        experts.gate_up_proj[1] = experts.gate_up_proj[3]
        experts.down_proj[1] = experts.down_proj[3]
    p = prompt(30, seed=9)
    got = lm.logits(p)
    np.testing.assert_allclose(got, ref_logits(twin, p), atol=1e-4, rtol=0)
    assert not np.allclose(got, ref_logits(ref, p), atol=1e-3)
