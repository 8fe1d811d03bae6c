"""The math of a Mixtral-family decoder as small pure functions over torch tensors.

Everything here follows the families' definitions (Mixtral, Qwen2-MoE) operation by
operation in the same order, so in float32 the engine's logits match the reference
implementation to rounding. Shapes: T = new tokens, S = tokens in the cache, H = heads,
Hk = kv heads, D = head dim, E = experts, k = experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgert.errors import UnsupportedModel
from edgert.pack.families import family_of, moe_layers


@dataclass(frozen=True)
class MoeConfig:
    family: str                 # "mixtral" | "qwen2_moe"
    moe_prefix: str             # "block_sparse_moe" | "mlp"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    moe_layers: tuple[int, ...]
    shared_expert: bool
    sliding_windows: tuple      # per layer: None (full attention) or window in tokens
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, c: dict) -> "MoeConfig":
        fam = family_of(c)
        if c.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act {c.get('hidden_act')!r}; edgert runs silu experts")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModel(f"rope_type {rope_type!r}; edgert implements default RoPE")
        theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        n, heads = int(c["num_hidden_layers"]), int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
        eos = c.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        if fam.name == "mixtral":
            win = c.get("sliding_window")
            windows = (int(win) if win else None,) * n
            norm_topk = True
        else:
            types = c.get("layer_types") or [
                "sliding_attention" if c.get("use_sliding_window") and (i + 1) % 2
                and i < int(c.get("max_window_layers", n)) else "full_attention" for i in range(n)]
            win = c.get("sliding_window") if c.get("use_sliding_window") else None
            windows = tuple(int(win) if t == "sliding_attention" and win else None for t in types)
            norm_topk = bool(c.get("norm_topk_prob", False))
        return cls(
            family=fam.name, moe_prefix=fam.moe_prefix, vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]), num_layers=n, num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=head_dim,
            rms_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            num_experts=int(c[fam.num_experts_key]), top_k=int(c["num_experts_per_tok"]),
            norm_topk_prob=norm_topk, moe_layers=tuple(moe_layers(c, fam)),
            shared_expert=fam.name == "qwen2_moe"
            and int(c.get("shared_expert_intermediate_size") or 0) > 0,
            sliding_windows=windows, tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            eos_token_ids=eos)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x), computed in float32, returned in x's dtype (RMSNorm before its weight)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * rms_normalize(x, eps)


class Rotary:
    """Default RoPE: cos/sin per position from inv_freq = theta^(-2i/D)."""

    def __init__(self, head_dim: int, theta: float, device: torch.device | str = "cpu"):
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
        self.inv_freq = (1.0 / (theta ** exponents)).to(device)  # computed on the CPU everywhere

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[:, None].float() * self.inv_freq   # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)              # [T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [heads, T, D]; cos, sin: [T, D]
    return x * cos + _rotate_half(x) * sin


def causal_mask(q_pos: torch.Tensor, S: int, window: int | None) -> torch.Tensor:
    """[T, S] bool, True where query at q_pos may see key j: j <= q and (q - j < window)."""
    j = torch.arange(S, device=q_pos.device)[None, :]
    q = q_pos[:, None]
    ok = j <= q
    if window is not None:
        ok &= j > q - window
    return ok


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """q [H, T, D], k/v [Hk, S, D] (any strides), mask [T, S] (None: every key visible)
    -> [T, H*D].

    Grouped-query attention without repeating K/V: query head h uses kv head h // rep
    (the families' repeat_kv), so the `rep` heads of one group are one matrix product."""
    H, T, D = q.shape
    Hk, S = k.shape[0], k.shape[1]
    rep = H // Hk
    qg = q.reshape(Hk, rep * T, D)
    scores = torch.matmul(qg, k.transpose(1, 2)) * (D ** -0.5)      # [Hk, rep*T, S]
    if mask is not None:
        scores = scores.view(Hk, rep, T, S).masked_fill(
            ~mask, torch.finfo(scores.dtype).min).view(Hk, rep * T, S)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).view(H, T, D)                        # [H, T, D]
    return out.transpose(0, 1).reshape(T, H * D)


def route(cfg: MoeConfig, router_logits: torch.Tensor):
    """(probs [T, E] float32, top-k weights [T, k], top-k expert ids [T, k]) per family.

    Both families: softmax over all experts, then top-k. Mixtral renormalises the top-k
    weights to sum to 1; Qwen2-MoE only when `norm_topk_prob`.
    """
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, idx = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights.to(router_logits.dtype), idx


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
           down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x). x [T, hidden]; gate/up [ffn, hidden]; down [hidden, ffn]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
