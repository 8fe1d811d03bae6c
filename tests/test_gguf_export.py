"""The GGUF export of `edgert bench moe --peer llama.cpp`: what gguf's own reader reads back
is the checkpoint (names and layout from gguf's tables, q/k rows in llama's rope order,
expert tensors quantized to Q8_0/Q4_0 within their schemes' error). No llama.cpp needed."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from moe_models import mixtral_config, save

from edgert.bench.gguf_export import rope_rows, write_gguf

H, F, E, HEADS, KVH = 64, 32, 4, 4, 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = mixtral_config(hidden_size=H, intermediate_size=F, num_local_experts=E,
                         num_attention_heads=HEADS, num_key_value_heads=KVH)
    return save(cfg, tmp_path_factory.mktemp("mixtral") / "m")


def _ckpt(model_dir):
    from safetensors.numpy import load_file
    return load_file(str(model_dir / "model.safetensors"))


def _tensors(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def test_rope_rows_interleaves_each_heads_halves():
    d, heads = 8, 2
    w = np.arange(heads * d, dtype=np.float32)[:, None]
    got = rope_rows(w, heads)[:, 0].astype(int).tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_f32_export_reads_back_as_the_checkpoint(model_dir, tmp_path):
    out = tmp_path / "m.f32.gguf"
    info = write_gguf(model_dir, out, "f32")
    ck = _ckpt(model_dir)
    r, t = _tensors(out)
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.expert_count"].contents() == E
    assert r.fields["llama.expert_used_count"].contents() == 2
    assert r.fields["tokenizer.ggml.model"].contents() == "no_vocab"
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_DOWN_EXP].format(bid=1) + ".weight"
    down = np.asarray(t[name].data)
    want = np.stack([ck[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"]
                     for e in range(E)])
    assert down.shape == want.shape == (E, H, F) and np.array_equal(down, want)
    q = np.asarray(t["blk.0.attn_q.weight"].data)
    assert np.array_equal(q, rope_rows(ck["model.layers.0.self_attn.q_proj.weight"], HEADS))
    k = np.asarray(t["blk.0.attn_k.weight"].data)
    assert np.array_equal(k, rope_rows(ck["model.layers.0.self_attn.k_proj.weight"], KVH))
    assert np.array_equal(np.asarray(t["blk.0.ffn_gate_inp.weight"].data),
                          ck["model.layers.0.block_sparse_moe.gate.weight"])
    assert info["expert_bits_per_weight"] == 32


@pytest.mark.parametrize("qtype,bits,tol", [("q8_0", 8.5, 0.01), ("q4_0", 4.5, 0.2)])
def test_quantized_export_holds_experts_in_its_scheme(model_dir, tmp_path, qtype, bits, tol):
    out = tmp_path / f"m.{qtype}.gguf"
    info = write_gguf(model_dir, out, qtype)
    assert info["expert_bits_per_weight"] == pytest.approx(bits)
    ck = _ckpt(model_dir)
    _, t = _tensors(out)
    gate = t["blk.0.ffn_gate_exps.weight"]
    assert gate.tensor_type == getattr(gguf.GGMLQuantizationType, qtype.upper())
    got = gguf.quants.dequantize(gate.data, gate.tensor_type)
    want = np.stack([ck[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"]
                     for e in range(E)])
    assert got.shape == want.shape
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < rel < tol
    assert t["blk.0.attn_v.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_wrong_type_and_family_are_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match="GGUF type 'q3_k'"):
        write_gguf(model_dir, tmp_path / "x.gguf", "q3_k")
