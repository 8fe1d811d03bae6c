"""The MoE architectures edgert packs and runs: what each family's checkpoint holds.

Shared by the packer (edgert.pack.hf_import) and the engine (edgert.kinds.moe,
edgert.engines.moe_layers); a table, not a packer, so engines may import it.
`dense_tensors(config)` is the one list of every non-expert tensor the engine computes
with: the packer refuses a checkpoint that differs from it, the engine a pack that does.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedModel


@dataclass(frozen=True)
class MoeFamily:
    """Where a family keeps its experts and what each tensor is called (hub layout)."""
    name: str
    moe_prefix: str          # module under model.layers.N holding router + experts
    gate: str                # expert tensor names (hub layout) for gate / up / down
    up: str
    down: str
    ffn_key: str             # config key of one expert's FFN width
    norm: str = "rms"        # "rms": RMSNorm (weight); "layer": LayerNorm (weight, bias)
    qk_norm: str | None = None   # None; "head": RMSNorm over each head; "full": over q/k width
    router: str = "softmax"  # "softmax": softmax then top-k; "sparsemixer": PhiMoE's top-2
    fused_router: str = "gate"   # the router's name under "mlp" in transformers' fused format


FAMILIES = {
    "MixtralForCausalLM": MoeFamily("mixtral", "block_sparse_moe", "w1", "w3", "w2",
                                    "intermediate_size"),
    "Qwen2MoeForCausalLM": MoeFamily("qwen2_moe", "mlp", "gate_proj", "up_proj", "down_proj",
                                     "moe_intermediate_size"),
    "Qwen3MoeForCausalLM": MoeFamily("qwen3_moe", "mlp", "gate_proj", "up_proj", "down_proj",
                                     "moe_intermediate_size", qk_norm="head"),
    "OlmoeForCausalLM": MoeFamily("olmoe", "mlp", "gate_proj", "up_proj", "down_proj",
                                  "intermediate_size", qk_norm="full"),
    "PhimoeForCausalLM": MoeFamily("phimoe", "block_sparse_moe", "w1", "w3", "w2",
                                   "intermediate_size", norm="layer", router="sparsemixer",
                                   fused_router="router"),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def family_of(config: dict) -> MoeFamily:
    archs = config.get("architectures") or []
    for a in archs:
        if a in FAMILIES:
            return FAMILIES[a]
    raise UnsupportedModel(f"architectures {archs!r} is not supported; edgert packs "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def num_experts(config: dict) -> int:
    """Experts per sparse layer. transformers 5 writes either key for the same field
    (Qwen3-MoE's config.json says num_local_experts, the hub's says num_experts)."""
    for key in ("num_experts", "num_local_experts"):
        if config.get(key) is not None:
            return int(config[key])
    return 0


def moe_layers(config: dict, fam: MoeFamily) -> list[int]:
    """Layer indices with a sparse MoE block (the Qwen families may interleave dense MLPs)."""
    n = int(config["num_hidden_layers"])
    if fam.name not in ("qwen2_moe", "qwen3_moe"):
        return list(range(n))
    if num_experts(config) <= 0:
        return []
    dense = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step", 1) or 1)
    return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(
        config["num_attention_heads"]))


def dense_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Every non-expert tensor the engine uses for `config`, hub names -> shape.

    lm_head.weight is absent when the embeddings are tied."""
    fam = family_of(config)
    hid, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    D = head_dim(config)
    E = num_experts(config)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hid)}

    def norm(name):
        out[name + ".weight"] = (hid,)
        if fam.norm == "layer":
            out[name + ".bias"] = (hid,)

    def linear(name, rows, cols, bias):
        out[name + ".weight"] = (rows, cols)
        if bias:
            out[name + ".bias"] = (rows,)

    if fam.name == "qwen2_moe":
        qkv_bias, o_bias = bool(config.get("qkv_bias", True)), False
    elif fam.name == "mixtral":
        qkv_bias = o_bias = False
    else:
        qkv_bias = o_bias = bool(config.get("attention_bias", False))
    sparse = set(moe_layers(config, fam))
    for l in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{l}."
        norm(p + "input_layernorm")
        norm(p + "post_attention_layernorm")
        a = p + "self_attn."
        linear(a + "q_proj", heads * D, hid, qkv_bias)
        linear(a + "k_proj", kv * D, hid, qkv_bias)
        linear(a + "v_proj", kv * D, hid, qkv_bias)
        linear(a + "o_proj", hid, heads * D, o_bias)
        if fam.qk_norm == "head":
            out[a + "q_norm.weight"] = out[a + "k_norm.weight"] = (D,)
        elif fam.qk_norm == "full":
            out[a + "q_norm.weight"], out[a + "k_norm.weight"] = (heads * D,), (kv * D,)
        m = p + fam.moe_prefix + "."
        if l in sparse:
            out[m + "gate.weight"] = (E, hid)
            shared = int(config.get("shared_expert_intermediate_size") or 0)
            if fam.name == "qwen2_moe" and shared > 0:
                for n in ("gate_proj", "up_proj"):
                    out[f"{m}shared_expert.{n}.weight"] = (shared, hid)
                out[m + "shared_expert.down_proj.weight"] = (hid, shared)
                out[m + "shared_expert_gate.weight"] = (1, hid)
        else:
            ffn = int(config["intermediate_size"])
            out[p + "mlp.gate_proj.weight"] = out[p + "mlp.up_proj.weight"] = (ffn, hid)
            out[p + "mlp.down_proj.weight"] = (hid, ffn)
    norm("model.norm")
    if not config.get("tie_word_embeddings", False):
        linear("lm_head", vocab, hid, fam.name == "phimoe" and config.get("lm_head_bias", False))
    return out


def hub_name(fam: MoeFamily, name: str) -> str:
    """A non-expert tensor's hub name, given its name in either layout: transformers 5's
    fused format keeps every router under "mlp" (PhiMoE's as "router")."""
    if fam.moe_prefix == "mlp" and fam.fused_router == "gate":
        return name
    parts = name.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[3] == "mlp" \
            and parts[4] == fam.fused_router and parts[5] == "weight":
        return f"model.layers.{parts[2]}.{fam.moe_prefix}.gate.weight"
    return name


def check_runnable(config: dict) -> MoeFamily:
    """The config's family, or UnsupportedModel naming the first setting the engine lacks.
    Called by the packer (before reading a tensor) and by the engine (before loading)."""
    fam = family_of(config)
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config.get('hidden_act')!r}; edgert runs silu experts")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedModel(f"{fam.name}: rope_type {rope_type!r}; edgert implements default "
                               f"RoPE only")
    if fam.router == "sparsemixer" and int(config.get("num_experts_per_tok", 2)) != 2:
        raise UnsupportedModel(f"{fam.name}: num_experts_per_tok "
                               f"{config['num_experts_per_tok']}; sparsemixer routing is top-2")
    if fam.qk_norm == "full" and head_dim(config) * int(config["num_attention_heads"]) != int(
            config["hidden_size"]):
        raise UnsupportedModel(f"{fam.name}: head_dim {head_dim(config)} x heads is not "
                               f"hidden_size; its q_norm spans hidden_size")
    return fam
