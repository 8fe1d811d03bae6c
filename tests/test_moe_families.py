"""The families beyond Mixtral: no silent tensors, fused-expert checkpoints, refusals, routing.

(Logits and greedy tokens against transformers per family and budget: test_moe_reference.py.)
"""
from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file

import edgert.pack.hf_import as hf_import
from edgert.errors import PackCorrupt, UnsupportedModel
from edgert.pack import PackReader
from edgert.pack.families import SUPPORTED_ARCHITECTURES, dense_tensors
from edgert.pack.hf_import import CheckpointIncomplete, pack_hf
from moe_models import (mixtral_config, olmoe_config, phimoe_config, prompt, qwen3_config,
                        qwen_config, ref_logits, reference, runtime, save)

torch.set_num_threads(1)

CONFIGS = {"qwen3_moe": qwen3_config, "olmoe": olmoe_config, "phimoe": phimoe_config,
           "mixtral": mixtral_config, "qwen2_moe": lambda: qwen_config(mlp_only_layers=[0])}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return {name: save(make(), tmp_path_factory.mktemp(name) / "ckpt")
            for name, make in CONFIGS.items()}


def _copy(src, dst, edit_config=None, edit_tensors=None):
    """A copy of checkpoint `src` at `dst`, its config.json and tensors edited."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_qwen3_relabelled_as_qwen2_is_refused_naming_q_norm(ckpts, tmp_path):
    """The issue's case: it packed, loaded and generated garbage (12.7 logits off)."""
    def relabel(c):
        c["architectures"], c["model_type"] = ["Qwen2MoeForCausalLM"], "qwen2_moe"
    d = _copy(ckpts["qwen3_moe"], tmp_path / "relabelled", edit_config=relabel)
    out = tmp_path / "x.edgepack"
    with pytest.raises(UnsupportedModel, match=r"model\.layers\.0\.self_attn\.[qk]_norm\.weight") \
            as e:
        pack_hf(d, out, progress=False)
    assert str(d) in str(e.value) and "qwen2_moe" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("family,gone", [
    ("qwen3_moe", "model.layers.1.self_attn.k_norm.weight"),
    ("olmoe", "model.layers.0.self_attn.q_norm.weight"),
    ("phimoe", "model.layers.1.post_attention_layernorm.bias"),
    ("phimoe", "model.norm.bias"),
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight"),
])
def test_missing_tensor_is_named(ckpts, tmp_path, family, gone):
    d = _copy(ckpts[family], tmp_path / "cut", edit_tensors=lambda t: t.pop(gone))
    with pytest.raises(CheckpointIncomplete, match=gone.replace(".", r"\.")) as e:
        pack_hf(d, tmp_path / "x.edgepack", progress=False)
    assert str(d) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("family,extra", [
    ("olmoe", "model.layers.0.self_attn.q_proj.bias"),     # attention_bias is false
    ("phimoe", "lm_head.bias"),                            # lm_head_bias is false
    ("mixtral", "model.rotary_emb.inv_freq"),
])
def test_tensor_the_engine_would_not_use_is_refused(ckpts, tmp_path, family, extra):
    def add(t):
        t[extra] = torch.ones(t["model.embed_tokens.weight"].shape[1])
    d = _copy(ckpts[family], tmp_path / "extra", edit_tensors=add)
    with pytest.raises(UnsupportedModel, match=extra.replace(".", r"\.")):
        pack_hf(d, tmp_path / "x.edgepack", progress=False)


def test_tied_lm_head_is_dropped_when_equal_and_refused_when_not(tmp_path):
    d = save(olmoe_config(tie_word_embeddings=True), tmp_path / "tied")
    def store_lm_head(t, scale):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone() * scale
    same = _copy(d, tmp_path / "same", edit_tensors=lambda t: store_lm_head(t, 1.0))
    pack_hf(same, tmp_path / "same.edgepack", progress=False)
    assert "lm_head.weight" not in PackReader(tmp_path / "same.edgepack").task("model")
    other = _copy(d, tmp_path / "other", edit_tensors=lambda t: store_lm_head(t, 2.0))
    with pytest.raises(UnsupportedModel, match="lm_head.weight differs from the embeddings"):
        pack_hf(other, tmp_path / "other.edgepack", progress=False)


def test_wrong_shape_is_refused(ckpts, tmp_path):
    name = "model.layers.0.self_attn.q_norm.weight"
    def widen(t):
        t[name] = torch.ones(32)                 # per head is [head_dim] = [16]
    d = _copy(ckpts["qwen3_moe"], tmp_path / "shape", edit_tensors=widen)
    with pytest.raises(UnsupportedModel, match=name.replace(".", r"\.") + ".*16"):
        pack_hf(d, tmp_path / "x.edgepack", progress=False)


def test_engine_refuses_a_pack_holding_a_tensor_it_would_not_use(ckpts, tmp_path, monkeypatch):
    """A pack made the way edgert's packer used to (every non-expert tensor copied) from a
    relabelled Qwen3-MoE checkpoint packs, but does not load."""
    def relabel(c):
        c["architectures"], c["model_type"] = ["Qwen2MoeForCausalLM"], "qwen2_moe"
        c["qkv_bias"] = False
    d = _copy(ckpts["qwen3_moe"], tmp_path / "relabelled", edit_config=relabel)
    every = {n: tuple(t.shape) for n, t in load_file(str(d / "model.safetensors")).items()
             if ".experts." not in n}
    monkeypatch.setattr(hf_import, "dense_tensors", lambda config: every)
    out = tmp_path / "old.edgepack"
    pack_hf(d, out, progress=False)
    monkeypatch.undo()
    rt = runtime()
    with pytest.raises(UnsupportedModel, match=r"self_attn\.[qk]_norm\.weight.*qwen2_moe"):
        rt.load(out, expert_budget=1.0)
    assert rt.arena.in_use_bytes() == 0


def test_engine_refuses_a_pack_missing_a_tensor(ckpts, tmp_path, monkeypatch):
    """A pack from a packer that did not know the tensor (the checkpoint lacks it too)."""
    gone = "model.layers.1.self_attn.q_norm.weight"
    real = hf_import.dense_tensors
    monkeypatch.setattr(hf_import, "dense_tensors",
                        lambda config: {n: s for n, s in real(config).items() if n != gone})
    out = tmp_path / "cut.edgepack"
    d = _copy(ckpts["qwen3_moe"], tmp_path / "cut", edit_tensors=lambda t: t.pop(gone))
    pack_hf(d, out, progress=False)
    monkeypatch.undo()
    with pytest.raises(PackCorrupt, match=gone.replace(".", r"\.")):
        runtime().load(out, expert_budget=1.0)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_fused_expert_checkpoint_packs_like_the_hub_layout(ckpts, tmp_path, family):
    """transformers 5 writes its in-memory format with save_original_format=False:
    experts fused per layer (gate_up_proj [E, 2F, H], down_proj [E, H, F]), every router
    under "mlp" (PhiMoE's named "router"). Unpacked, it is the same pack."""
    fused = save(CONFIGS[family](), tmp_path / "fused", save_original_format=False)
    names = json.dumps(list(load_file(str(fused / "model.safetensors"))))
    assert "experts.gate_up_proj" in names and ".experts.0." not in names
    out = tmp_path / "fused.edgepack"
    pack_hf(fused, out, progress=False)
    hub = tmp_path / "hub.edgepack"
    pack_hf(ckpts[family], hub, progress=False)
    a, b = PackReader(out), PackReader(hub)
    assert set(a.task("model")) == set(b.task("model"))
    for name in a.task("model"):
        np.testing.assert_array_equal(a.read_tensor("model", name), b.read_tensor("model", name))
    assert a.sections["experts"] == b.sections["experts"]
    for l, e, blk in msgpack.unpackb(a.sections["experts"])["table"]:
        assert a.read_block(blk) == b.read_block(blk), (l, e)
    p = prompt(20)
    np.testing.assert_allclose(runtime().load(out, expert_budget=1.0).logits(p),
                               ref_logits(reference(ckpts[family]), p), atol=1e-4, rtol=0)


def test_fused_layer_missing_down_proj_is_named(tmp_path):
    d = save(olmoe_config(), tmp_path / "fused", save_original_format=False)
    gone = "model.layers.1.mlp.experts.down_proj"
    t = load_file(str(d / "model.safetensors"))
    del t[gone]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointIncomplete, match=gone.replace(".", r"\.")):
        pack_hf(d, tmp_path / "x.edgepack", progress=False)


def test_unsupported_settings_are_refused_by_name(ckpts, tmp_path):
    def longrope(c):
        c["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0,
                                "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}
    d = _copy(ckpts["phimoe"], tmp_path / "longrope", edit_config=longrope)
    with pytest.raises(UnsupportedModel, match="phimoe: rope_type 'longrope'"):
        pack_hf(d, tmp_path / "x.edgepack", progress=False)
    d = _copy(ckpts["phimoe"], tmp_path / "top4",
              edit_config=lambda c: c.update(num_experts_per_tok=4))
    with pytest.raises(UnsupportedModel, match="sparsemixer routing is top-2"):
        pack_hf(d, tmp_path / "y.edgepack", progress=False)
    d = _copy(ckpts["olmoe"], tmp_path / "llama",
              edit_config=lambda c: c.update(architectures=["DeepseekV3ForCausalLM"]))
    with pytest.raises(UnsupportedModel, match="DeepseekV3ForCausalLM") as e:
        pack_hf(d, tmp_path / "z.edgepack", progress=False)
    assert all(a in str(e.value) for a in SUPPORTED_ARCHITECTURES)


def test_sparsemixer_equals_transformers_near_ties():
    """PhiMoE's inference routing, including experts within the jitter band of the best."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer
    from edgert.engines.moe_layers import sparsemixer_top2
    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 1, generator=g)
    scores = base + 0.02 * torch.randn(512, 8, generator=g)   # many experts within 2 * eps
    for eps in (0.01, 0.1):
        want_w, want_i = sparsemixer(scores, jitter_eps=eps, training=False)
        got_w, got_i = sparsemixer_top2(scores, eps)
        assert torch.equal(got_i, want_i)
        assert torch.equal(got_w, want_w)
        assert ((got_w.sum(-1) - 1).abs() > 1e-3).any()        # not renormalised top-2


def test_dense_tensors_match_what_transformers_saves(ckpts):
    """The packer's list is exactly the checkpoint's non-expert tensors, shapes included."""
    for family, d in ckpts.items():
        cfg = json.loads((d / "config.json").read_text())
        saved = {n: tuple(t.shape) for n, t in load_file(str(d / "model.safetensors")).items()
                 if ".experts." not in n}
        assert dense_tensors(cfg) == saved, family
