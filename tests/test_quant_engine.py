"""Low-bit experts against their definition: the logits of precision="int8" / "int4" (torch's
weight-only kernels over the cached copies) equal "dequantize the copy to the compute dtype,
then the existing engine" (every expert resident as dense tensors), for every family, at the
fewest slots, 50% and 100% of the experts, in float32 and in each half dtype.

Tolerance, with L = max |float32 reference logits|: in float32 |kernel - reference| <=
TOL_F32 * L (the kernels sum in their own order). In a half dtype (eps its machine epsilon)
the kernels round at other points than F.linear over a rounded weight, so the bound is the
one test_moe_half uses against transformers: the kernel path's error against the float32
definition is at most RATIO x the definition's own error in that dtype + TOL_ULPS * eps * L
(no less accurate than dequantize-then-compute). Greedy tokens must be identical in float32.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from edgert.experts.api import ExpertLayout, ExpertWeights
from edgert.pack import PackReader
from edgert.pack.hf_import import pack_hf
from moe_models import (mixtral_config, olmoe_config, phimoe_config, prompt, qwen3_config,
                        qwen_config, runtime, save)

torch.set_num_threads(1)

TOL_F32 = 1e-5
TOL_ULPS = 8
RATIO = 1.25
SHAPE = dict(hidden_size=64)       # int4 needs K % 32 == 0 and N % 16 == 0
FAMILIES = {
    "mixtral": lambda: mixtral_config(intermediate_size=32, **SHAPE),
    "qwen2_moe": lambda: qwen_config(moe_intermediate_size=32, **SHAPE),
    "qwen3_moe": lambda: qwen3_config(moe_intermediate_size=32, **SHAPE),
    "olmoe": lambda: olmoe_config(intermediate_size=32, clip_qkv=1.5, **SHAPE),
    "phimoe": lambda: phimoe_config(intermediate_size=32, attention_bias=True, **SHAPE),
}


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    out = {}
    for family, make in FAMILIES.items():
        d = save(make(), tmp_path_factory.mktemp(family) / "ckpt")
        for quant in ("int8", "int4"):
            p = d.parent / f"{quant}.edgepack"
            pack_hf(d, p, progress=False, quant=quant,
                    group_size=32 if quant == "int4" else None)
            out[family, quant] = p
    return out


class DequantizedExperts:
    """The definition: every expert's low-bit copy dequantized to `dtype`, as dense tensors."""
    max_acquire = None
    prefetch = False

    def __init__(self, pack, precision: str, dtype: torch.dtype):
        with PackReader(pack) as r:
            lay = ExpertLayout.from_reader(r, precision)
            self.w = {}
            for key, b in lay.table.items():
                ew = lay.views(np.frombuffer(bytearray(r.read_block(b)), np.uint8))
                self.w[key] = ExpertWeights(*(p.dequantized().to(dtype)
                                              for p in (ew.gate, ew.up, ew.down)))

    def route(self, layer, probs, topk_idx):
        return topk_idx

    def acquire(self, layer, ids):
        return {e: self.w[(layer, e)] for e in ids}

    def release(self, layer, ids):
        pass

    def hint(self, layer, probs):
        pass

    def stats(self):
        return {}

    def close(self):
        pass


def _fewest(pack):
    with PackReader(pack) as r:
        lay = ExpertLayout.from_reader(r)
    return max(len(lay.moe_layers), lay.top_k) / len(lay.table)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lowbit_logits_equal_dequantize_then_engine(packs, family, quant, dtype):
    pack = packs[family, quant]
    ids = prompt(10)

    def definition(dt):
        return runtime(dtype=dt).load(pack, precision="exact", provider=DequantizedExperts(
            pack, quant, getattr(torch, dt)))
    ref_lm = definition(dtype)
    ref = ref_lm.logits(ids)
    f32 = ref if dtype == "float32" else definition("float32").logits(ids)
    L = float(np.abs(f32).max())
    if dtype == "float32":
        tol, against = TOL_F32 * L, ref
    else:
        eps = torch.finfo(getattr(torch, dtype)).eps
        tol = RATIO * float(np.abs(ref - f32).max()) + TOL_ULPS * eps * L
        against = f32
    for budget in (_fewest(pack), 0.5, 1.0):
        lm = runtime(dtype=dtype).load(pack, precision=quant, expert_budget=budget)
        got = lm.logits(ids)
        err = float(np.abs(got - against).max())
        assert err <= tol, (family, quant, dtype, budget, err, tol, L)
        st = lm.stats()["experts"]
        assert st["slot_bytes"] == lm.layout.slot_bytes    # the copy's bytes, not 16-bit ones
        if dtype == "float32":
            assert lm.generate(ids, max_new_tokens=6) == ref_lm.generate(ids, max_new_tokens=6)
        lm.close()
    ref_lm.close()


def test_lowbit_is_not_exact(packs):
    """The check above could not pass by computing the exact experts: the copies differ."""
    pack = packs["mixtral", "int4"]
    ids = prompt(10)
    exact = runtime().load(pack, precision="exact", expert_budget=1.0).logits(ids)
    low = runtime().load(pack, precision="int4", expert_budget=1.0).logits(ids)
    assert np.abs(exact - low).max() > 1e-3
