"""The MoE decode step's hot path: pure tensor functions of fixed shape per model, so that one
`torch.compile` graph serves every layer and token (edgert/engines/compile.py).

Profile of the eager step before this (tools/profile_moe_decode.py, demo Mixtral, resident):
~90 `linear` calls and ~1,580 Python calls per token; per layer three q/k/v products, two
K/V gathers, and per expert separate gate and up products. Here:
- q, k, v are one product over one view where the pack's bytes lie back to back
  (kinds/moe_weights.py `_fuse_qkv`); gate and up likewise (`ExpertWeights.gate_up`);
- a token's experts are applied by `expert_terms`, one call per pinned group (the whole
  top-k with the expert cache or resident experts), summed in ascending expert id exactly
  as the token-batched path sums them, so results do not depend on the budget.

NOTE: "gather the top-k experts into one [k, F, H] tensor and bmm" (gpt-fast's way) copies
every selected expert's weights once more per token: on this CPU it measured 2.2x slower
than one product per expert over the slot's own bytes on the demo shape (hidden 128, top-2)
and 6.6x at hidden 1024, top-8 (tools/moe_gather_probe.py), and on a memory-bound edge
device the copy doubles the bytes a token moves. The experts are therefore applied where
they lie, without a copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_terms(x: torch.Tensor, mats: list[tuple[torch.Tensor, ...]],
                 coef: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """out + sum_i coef[i] * expert_i(x), terms added one by one in list order.

    x [1, hidden]; mats[i]: (gate_up [2F, H], down [H, F]) or (gate, up, down);
    coef [n] routing weights (float32 for Mixtral, else x's dtype). Each term is rounded to
    x's dtype before it is added, as the token-batched path does."""
    for i, m in enumerate(mats):       # n is fixed per model (top-k): unrolled when compiled
        if len(m) == 2:
            g, u = F.linear(x, m[0]).chunk(2, dim=-1)
            y = F.linear(F.silu(g) * u, m[1])
        else:
            y = F.linear(F.silu(F.linear(x, m[0])) * F.linear(x, m[1]), m[2])
        term = (y * coef[i]).to(y.dtype)
        out = term if out is None else out + term
    return out


def split_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """q [T, H*D], k and v [T, Hk*D] of one fused product (views, no copy)."""
    return qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
