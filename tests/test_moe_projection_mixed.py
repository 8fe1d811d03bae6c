"""Mixed precision projected: the real MixedExperts (two real caches) replayed on a virtual
clock. At the band's extremes it is one cache at one precision, so it must project exactly
what the single-cache replay projects; in between, the int4 share is the band rule's."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_moe_projection import EXTENT, SHAPE, skewed_trace

from edgert.errors import BudgetExceeded
from edgert.projection.costmodel import CostModel
from edgert.experts.mixed import precision_band, split_budget
from edgert.projection.replay import project
from edgert.projection.replay_mixed import project_mixed, summary

COST = CostModel(read_latency_s=1e-4, read_Bps=EXTENT / 2e-3, token_s=1e-3, layer_s=5e-4,
                 expert_s=2e-4, hint_s=0.0, route_s=3e-5)
LOW = EXTENT // 4
LOW_S = 5e-5
COUNTS = ("demands", "exact_hits", "loads", "evictions", "bytes_read")


def _budget(hi_slots: int) -> int:
    return 2 * hi_slots * EXTENT        # half to each precision (EXACT_SHARE)


def test_alpha_zero_is_the_full_precision_cache_alone():
    tr = skewed_trace()
    budget = _budget(7)
    hi, _ = split_budget(budget, EXTENT, LOW, SHAPE.total_experts, SHAPE.top_k)
    mixed = project_mixed(tr, SHAPE, COST, budget, LOW, LOW_S, alpha=0.0)
    one = project(tr, SHAPE, COST, hi)
    assert mixed.stats["low_precision_share"] == 0.0
    got, want = mixed.stats["exact"]["total"], one.stats["total"]
    assert {k: got[k] for k in COUNTS} == {k: want[k] for k in COUNTS}
    assert mixed.tpot_s == pytest.approx(one.tpot_s)


def test_a_huge_alpha_is_the_int4_cache_alone():
    tr = skewed_trace()
    budget = _budget(5)
    _, lo = split_budget(budget, EXTENT, LOW, SHAPE.total_experts, SHAPE.top_k)
    mixed = project_mixed(tr, SHAPE, COST, budget, LOW, LOW_S, alpha=1e9)
    one = project(tr, replace(SHAPE, expert_bytes=LOW), COST.with_(expert_s=LOW_S), lo)
    assert mixed.stats["low_precision_share"] == 1.0
    got, want = mixed.stats["int4"]["total"], one.stats["total"]
    assert {k: got[k] for k in COUNTS} == {k: want[k] for k in COUNTS}
    assert mixed.tpot_s == pytest.approx(one.tpot_s)


def test_the_int4_share_is_the_band_rule_and_reads_count_both_sizes():
    tr = skewed_trace()
    mixed = project_mixed(tr, SHAPE, COST, _budget(6), LOW, LOW_S, alpha=0.5)
    low = n = 0
    for s, rows in tr.step_rows():
        if s == 0:
            continue
        for i in range(len(tr.layers)):
            band = precision_band(torch.from_numpy(tr.probs[rows, i]),
                                  torch.from_numpy(tr.topk[rows, i].astype("int64")), 0.5)
            low += int((~band).sum())
            n += band.numel()
    st = mixed.stats
    assert 0 < low < n
    assert st["low_precision_share"] == pytest.approx(low / n)
    e, l = st["exact"]["total"], st["int4"]["total"]
    assert e["bytes_read"] == e["loads"] * EXTENT and l["bytes_read"] == l["loads"] * LOW
    assert summary(mixed)["bytes_per_token"] == pytest.approx(
        (e["bytes_read"] + l["bytes_read"]) / len(mixed.tpot_s))


def test_too_few_bytes_is_refused_as_the_load_refuses():
    with pytest.raises(BudgetExceeded):
        project_mixed(skewed_trace(n=12), SHAPE, COST, SHAPE.top_k * EXTENT, LOW, LOW_S)
