"""Next-token choice from logits: greedy, temperature, nucleus (top-p)."""
from __future__ import annotations

import torch

# Below the smallest normal float32 a temperature cannot scale float32 logits (it rounds to a
# subnormal or to 0, and the division gives inf and NaN): such temperatures are greedy.
MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)   # 2**-126, about 1.18e-38


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """One token id from logits [vocab]; never NaN.

    temperature < MIN_TEMPERATURE (0 included) = greedy (first maximum). Otherwise the
    logits, less their maximum, are divided by the temperature, so the best token scales to
    0 and the rest to finite negatives or -inf: no overflow at any temperature. -inf logits
    are never chosen. ValueError when no logit is finite (nothing to sample from).
    """
    if temperature < MIN_TEMPERATURE:
        return int(torch.argmax(logits))
    x = logits.float()
    top = x.max()
    if not torch.isfinite(top):
        raise ValueError(f"sample: no finite logit to sample from (maximum {float(top)}, "
                         f"{x.numel()} logits)")
    probs = torch.softmax((x - top) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(max_new_tokens, temperature, top_p) -> None:
    """ValueError naming the option, before any work: a count >= 1, a finite temperature
    >= 0 (below MIN_TEMPERATURE: greedy), top_p in (0, 1]."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not 0.0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), "
                         f"got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
