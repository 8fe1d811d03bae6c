"""Prefetch hints as pure logic: which predicted experts to read, and when to stop asking.

`rank_hint` turns an upcoming layer's predicted router probabilities into the experts worth
reading ahead. `HintGovernor` decides whether hints are worth computing at all: a hint
costs the engine a router product and some Python per layer, and it can only pay when it
queues a read. After `window` hints of which fewer than 1 in 64 queued one, it answers
"skip" for the next `pause` hints, then probes again. The expert cache owns one of each.
"""
from __future__ import annotations

import torch


def rank_hint(probs: torch.Tensor, width: int, min_prob: float, limit: int) -> list[int]:
    """Experts to prefetch, best first: per token its top `width` with probability >=
    `min_prob`; over several tokens ranked by summed probability; at most `limit`."""
    p = probs if probs.dim() == 2 else probs.reshape(-1, probs.shape[-1])
    top_p, top = torch.topk(p.float(), width, dim=-1)                         # [T, w]
    if p.shape[0] == 1:                                                         # decode
        ranked = [e for e, q in zip(top.tolist()[0], top_p.tolist()[0]) if q >= min_prob]
    else:                                                                       # prefill
        cand = torch.unique(top[top_p >= min_prob])
        order = torch.argsort(p[:, cand].sum(0), descending=True, stable=True)
        ranked = cand[order].tolist()
    return ranked[:limit]


class HintGovernor:
    """Pauses hints that queue (almost) no reads. `probe=None` never pauses."""

    def __init__(self, probe: tuple[int, int] | None = (256, 1024)):
        self.probe = probe
        self._seen = self._queued = self._skip = 0
        self.pauses = 0

    def wants(self) -> bool:
        """Ask before computing a hint; False while paused (each call uses up one skip)."""
        if self._skip:
            self._skip -= 1
            return False
        return True

    def observe(self, queued: bool) -> None:
        """After a hint: did it queue a read?"""
        if self.probe is None:
            return
        window, pause = self.probe
        self._seen += 1
        self._queued += queued
        if self._seen >= window:
            if self._queued * 64 < window:
                self._skip = pause
                self.pauses += 1
            self._seen = self._queued = 0
