"""Mixed precision: a token's important experts at full precision, the rest from int4 copies.

The band (like substitution's): with S the (k+1)-th highest router probability of a token, a
selected expert scoring at least (1 + alpha) * S is computed from its full-precision weights
(read on a miss); every other selected expert from its int4 copy. Nothing is substituted:
each selected expert is computed, only its precision changes. alpha = 0 puts every selected
expert in the top band (every probability of the k selected is >= S).

`MixedExperts` holds two expert caches in one byte budget, one per precision, and reports
per precision hits, misses and bytes read, and the share of expert computations at int4.
NOTE: the budget is split between the two caches when the model loads (`split_budget`);
the policy does not yet move bytes from one precision to the other as demand shifts.
"""
from __future__ import annotations

import numpy as np
import torch

from edgert.errors import BudgetExceeded

DEFAULT_PRECISION_ALPHA = 1.0   # full precision at twice the first unselected probability
EXACT_SHARE = 0.5               # of the bytes: the full-precision cache's share


def precision_band(probs: torch.Tensor, topk: torch.Tensor, alpha: float) -> torch.Tensor:
    """[T, k] bool: True where the selected expert is in the top band (full precision).
    probs [T, E] (the softmax over all experts), topk [T, k]."""
    k, E = topk.shape[-1], probs.shape[-1]
    if k >= E:                      # every expert selected: no first unselected to compare to
        return torch.ones_like(topk, dtype=torch.bool)
    s = probs.float().topk(k + 1, dim=-1).values[:, -1:]              # [T, 1]
    return probs.float().gather(-1, topk) >= (1.0 + alpha) * s


def token_bands(band: torch.Tensor, topk: torch.Tensor) -> list[tuple[bool, list[int], list]]:
    """One token's selected experts by band, as Python lists (the decode step iterates these
    instead of indexing tensors per expert): [(high, columns of `topk` in the band in
    column order, [(expert, column)] by ascending expert id)], the top band first, empty
    bands left out. band, topk [1, k]."""
    hi, row = band[0].tolist(), topk[0].tolist()
    out = []
    for high in (True, False):
        sel = [j for j, h in enumerate(hi) if h == high]
        if sel:
            out.append((high, sel, sorted((row[j], j) for j in sel)))
    return out


def split_budget(total_bytes: int, exact_slot: int, low_slot: int, n_experts: int,
                 top_k: int) -> tuple[int, int]:
    """(full-precision slots, int4 slots) for `total_bytes`: EXACT_SHARE of the bytes to the
    full-precision cache, the rest to int4, each at least top-k slots and at most every
    expert; BudgetExceeded when even that does not fit."""
    need = top_k * (exact_slot + low_slot)
    if total_bytes < need:
        raise BudgetExceeded(f"mixed-precision experts: top-{top_k} slots at each precision",
                             need, total_bytes)
    hi = min(n_experts, max(top_k, int(total_bytes * EXACT_SHARE) // exact_slot))
    lo = min(n_experts, max(top_k, (total_bytes - hi * exact_slot) // low_slot))
    return hi, lo


class MixedExperts:
    """Two providers (full precision, int4) and the band that picks between them."""

    max_acquire = 1     # the engine pins one expert at a time from either cache

    def __init__(self, exact, low, alpha: float):
        self.exact, self.low, self.alpha = exact, low, float(alpha)
        self.computed = np.zeros(2, dtype=np.int64)     # [full precision, int4]

    def provider(self, high: bool):
        return self.exact if high else self.low

    def note(self, n_high: int, n_low: int) -> None:
        self.computed += (n_high, n_low)

    def wants_hint(self, layer: int) -> bool:
        return any(_wants(p, layer) for p in (self.exact, self.low))

    def hint(self, layer: int, probs: torch.Tensor) -> None:
        for p in (self.exact, self.low):
            if _wants(p, layer):
                p.hint(layer, probs)

    def reset_stats(self) -> None:
        self.computed[:] = 0
        for p in (self.exact, self.low):
            p.reset_stats()

    def drain(self) -> None:
        for p in (self.exact, self.low):
            p.drain()

    def stats(self) -> dict:
        e, l = self.exact.stats(), self.low.stats()
        te, tl = e.get("total", {}), l.get("total", {})
        n = int(self.computed.sum())
        return {"provider": "mixed", "precision_alpha": self.alpha, "total": _merge(te, tl),
                "low_precision_share": float(self.computed[1]) / n if n else None,
                "computed": {"exact": int(self.computed[0]), "int4": int(self.computed[1])},
                "hits": te.get("exact_hits", 0) + tl.get("exact_hits", 0),
                "misses": te.get("misses", 0) + tl.get("misses", 0),
                "bytes_read": te.get("bytes_read", 0) + tl.get("bytes_read", 0),
                "exact": e, "int4": l}

    def close(self) -> None:
        self.exact.close()
        self.low.close()


def _wants(p, layer: int) -> bool:
    ask = getattr(p, "wants_hint", None)
    return ask(layer) if ask is not None else getattr(p, "prefetch", True)


def _merge(a: dict, b: dict) -> dict:
    """The two caches' totals as one: counts summed, hit rates over all demands."""
    out = {k: a[k] + b[k] for k in a if k in b and isinstance(a[k], (int, float))
           and not isinstance(a[k], bool) and not k.endswith(("_rate", "precision", "recall"))}
    d = out.get("demands", 0)
    out["exact_hit_rate"] = out.get("exact_hits", 0) / d if d else None
    out["effective_hit_rate"] = out["exact_hit_rate"]
    return out
