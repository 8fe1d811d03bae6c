"""The math of the MoE decoder families as small pure functions over torch tensors.

Everything here follows the families' definitions (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
PhiMoE: transformers' modeling files) operation by operation in the same order, so in float32
the engine's logits match the reference implementation to rounding, and in float16 / bfloat16
they round where it rounds. Shapes: T = new tokens, S = tokens in the cache, H = heads,
Hk = kv heads, D = head dim, E = experts, k = experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgert.engines.lowbit import linear
from edgert.pack.families import check_runnable, head_dim, moe_layers, num_experts


@dataclass(frozen=True)
class MoeConfig:
    family: str                 # a families.FAMILIES name: "mixtral", "qwen3_moe", ...
    moe_prefix: str             # "block_sparse_moe" | "mlp"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float              # the norms' eps (PhiMoE's LayerNorms take it too)
    rope_theta: float
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    moe_layers: tuple[int, ...]
    shared_expert: bool
    sliding_windows: tuple      # per layer: None (full attention) or window in tokens
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    norm: str = "rms"           # "rms" | "layer" (LayerNorm with bias)
    qk_norm: str | None = None  # None | "head" (per head, Qwen3-MoE) | "full" (OLMoE)
    clip_qkv: float | None = None   # OLMoE: q, k, v clamped to [-clip, clip] after the norms
    router: str = "softmax"     # "softmax" | "sparsemixer" (PhiMoE)
    router_jitter: float = 0.0  # sparsemixer's jitter eps (its inference threshold)

    @classmethod
    def from_hf(cls, c: dict) -> "MoeConfig":
        fam = check_runnable(c)
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        n, heads = int(c["num_hidden_layers"]), int(c["num_attention_heads"])
        eos = c.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        norm_topk = bool(c.get("norm_topk_prob", False))
        if fam.name in ("mixtral", "phimoe"):    # every layer, or none, slides
            win = c.get("sliding_window")
            windows = (int(win) if win else None,) * n
            norm_topk = fam.name == "mixtral"
        elif fam.name == "qwen2_moe":
            types = c.get("layer_types") or [
                "sliding_attention" if c.get("use_sliding_window") and (i + 1) % 2
                and i < int(c.get("max_window_layers", n)) else "full_attention" for i in range(n)]
            win = c.get("sliding_window") if c.get("use_sliding_window") else None
            windows = tuple(int(win) if t == "sliding_attention" and win else None for t in types)
        elif fam.name == "qwen3_moe":
            win = c.get("sliding_window") if c.get("use_sliding_window") else None
            windows = (int(win) if win else None,) * n
        else:                                     # olmoe: full attention everywhere
            windows = (None,) * n
        clip = c.get("clip_qkv") if fam.name == "olmoe" else None
        return cls(
            family=fam.name, moe_prefix=fam.moe_prefix, vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]), num_layers=n, num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=head_dim(c),
            rms_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            num_experts=num_experts(c), top_k=int(c["num_experts_per_tok"]),
            norm_topk_prob=norm_topk, moe_layers=tuple(moe_layers(c, fam)),
            shared_expert=fam.name == "qwen2_moe"
            and int(c.get("shared_expert_intermediate_size") or 0) > 0,
            sliding_windows=windows, tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            eos_token_ids=eos, norm=fam.norm, qk_norm=fam.qk_norm,
            clip_qkv=None if clip is None else float(clip), router=fam.router,
            router_jitter=float(c.get("router_jitter_noise", 0.01)))


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x), computed in float32, returned in x's dtype (RMSNorm before its weight)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * rms_normalize(x, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dim (PhiMoE): one fused op, as torch.nn.LayerNorm runs it."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


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

    softmax routers: softmax over all experts, then top-k; Mixtral renormalises the top-k
    weights to sum to 1, the others only when `norm_topk_prob`. PhiMoE: `sparsemixer_top2`.
    `probs` (what the expert cache ranks by) is the softmax over all experts either way.
    """
    probs = F.softmax(router_logits.float(), dim=-1)
    if cfg.router == "sparsemixer":
        weights, idx = sparsemixer_top2(router_logits, cfg.router_jitter)
        return probs, weights, idx
    weights, idx = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if cfg.family == "mixtral":   # NOTE: Mixtral weighs expert outputs in float32 (half
        return probs, weights, idx  # precision: the product is rounded once, not twice)
    return probs, weights.to(router_logits.dtype), idx


def _sparsemixer_pick(scores: torch.Tensor, masked: torch.Tensor, eps: float):
    """One sparsemixer stage at inference: the best of `masked` and its weight, the softmax
    over the experts whose score is within a relative 2*eps of it (scores [T, E])."""
    top, idx = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=top)
    far = (top - scores) / factor > 2 * eps
    gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
    return gates.gather(-1, idx), idx


def sparsemixer_top2(scores: torch.Tensor, eps: float):
    """PhiMoE's router in eval mode (weights [T, 2] in the scores' dtype, ids [T, 2]).

    NOTE: training samples experts (Gumbel) and scales gradients; inference takes the
    argmax, then the argmax of the rest, each weighted by a softmax over the experts near
    it. The weights are not renormalised and do not sum to 1."""
    w1, e1 = _sparsemixer_pick(scores, scores, eps)
    rest = torch.scatter(scores, -1, e1, float("-inf"))
    w2, e2 = _sparsemixer_pick(scores, rest, eps)
    return torch.cat((w1, w2), dim=-1), torch.cat((e1, e2), dim=-1)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
           down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x). x [T, hidden]; gate/up [ffn, hidden]; down [hidden, ffn]
    (tensors, or low-bit linears of those shapes: edgert.engines.lowbit)."""
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)
