"""The MoE architectures edgert packs and runs: where each family keeps its experts.

Shared by the packer (edgert.pack.hf_import) and the engine (edgert.engines.moe_layers);
a table, not a packer, so engines may import it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedModel

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM")


@dataclass(frozen=True)
class MoeFamily:
    """Where a family keeps its experts and what each expert tensor is called."""
    name: str
    moe_prefix: str          # module under model.layers.N holding router + experts
    gate: str                # expert tensor names (hub layout) for gate / up / down
    up: str
    down: str
    num_experts_key: str
    ffn_key: str


FAMILIES = {
    "MixtralForCausalLM": MoeFamily("mixtral", "block_sparse_moe", "w1", "w3", "w2",
                                    "num_local_experts", "intermediate_size"),
    "Qwen2MoeForCausalLM": MoeFamily("qwen2_moe", "mlp", "gate_proj", "up_proj", "down_proj",
                                     "num_experts", "moe_intermediate_size"),
}


def family_of(config: dict) -> MoeFamily:
    archs = config.get("architectures") or []
    for a in archs:
        if a in FAMILIES:
            return FAMILIES[a]
    raise UnsupportedModel(f"architectures {archs!r} is not supported; edgert packs "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def moe_layers(config: dict, fam: MoeFamily) -> list[int]:
    """Layer indices with a sparse MoE block (Qwen2-MoE may interleave dense MLP layers)."""
    n = int(config["num_hidden_layers"])
    if fam.name == "mixtral":
        return list(range(n))
    if int(config.get("num_experts", 0)) <= 0:
        return []
    dense = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step", 1) or 1)
    return [i for i in range(n) if i not in dense and (i + 1) % step == 0]
