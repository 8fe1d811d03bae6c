"""The benchmark's Mixtral checkpoint written as GGUF (with the `gguf` package), for llama.cpp.

llama.cpp runs Mixtral as its ``llama`` architecture with stacked expert tensors
(``blk.N.ffn_{gate,up,down}_exps``, ``[E, F, H]`` / ``[E, H, F]`` as numpy shapes) and the
router as ``blk.N.ffn_gate_inp``; names come from gguf's own table (``gguf.TENSOR_NAMES``).
Two conversions llama.cpp expects of a Hugging Face llama-family checkpoint:
- q and k rows are reordered per head: HF's rotary embedding pairs dimension i with
  i + d/2 (rotate-half), llama's GGML rope pairs 2i with 2i + 1;
- no tokenizer is needed (``no_vocab``): the benchmark feeds token ids (its byte-level
  tokenizer's ids are byte values), so the vocabulary size is the only vocabulary metadata.

Quantization like edgert's low-bit packs: only the expert weights (``q8_0``: 8.5 bits per
weight, blocks of 32 with an fp16 scale; ``q4_0``: 4.5 bits, blocks of 32); embeddings,
norms, router, attention and head stay float32, as in an edgert pack without
``--quant-dense``. ``f32`` keeps everything float32 (the checkpoint's precision).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

QTYPES = ("f32", "q8_0", "q4_0")


def _qtype(name: str):
    import gguf
    return {"f32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[name]


def rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """q or k projection rows [heads * d, H] from rotate-half order to interleaved pairs:
    per head, rows (0, d/2, 1, d/2+1, ...)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Checkpoint:
    """Tensors of a Mixtral checkpoint (hub layout ``experts.N.w1/w2/w3`` or transformers'
    fused ``experts.gate_up_proj``/``down_proj``), as float32 numpy."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open
        self.files = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            h = safe_open(str(f), "np")
            for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                self.files[k] = h

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self.files[name].get_tensor(name), np.float32)

    def has(self, name: str) -> bool:
        return name in self.files

    def experts(self, layer: int, n: int, ffn: int):
        """(gate [E, F, H], up [E, F, H], down [E, H, F]) of one layer."""
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        if self.has(f"{p}.0.w1.weight"):
            return tuple(np.stack([self.get(f"{p}.{e}.{w}.weight") for e in range(n)])
                         for w in ("w1", "w3", "w2"))
        p = f"model.layers.{layer}.mlp.experts"
        gate_up = self.get(f"{p}.gate_up_proj")
        return gate_up[:, :ffn], gate_up[:, ffn:], self.get(f"{p}.down_proj")

    def router(self, layer: int) -> np.ndarray:
        for n in (f"model.layers.{layer}.block_sparse_moe.gate.weight",
                  f"model.layers.{layer}.mlp.gate.weight"):
            if self.has(n):
                return self.get(n)
        raise KeyError(f"no router weight for layer {layer}")


def write_gguf(model_dir, out, qtype: str = "f32") -> dict:
    """Write ``out`` (GGUF) from the Mixtral checkpoint in ``model_dir``; returns what was
    written: bytes of the file, of the expert tensors, and their bits per weight."""
    import gguf
    if qtype not in QTYPES:
        raise ValueError(f"GGUF type {qtype!r}: choose one of {', '.join(QTYPES)}")
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "mixtral":
        raise ValueError(f"{model_dir}: a {cfg.get('model_type')!r} checkpoint; the GGUF "
                         f"export handles the benchmark's Mixtral only")
    h, ffn, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kvh = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or \
        cfg["num_attention_heads"]
    E, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 1e6))
    ck = _Checkpoint(model_dir)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(h)
    w.add_block_count(L)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kvh)
    w.add_rope_dimension_count(h // heads)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_expert_count(E)
    w.add_expert_used_count(k)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("no_vocab")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    names, T = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    expert_bytes = expert_weights = 0

    def put(kind, arr, bid=None, quantize=False):
        nonlocal expert_bytes, expert_weights
        name = names[kind].format(bid=bid) + ".weight"
        if quantize and qtype != "f32":
            q = gguf.quants.quantize(arr, _qtype(qtype))
            w.add_tensor(name, q, raw_dtype=_qtype(qtype))
            nbytes = q.nbytes
        else:
            arr = np.ascontiguousarray(arr, np.float32)
            w.add_tensor(name, arr)
            nbytes = arr.nbytes
        if quantize:
            expert_bytes += nbytes
            expert_weights += arr.size

    put(T.TOKEN_EMBD, ck.get("model.embed_tokens.weight"))
    put(T.OUTPUT_NORM, ck.get("model.norm.weight"))
    if ck.has("lm_head.weight"):
        put(T.OUTPUT, ck.get("lm_head.weight"))
    for i in range(L):
        a = f"model.layers.{i}"
        put(T.ATTN_NORM, ck.get(f"{a}.input_layernorm.weight"), i)
        put(T.ATTN_Q, rope_rows(ck.get(f"{a}.self_attn.q_proj.weight"), heads), i)
        put(T.ATTN_K, rope_rows(ck.get(f"{a}.self_attn.k_proj.weight"), kvh), i)
        put(T.ATTN_V, ck.get(f"{a}.self_attn.v_proj.weight"), i)
        put(T.ATTN_OUT, ck.get(f"{a}.self_attn.o_proj.weight"), i)
        put(T.FFN_NORM, ck.get(f"{a}.post_attention_layernorm.weight"), i)
        put(T.FFN_GATE_INP, ck.router(i), i)
        gate, up, down = ck.experts(i, E, ffn)
        put(T.FFN_GATE_EXP, gate, i, quantize=True)
        put(T.FFN_UP_EXP, up, i, quantize=True)
        put(T.FFN_DOWN_EXP, down, i, quantize=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"path": str(out), "qtype": qtype, "file_bytes": Path(out).stat().st_size,
            "expert_bytes": expert_bytes, "expert_bits_per_weight": 8 * expert_bytes /
            max(1, expert_weights)}
