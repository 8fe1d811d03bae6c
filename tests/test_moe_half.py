"""float16 / bfloat16 compute against transformers run in the same dtype.

The reference is transformers with eager attention and eager experts (the models'
definition; its default grouped_mm experts kernel sums in another order). Tolerance, per
dtype with eps its machine epsilon and L = max |float32 logits|:
  - |edgert - transformers| <= TOL_ULPS * eps * L (a few roundings of the largest logit:
    room for kernels that block sums differently, far below a wrong op or a changed route);
  - edgert's error against float32 is at most RATIO x transformers' own error in that dtype
    plus the same bound: edgert is no less accurate than the reference implementation.
Greedy tokens must be identical. On the CPU the logits came out bitwise equal where this was
written (torch 2.13, transformers 5.24). On a GPU only the second bound applies (see
check_close); those tests are skipped where torch sees no GPU.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")

import edgert
from edgert.config import DeviceConfig
from edgert.pack.hf_import import pack_hf
from moe_models import (mixtral_config, olmoe_config, phimoe_config, prompt, qwen3_config,
                        qwen_config, ref_logits, reference, runtime, save)

torch.set_num_threads(1)

TOL_ULPS = 8
RATIO = 1.25
HAS_GPU = torch.cuda.is_available()

FAMILIES = {"mixtral": mixtral_config, "qwen2_moe": qwen_config, "qwen3_moe": qwen3_config,
            "olmoe": lambda: olmoe_config(clip_qkv=1.5),
            "phimoe": lambda: phimoe_config(attention_bias=True, lm_head_bias=True)}
# (checkpoint dtype, compute dtype): converted at load (staged) and read in place (direct)
CASES = [("float32", "float16"), ("bfloat16", "bfloat16")]


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    out = {}
    for family, make in FAMILIES.items():
        for ckpt_dtype in {c for c, _ in CASES}:
            d = save(make(), tmp_path_factory.mktemp(f"{family}-{ckpt_dtype}") / "ckpt",
                     dtype=getattr(torch, ckpt_dtype))
            p = d.parent / "model.edgepack"
            pack_hf(d, p, progress=False)
            out[family, ckpt_dtype] = (d, p)
    return out


def half_reference(model_dir, dtype: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", experts_implementation="eager",
        dtype=getattr(torch, dtype)).to(device).eval()


def greedy(model, ids, n, device="cpu"):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def check_close(got, want_half, want_f32, dtype: str, device: str = "cpu") -> float:
    """The module docstring's bounds; returns max |got - want_half|.

    NOTE: on a GPU the two sides run different kernels for the same math (cuBLAS picks by
    shape, and edgert's grouped-query attention has other shapes than transformers'
    repeat_kv), so only the accuracy bound against float32 applies there."""
    bound = TOL_ULPS * torch.finfo(getattr(torch, dtype)).eps * float(np.abs(want_f32).max())
    diff = float(np.abs(got - want_half).max())
    assert device != "cpu" or diff <= bound, (diff, bound)
    ours, theirs = np.abs(got - want_f32).max(), np.abs(want_half - want_f32).max()
    assert ours <= RATIO * theirs + bound, (ours, theirs, bound)
    return diff


@pytest.mark.parametrize("ckpt_dtype,dtype", CASES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_half_logits_and_greedy_equal_transformers(packs, family, ckpt_dtype, dtype):
    d, pack = packs[family, ckpt_dtype]
    ref = half_reference(d, dtype)
    p = prompt(40)
    with torch.no_grad():
        want = ref(torch.tensor([p])).logits[0].float().numpy()
    want_f32 = ref_logits(reference(d), p)
    lm = runtime(dtype=dtype).load(pack, expert_budget=1.0)
    assert lm.dtype == getattr(torch, dtype)
    assert all(t.dtype == lm.dtype for t in lm.w.values())
    check_close(lm.logits(p), want, want_f32, dtype)
    tokens = greedy(ref, p[:5], 24)
    assert len(set(tokens)) > 4               # not one token repeated: the check has teeth
    assert lm.generate(p[:5], max_new_tokens=24) == tokens
    lm.close()
    # the expert cache's path (slots, eviction, prefetch) at a partial budget
    small = runtime(dtype=dtype).load(pack, expert_budget=0.5)
    assert small.generate(p[:5], max_new_tokens=24) == tokens
    small.close()


def shipped_half_configs():
    root = os.path.join(os.path.dirname(__file__), "..", "device_configs")
    out = []
    for path in sorted(glob.glob(os.path.join(root, "*.yaml"))):
        with open(path) as f:
            doc = yaml.safe_load(f)
        if doc.get("dtype", "float32") != "float32":
            out.append(pytest.param(doc, id=doc["name"]))
    return out


@pytest.mark.parametrize("doc", shipped_half_configs())
def test_shipped_device_configs_load_and_compute_in_their_dtype(packs, doc, tmp_path):
    """Each shipped config with its dtype and device (on a machine without a GPU the cuda
    ones compute on the CPU), memory shrunk to a test's size."""
    small = {**doc, "memory": {"total": "64 MiB", "engine": "44 MiB", "experts": "8 MiB",
                               "kv": "4 MiB"},
             "storage": {"read_mode": "buffered", "scratch_dir": str(tmp_path)},
             "kv_cache": {"prefix": True, "chunk_tokens": 16}, "threads": 1}
    cfg = DeviceConfig.from_dict(small)
    d, pack = packs["qwen3_moe", "float32"]
    with edgert.Runtime(cfg) as rt:
        lm = rt.load(pack)
        assert lm.dtype == getattr(torch, doc["dtype"])
        assert lm.device.type == ("cuda" if HAS_GPU and doc.get("device") == "cuda" else "cpu")
        p = prompt(20)
        got = lm.logits(p)
        want = half_reference(d, doc["dtype"], lm.device.type)
        with torch.no_grad():
            want_half = want(torch.tensor([p], device=lm.device)).logits[0].float().cpu().numpy()
        check_close(got, want_half, ref_logits(reference(d), p), doc["dtype"], lm.device.type)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU torch can use")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "phimoe"])
def test_cuda_half_equals_transformers_on_the_gpu(packs, family, dtype):
    d, pack = packs[family, "float32"]
    cfg = DeviceConfig.from_dict({
        "name": "test-cuda", "device": "cuda", "threads": 1, "dtype": dtype,
        "memory": {"total": "64 MiB", "engine": "44 MiB", "experts": "8 MiB", "kv": "4 MiB"},
        "storage": {"read_mode": "buffered"}})
    lm = edgert.Runtime(cfg).load(pack, expert_budget=1.0)
    assert lm.device.type == "cuda" and lm.dtype == getattr(torch, dtype)
    ref = half_reference(d, dtype, "cuda")
    p = prompt(40)
    with torch.no_grad():
        want = ref(torch.tensor([p], device="cuda")).logits[0].float().cpu().numpy()
    check_close(lm.logits(p), want, ref_logits(reference(d), p), dtype, "cuda")
    assert lm.generate(p[:5], max_new_tokens=24) == greedy(ref, p[:5], 24, "cuda")
