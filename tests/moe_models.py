"""Tiny MoE checkpoints of every supported family for tests, made with transformers (test-only).

Weights are random but with a large init scale so routing and next tokens vary: with the
default 0.02 every token routes alike and greedy decoding repeats one token, which would
make "32 identical tokens" a weak check.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

import edgert
from edgert.config import DeviceConfig, parse_bytes
from edgert.experts.api import ExpertLayout, ExpertWeights

VOCAB = 96
HAS_CACHE = importlib.util.find_spec("edgert.experts.cache") is not None


def device_config(experts: str = "8 MiB", kv: str = "4 MiB", weights: str = "8 MiB",
                  dtype: str = "float32") -> DeviceConfig:
    """An arena of weights + experts + kv; experts is the default expert cache, kv the cap
    on KV pages."""
    arena = sum(parse_bytes(v, k) for k, v in
                {"weights": weights, "experts": experts, "kv": kv}.items())
    return DeviceConfig.from_dict({
        "name": "test", "threads": 1, "dtype": dtype,
        "memory": {"total": 64 << 20, "engine": (64 << 20) - arena, "experts": experts,
                   "kv": kv},
        "storage": {"read_mode": "buffered"}})


def runtime(**kw) -> edgert.Runtime:
    return edgert.Runtime(device_config(**kw))


def mixtral_config(**over):
    from transformers import MixtralConfig
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
              num_experts_per_tok=2, initializer_range=0.3, rms_norm_eps=1e-5,
              max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
              pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    kw.update(over)
    return MixtralConfig(**kw)


def qwen_config(**over):
    from transformers import Qwen2MoeConfig
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
              shared_expert_intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
              initializer_range=0.3, max_position_embeddings=512, bos_token_id=None,
              eos_token_id=None, pad_token_id=None,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kw.update(over)
    return Qwen2MoeConfig(**kw)


def qwen3_config(**over):
    """Qwen3-MoE: per-head q/k norms, head_dim apart from hidden / heads, 16 experts, top-8."""
    from transformers import Qwen3MoeConfig
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_experts=16, num_experts_per_tok=8, norm_topk_prob=True,
              initializer_range=0.3, max_position_embeddings=512, bos_token_id=None,
              eos_token_id=None, pad_token_id=None,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kw.update(over)
    return Qwen3MoeConfig(**kw)


def olmoe_config(**over):
    """OLMoE: q/k norms over the whole projection, 16 experts, top-8."""
    from transformers import OlmoeConfig
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_experts=16,
              num_experts_per_tok=8, initializer_range=0.3, max_position_embeddings=512,
              bos_token_id=None, eos_token_id=None, pad_token_id=None,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kw.update(over)
    return OlmoeConfig(**kw)


def phimoe_config(**over):
    """PhiMoE: LayerNorms with bias, sparsemixer top-2 routing."""
    from transformers import PhimoeConfig
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
              num_experts_per_tok=2, initializer_range=0.3, max_position_embeddings=512,
              bos_token_id=None, eos_token_id=None, pad_token_id=None,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kw.update(over)
    return PhimoeConfig(**kw)


_NEW_FAMILIES = ("qwen3_moe", "olmoe", "phimoe")


def packed_models(makers: dict, tmp_path_factory) -> dict:
    """name -> (pack, transformers reference) for each config maker: saved, then packed."""
    from edgert.pack.hf_import import pack_hf
    out = {}
    for name, make in makers.items():
        d = save(make(), tmp_path_factory.mktemp(name) / "ckpt")
        pack = d.parent / "model.edgepack"
        pack_hf(d, pack, progress=False)
        out[name] = (pack, reference(d))
    return out


def save(config, out: Path, seed: int = 0, dtype=torch.float32, **save_kw) -> Path:
    """Build a random model from `config`, save it with save_pretrained; its directory."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    new = config.model_type in _NEW_FAMILIES
    with torch.no_grad():  # the routers start at zero in Qwen2-MoE: give them a real spread
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or name.endswith("layernorm.weight") or new and (
                    name.endswith("router.weight") or name.endswith("norm.weight")):
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
            elif new and name.endswith(".bias"):   # biases start at zero: make them count
                p.normal_(0.0, 0.3)
    model.eval().to(dtype).save_pretrained(out, **save_kw)
    return Path(out)


def reference(model_dir: Path):
    """The transformers model in float32 with eager attention: the reference."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                dtype=torch.float32).eval()


def ref_logits(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def ref_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def prompt(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


class OnDemandExperts:
    """A provider with no cache: reads each expert through the reader on every acquire and
    lets the engine pin one expert at a time (the tightest grouping the engine supports)."""
    max_acquire = 1

    def __init__(self, reader):
        self.reader, self.layout = reader, ExpertLayout.from_reader(reader)
        self.pinned, self.hints, self.acquired = set(), [], []

    def route(self, layer, probs, topk_idx):
        return topk_idx

    def acquire(self, layer, ids) -> dict[int, ExpertWeights]:
        assert len(ids) <= self.max_acquire and not self.pinned
        out = {}
        for e in ids:
            data = self.reader.read_block(self.layout.block(layer, e))
            buf = np.frombuffer(bytearray(data), np.uint8)
            out[e] = self.layout.views(buf)
            self.pinned.add((layer, e))
            self.acquired.append((layer, e))
        return out

    def release(self, layer, ids):
        for e in ids:
            self.pinned.remove((layer, e))

    def hint(self, layer, probs):
        self.hints.append((layer, tuple(probs.shape)))

    def stats(self):
        return {"provider": "on-demand", "acquired": len(self.acquired)}
