"""Two ways to apply a token's top-k experts on the CPU, on the demo shape (hidden 128, ffn
256, 16 experts, top-2, float32, one thread):

  per-expert  one product per expert over the slot's own bytes (gate and up as one view)
  gather-bmm  gpt-fast's way: the k experts' weights gathered into one [k, ...] tensor (a copy
              of every selected expert), then two batched products
and, for the fused projections of engines/moe_step.py: q/k/v (GQA: k and v half of q) as
three products or one, gate/up as two products or one.

    PYTHONPATH=$PWD python tools/moe_gather_probe.py [--hidden 128 --ffn 256 --k 2]

Rows alternate within each round; prints microseconds per call (median of rounds) and the
largest difference between the two results. A shared machine makes these noisy.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from edgert.engines.moe_step import expert_terms


def _silu_mul(a: torch.Tensor) -> torch.Tensor:
    g, u = a.chunk(2, dim=-1)
    return F.silu(g) * u


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    H, Fd, k = a.hidden, a.ffn, a.k
    slots = [torch.randn(3 * Fd * H) * 0.05 for _ in range(a.experts)]   # one slot per expert
    views = [(s[:2 * Fd * H].view(2 * Fd, H), s[2 * Fd * H:].view(H, Fd)) for s in slots]
    x, w = torch.randn(1, H), torch.rand(k)

    def per_expert(ids):
        return expert_terms(x, [views[e] for e in ids], w, None)

    def gather_bmm(ids):
        W = torch.stack([slots[e] for e in ids])                          # the copy
        gu, down = W[:, :2 * Fd * H].view(k, 2 * Fd, H), W[:, 2 * Fd * H:].view(k, H, Fd)
        g, u = torch.bmm(gu, x.expand(k, H)[:, :, None])[:, :, 0].chunk(2, dim=-1)
        y = torch.bmm(down, (F.silu(g) * u)[:, :, None])[:, :, 0]
        return (y * w[:, None]).sum(0, keepdim=True)

    # one product over q/k/v (gate/up) stored back to back vs one per matrix
    qkv = torch.randn(2 * H, H) * 0.05
    q, k_, v = qkv[:H], qkv[H:3 * H // 2], qkv[3 * H // 2:]
    gu = views[0][0]
    fns = {"per-expert": per_expert, "gather-bmm": gather_bmm,
           "qkv-3": lambda ids: (F.linear(x, q), F.linear(x, k_), F.linear(x, v)),
           "qkv-fused": lambda ids: F.linear(x, qkv).split((H, H // 2, H // 2), dim=-1),
           "gate-up-2": lambda ids: F.silu(F.linear(x, gu[:Fd])) * F.linear(x, gu[Fd:]),
           "gate-up-fused": lambda ids: _silu_mul(F.linear(x, gu))}
    times = {n: [] for n in fns}
    picks = [[(i * 5 + j * 7) % a.experts for j in range(k)] for i in range(a.calls)]
    picks = [sorted(set(p)) if len(set(p)) == k else list(range(k)) for p in picks]
    for r in range(a.rounds):
        for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            f = fns[n]
            t0 = time.perf_counter()
            for p in picks:
                f(p)
            times[n].append((time.perf_counter() - t0) / a.calls * 1e6)
    for n, t in times.items():
        print(f"{n:13s} {statistics.median(t):8.1f} us/call  (rounds: "
              f"{', '.join(f'{v:.0f}' for v in t)})")
    diff = (per_expert(picks[0]) - gather_bmm(picks[0])).abs().max().item()
    print(f"max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
