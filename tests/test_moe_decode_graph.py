"""The ahead-of-time compiled decode step (`compile: on` on the CPU; engines/decode_graph.py,
kinds/moe_decode.py): equal to transformers across the families and budgets, equal to the
eager step, the eager fallback with a logged reason, the on-disk cache a restarted process
reuses, and two threads generating at once.

Each model shape compiles once per test session (about 10-30 s on a 2-core CPU), into one
scratch directory every test here shares."""
from __future__ import annotations

import logging
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import edgert
from edgert.kinds import moe_decode
from edgert.pack.hf_import import pack_hf
from moe_models import (device_config, mixtral_config, olmoe_config, packed_models,
                        phimoe_config, prompt, qwen3_config, qwen_config, ref_greedy,
                        ref_logits, reference, save)

torch.set_num_threads(1)

# one model per family, each with the variant that exercises most of the graph's branches
MODELS = {
    # sliding window shorter than the prompt, tied embeddings, no GQA, fused q/k/v
    "mixtral_window_tied": lambda: mixtral_config(sliding_window=8, tie_word_embeddings=True,
                                                  num_key_value_heads=4),
    # q/k/v biases (three products), the gated shared expert
    "qwen2_moe": lambda: qwen_config(),
    # per-head q/k norms, head_dim != hidden / heads, top-8 of 16
    "qwen3_moe": lambda: qwen3_config(),
    # q/k norms over the whole projection, clip_qkv, tied embeddings
    "olmoe_clip_tied": lambda: olmoe_config(clip_qkv=1.5, tie_word_embeddings=True),
    # LayerNorms with bias, sparsemixer, attention and lm_head biases, sliding window
    "phimoe_bias_window": lambda: phimoe_config(attention_bias=True, lm_head_bias=True,
                                                sliding_window=8),
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return packed_models(MODELS, tmp_path_factory)


def runtime(scratch, mode: str = "on", **kw) -> edgert.Runtime:
    c = device_config(**kw)
    return edgert.Runtime(replace(c, compile=mode,
                                  storage=replace(c.storage, scratch_dir=str(scratch))))


def _eager_and_compiled_agree(lm, first: list[int], then: list[int]) -> None:
    """Two sequences fed the same tokens, one decoding eagerly and one compiled: the logits
    of every decode step agree."""
    with lm.sequence() as a, lm.sequence() as b:
        lm.graph_decode = False
        a.feed(first)
        lm.graph_decode = True
        b.feed(first)
        for t in then:
            lm.graph_decode = False
            x = a.feed([t])
            lm.graph_decode = True
            y = b.feed([t])
            np.testing.assert_allclose(y, x, atol=2e-5, rtol=0)


def _fewest(lm) -> float:
    lay = lm.layout
    return max(len(lay.moe_layers), lay.top_k) / len(lay.table)


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_decode_equals_transformers_at_every_budget(models, scratch, name):
    pack, ref = models[name]
    p = prompt(21)                       # the decode crosses a 16-token page boundary
    want = ref_greedy(ref, p[:5], 24)    # NOTE: transformers' generate, as the reference test
    assert len(set(want)) >= 4           # not one token repeated: the check has teeth
    probe = runtime(scratch).load(pack, expert_budget=1.0)
    assert probe.stats()["compile"]["compiled"], probe.stats()["compile"]
    budgets = (_fewest(probe), 0.5, 1.0)
    probe.close()
    for b in budgets:
        lm = runtime(scratch).load(pack, expert_budget=b)
        with lm.sequence() as s:
            got = [s.feed(p[:-3])]
            for t in p[-3:]:
                got.append(s.feed([t]))            # compiled decode steps
        np.testing.assert_allclose(np.stack(got), ref_logits(ref, p)[-4:], atol=1e-4, rtol=0)
        before = lm._graph.tokens
        assert lm.generate(p[:5], max_new_tokens=24) == want, b
        assert lm._graph.tokens - before == 23      # every token after the prompt's: compiled
        assert lm.stats()["kv"]["in_use"] == 0
        lm.close()


def test_compiled_and_eager_steps_agree_token_by_token(models, scratch):
    pack, _ = models["qwen2_moe"]
    lm = runtime(scratch).load(pack, expert_budget=0.5)
    _eager_and_compiled_agree(lm, prompt(18, seed=5), prompt(20, seed=6))
    st = lm.stats()["experts"]
    assert st["total"]["misses"] > 0      # the compiled step went through the cache's misses


def test_half_precision_compiled_greedy_equals_eager(models, scratch):
    pack, _ = models["qwen3_moe"]
    p = prompt(12, seed=7)
    want = runtime(scratch, "off", dtype="bfloat16").load(pack, expert_budget=0.5) \
        .generate(p, max_new_tokens=16)
    lm = runtime(scratch, dtype="bfloat16").load(pack, expert_budget=0.5)
    assert lm.stats()["compile"]["compiled"]
    got = lm.generate(p, max_new_tokens=16)
    # NOTE: fused kernels keep intermediates in float32 where eager rounds each op to
    # bfloat16, so a near tie may break the other way; most tokens must agree
    assert sum(a == b for a, b in zip(got, want)) >= 12, (got, want)


def test_a_restarted_process_loads_the_compiled_step_from_the_cache(models, scratch):
    pack, _ = models["mixtral_window_tied"]
    runtime(scratch).load(pack).close()                    # built (or already there)
    lm = runtime(scratch).load(pack)
    st = lm.stats()["compile"]
    assert st["compiled"] and st["cached"] and st["failed"] is None
    files = sorted(f.name for f in (scratch / "torch-compile").glob("decode-*.pt2"))
    assert len(files) >= 2 and all(f.startswith(("decode-attn-", "decode-experts-"))
                                   for f in files)


def test_a_failed_compile_decodes_eagerly_with_one_logged_reason(models, scratch, monkeypatch,
                                                                 caplog):
    pack, ref = models["olmoe_clip_tied"]

    class Broken:
        def __init__(self, *a, **kw):
            raise RuntimeError("inductor: no C++ compiler\nsecond line")
    monkeypatch.setattr(moe_decode, "DecodeGraphs", Broken)
    p = prompt(6, seed=2)
    with caplog.at_level(logging.WARNING, logger="edgert.kinds.moe_decode"):
        lm = runtime(scratch).load(pack, expert_budget=0.5)
    assert lm._graph is None
    assert lm.generate(p, max_new_tokens=12) == ref_greedy(ref, p, 12)
    st = lm.stats()["compile"]
    assert st["compiled"] is False and "no C++ compiler" in st["failed"]
    assert "\n" not in st["failed"]
    msgs = [r.getMessage() for r in caplog.records if "decodes eagerly" in r.getMessage()]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0]


def test_models_the_step_does_not_cover_say_why_and_decode_eagerly(scratch, tmp_path):
    d = save(qwen_config(num_hidden_layers=3, mlp_only_layers=[0], num_experts=4),
             tmp_path / "ckpt")
    pack = tmp_path / "dense0.edgepack"
    pack_hf(d, pack, progress=False)
    lm = runtime(scratch).load(pack)
    assert lm._graph is None
    assert lm.stats()["compile"]["failed"] == "not compiled: the model has dense MLP layers"
    p = prompt(6)
    assert lm.generate(p, max_new_tokens=8) == ref_greedy(reference(d), p, 8)


def test_two_threads_generate_at_once_with_the_compiled_step(models, scratch):
    pack, ref = models["phimoe_bias_window"]
    lm = runtime(scratch).load(pack, expert_budget=0.5)
    p = prompt(9, seed=4)
    want = ref_greedy(ref, p, 16)
    out = [None, None]

    def run(i):
        out[i] = lm.generate(p, max_new_tokens=16)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out == [want, want]
    assert lm._graph.tokens >= 30


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_lowbit_experts_through_the_compiled_step_equal_the_eager_kernels(scratch, tmp_path,
                                                                          quant):
    d = save(mixtral_config(intermediate_size=32, hidden_size=64), tmp_path / "ckpt")
    pack = tmp_path / f"{quant}.edgepack"
    pack_hf(d, pack, progress=False, quant=quant, group_size=32 if quant == "int4" else None)
    lm = runtime(scratch).load(pack, expert_budget=0.5, precision=quant)
    assert lm.stats()["compile"]["compiled"], lm.stats()["compile"]
    _eager_and_compiled_agree(lm, prompt(10), prompt(12, seed=3))
    assert lm._graph.tokens == 12
