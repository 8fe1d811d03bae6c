"""precision="mixed": the band rule, its extremes, its decisions one expert at a time, budgets
in bytes over experts of two sizes, stats per precision, and the options it refuses."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from edgert import BudgetExceeded
from edgert.experts.api import ExpertLayout, ExpertWeights
from edgert.experts.mixed import precision_band, token_bands
from edgert.pack import PackReader
from edgert.pack.hf_import import pack_hf
from edgert.pack.quant import QuantOptionError
from moe_models import mixtral_config, prompt, qwen_config, runtime, save

torch.set_num_threads(1)

TOL_F32 = 1e-5      # int4 kernel vs dequantize-then-F.linear, relative to max |logit|


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    out = {}
    for name, cfg in {"mixtral": mixtral_config(hidden_size=64, intermediate_size=32),
                      "qwen2_moe": qwen_config(hidden_size=64, moe_intermediate_size=32,
                                               num_experts=8)}.items():
        d = save(cfg, tmp_path_factory.mktemp(name) / "ckpt")
        out[name] = d.parent / "mixed.edgepack"
        pack_hf(d, out[name], progress=False, quant="mixed", group_size=32)
    return out


def _band_one_at_a_time(p: list[float], row: list[int], alpha: float) -> list[bool]:
    k = len(row)
    if k >= len(p):
        return [True] * k
    s = sorted(p, reverse=True)[k]
    return [p[e] >= (1.0 + alpha) * s for e in row]


def test_band_equals_the_rule_one_expert_at_a_time():
    g = torch.Generator().manual_seed(0)
    for alpha in (0.0, 0.3, 1.0, 4.0):
        probs = torch.softmax(torch.randn(50, 8, generator=g) * 2, dim=-1)
        topk = probs.topk(2, dim=-1).indices
        got = precision_band(probs, topk, alpha)
        for t in range(50):
            assert got[t].tolist() == _band_one_at_a_time(probs[t].tolist(), topk[t].tolist(),
                                                          alpha)
    assert precision_band(probs[:, :2], topk, 1.0).all()     # every expert selected


def test_token_bands_split_a_row_by_band_in_the_rows_path_order():
    g = torch.Generator().manual_seed(1)
    for alpha in (0.0, 0.5, 1e30):
        probs = torch.softmax(torch.randn(1, 16, generator=g) * 2, dim=-1)
        topk = probs.topk(4, dim=-1).indices
        band = precision_band(probs, topk, alpha)
        row = topk[0].tolist()
        want = _band_one_at_a_time(probs[0].tolist(), row, alpha)
        got = token_bands(band, topk)
        assert [h for h, _, _ in got] == [h for h in (True, False) if h in want]
        for high, sel, order in got:
            assert sel == [j for j in range(4) if want[j] == high]            # column order
            assert order == sorted((row[j], j) for j in sel)                # ascending id


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_extremes_are_exact_and_int4(packs, family):
    """alpha = 0: every selected expert at full precision, bit for bit the exact engine;
    a huge alpha: every one from int4, bit for bit precision="int4"."""
    pack, ids = packs[family], prompt(12)
    exact = runtime().load(pack, precision="exact", expert_budget=1.0).logits(ids)
    int4 = runtime().load(pack, precision="int4", expert_budget=1.0).logits(ids)
    assert np.abs(exact - int4).max() > 1e-3
    for alpha, want in ((0.0, exact), (1e30, int4)):
        lm = runtime().load(pack, precision="mixed", precision_alpha=alpha, expert_budget=0.5)
        assert np.array_equal(lm.logits(ids), want)
        share = lm.stats()["experts"]["low_precision_share"]
        assert share == (0.0 if alpha == 0 else 1.0)


class BandReference:
    """Decoding one token per step, per-token decisions are per-expert ones: this provider
    applies the band rule expert by expert (`_band_one_at_a_time`) and hands out the exact
    weights or the int4 copy dequantized (the definition of the int4 path)."""
    max_acquire = None
    prefetch = False

    def __init__(self, pack, alpha):
        self.alpha, self.high, self.n = alpha, {}, [0, 0]
        with PackReader(pack) as r:
            self.w = {}
            for prec in ("exact", "int4"):
                lay = ExpertLayout.from_reader(r, prec)
                for key, b in lay.table.items():
                    ew = lay.views(np.frombuffer(bytearray(r.read_block(b)), np.uint8))
                    self.w[prec, key] = ew if prec == "exact" else ExpertWeights(
                        *(x.dequantized() for x in (ew.gate, ew.up, ew.down)))

    def route(self, layer, probs, topk_idx):
        assert topk_idx.shape[0] == 1
        row = topk_idx[0].tolist()
        band = _band_one_at_a_time(probs[0].tolist(), row, self.alpha)
        self.high = dict(zip(row, band))
        self.n[0] += sum(band)
        self.n[1] += len(band) - sum(band)
        return topk_idx

    def acquire(self, layer, ids):
        return {e: self.w["exact" if self.high[e] else "int4", (layer, e)] for e in ids}

    def release(self, layer, ids):
        pass

    def hint(self, layer, probs):
        pass

    def stats(self):
        return {}

    def close(self):
        pass


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_mixed_decode_equals_the_rule_expert_by_expert(packs, family):
    pack, ids = packs[family], prompt(10)
    alpha = 0.5
    ref = BandReference(pack, alpha)
    want = []
    with runtime().load(pack, precision="exact", provider=ref).sequence() as s:
        for t in ids:
            want.append(s.feed([t]))
    lm = runtime().load(pack, precision="mixed", precision_alpha=alpha, expert_budget=0.5)
    got = []
    with lm.sequence() as s:
        for t in ids:
            got.append(s.feed([t]))
    want, got = np.array(want), np.array(got)
    assert np.abs(got - want).max() <= TOL_F32 * np.abs(want).max()
    st = lm.stats()["experts"]
    assert [st["computed"]["exact"], st["computed"]["int4"]] == ref.n
    assert 0 < ref.n[0] and 0 < ref.n[1]                     # both bands were exercised
    assert st["low_precision_share"] == ref.n[1] / sum(ref.n)
    for prec in ("exact", "int4"):                          # per precision, summed in total
        assert st[prec]["total"]["bytes_read"] > 0
    assert st["bytes_read"] == st["exact"]["total"]["bytes_read"] + \
        st["int4"]["total"]["bytes_read"]


def test_budget_counts_bytes_of_two_sizes(packs):
    pack = packs["mixtral"]
    with PackReader(pack) as r:
        big, small = ExpertLayout.from_reader(r).slot_bytes, \
            ExpertLayout.from_reader(r, "int4").slot_bytes
    assert small * 3 < big
    budget = 2 * big + 3 * small + 100            # room for 2 full + 3 int4 (k = 2)
    rt = runtime()
    lm = rt.load(pack, precision="mixed", expert_budget=budget)
    held = rt.arena.stats()["holders"]
    hi = held[f"{lm.name}: expert slots (exact)"]["bytes"]
    lo = held[f"{lm.name}: expert slots (int4)"]["bytes"]
    assert hi == 2 * big and lo == 3 * small and hi + lo <= budget
    assert lm.stats()["experts"]["exact"]["slots"] == 2
    lm.logits(prompt(8))                            # runs inside it
    used = rt.arena.stats()["in_use_bytes"]
    with pytest.raises(BudgetExceeded, match="top-2 slots at each precision"):
        rt.load(pack, precision="mixed", expert_budget=2 * big + 2 * small - 1)
    with pytest.raises(BudgetExceeded, match="mixed-precision expert slots"):
        rt.load(pack, precision="mixed", expert_budget=rt.arena.mapped + 1)
    assert rt.arena.stats()["in_use_bytes"] == used  # nothing taken by the refusals


@pytest.mark.parametrize("opts,names", [
    ({"precision": "int4", "precision_alpha": 1.0}, "precision_alpha=1.0 applies"),
    ({"precision": "mixed", "lossy_alpha": 0.2}, "lossy_alpha with precision='mixed'"),
    ({"precision": "mixed", "precision_alpha": -1}, "precision_alpha must be"),
])
def test_wrong_mixed_options(packs, opts, names):
    with pytest.raises(QuantOptionError, match=names) as e:
        runtime().load(packs["mixtral"], **opts)
    assert "\n" not in str(e.value)


def test_service_load_op_takes_precision():
    from edgert.control.ops import check_args
    from edgert.control.protocol import ProtocolError
    opts = {"precision": "mixed", "precision_alpha": 0.5, "expert_budget": 0.25}
    assert check_args("load", {"path": "m.edgepack", "options": opts})["options"] == opts
    with pytest.raises(ProtocolError, match="'precision' has the wrong type"):
        check_args("load", {"path": "m.edgepack", "options": {"precision": 4}})
