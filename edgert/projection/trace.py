"""Routing traces: which experts a model chose, with its router probabilities, per token
and layer, recorded from a real run and replayed by the projection (replay.py).

`TraceRecorder` is an `ExpertProvider` that computes with resident experts (it wraps
`ResidentExperts`) and records every `route` (probabilities [T, E] and top-k ids) and every
`hint` (the next layer's predicted probabilities, which the engine computes because the
recorder asks for hints). A `RoutingTrace` is one request: its steps (the prefill's T
tokens, then one token per decode step) and per token and MoE layer the probabilities,
the top-k and the hint. `save`/`load` keep a list of them (one per request) in one npz.

`synthesize` maps a recorded trace onto a larger model shape (docs/benchmarks.md, "MoE
decode under expert budgets", says how and what it keeps).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class RoutingTrace:
    steps: np.ndarray      # [S] tokens per step: prefill T, then 1 per decode step
    probs: np.ndarray      # [N, L, E] router probabilities (N = steps.sum(), L = MoE layers)
    topk: np.ndarray       # [N, L, k] selected experts, int16
    hints: np.ndarray      # [N, L, E] hinted probabilities of layer l (made at layer l-1)
    hinted: np.ndarray     # [S, L] bool: step s had a hint for layer l
    layers: tuple          # MoE layer ids (axis 1)

    @property
    def num_experts(self) -> int:
        return self.probs.shape[2]

    @property
    def top_k(self) -> int:
        return self.topk.shape[2]

    def step_rows(self):
        """(step index, row slice) per step."""
        start = 0
        for s, n in enumerate(self.steps.tolist()):
            yield s, slice(start, start + n)
            start += n

    def decode_tokens(self) -> int:
        return int((self.steps == 1).sum()) - (1 if self.steps[0] == 1 else 0)


def save(traces: list[RoutingTrace], path) -> None:
    arrays = {}
    for i, t in enumerate(traces):
        arrays.update({f"{i}/steps": t.steps, f"{i}/probs": t.probs, f"{i}/topk": t.topk,
                       f"{i}/hints": t.hints, f"{i}/hinted": t.hinted,
                       f"{i}/layers": np.asarray(t.layers, np.int32)})
    np.savez_compressed(path, **arrays)


def load(path) -> list[RoutingTrace]:
    with np.load(Path(path)) as z:
        n = len({k.split("/")[0] for k in z.files})
        return [RoutingTrace(z[f"{i}/steps"], z[f"{i}/probs"], z[f"{i}/topk"], z[f"{i}/hints"],
                             z[f"{i}/hinted"], tuple(z[f"{i}/layers"].tolist()))
                for i in range(n)]


class TraceRecorder:
    """An ExpertProvider over `inner` (exact, every expert resident) that records routing.

    Events of one step arrive in the engine's order hint(l1), route(l0), hint(l2), route(l1),
    ...; an event that does not come later in that order than the previous one starts a new
    step."""

    max_acquire = None
    prefetch = True     # the engine computes hints for us to record

    def __init__(self, inner, layers):
        self.inner = inner
        self.layers = tuple(layers)
        self._pos = {l: i for i, l in enumerate(self.layers)}
        self._steps: list[dict] = []
        self._last = None

    def _event(self, key: int, T: int) -> dict:
        if self._last is None or key <= self._last:
            self._steps.append({"T": T, "route": {}, "hint": {}})
        self._last = key
        return self._steps[-1]

    def route(self, layer, probs, topk_idx):
        i = self._pos[layer]
        step = self._event(2 * i, probs.shape[0])
        step["route"][i] = (probs.detach().float().cpu().numpy().reshape(probs.shape[0], -1),
                            topk_idx.detach().cpu().numpy().reshape(probs.shape[0], -1))
        return self.inner.route(layer, probs, topk_idx)

    def hint(self, layer, probs):
        i = self._pos[layer]
        p = probs.detach().float().cpu().numpy().reshape(-1, probs.shape[-1])
        self._event(2 * i - 3, p.shape[0])["hint"][i] = p

    def acquire(self, layer, expert_ids):
        return self.inner.acquire(layer, expert_ids)

    def release(self, layer, expert_ids):
        self.inner.release(layer, expert_ids)

    def stats(self):
        return self.inner.stats()

    def close(self):
        self.inner.close()

    def trace(self) -> RoutingTrace:
        """The steps recorded so far, as one request's trace."""
        L = len(self.layers)
        steps = [s for s in self._steps if len(s["route"]) == L]
        assert steps, "no complete step recorded"
        E = steps[0]["route"][0][0].shape[1]
        k = steps[0]["route"][0][1].shape[1]
        N = sum(s["T"] for s in steps)
        probs = np.zeros((N, L, E), np.float32)
        topk = np.zeros((N, L, k), np.int16)
        hints = np.zeros((N, L, E), np.float32)
        hinted = np.zeros((len(steps), L), bool)
        row = 0
        for si, s in enumerate(steps):
            T = s["T"]
            for i, (p, t) in s["route"].items():
                probs[row:row + T, i], topk[row:row + T, i] = p, t
            for i, p in s["hint"].items():
                hints[row:row + T, i] = p
                hinted[si, i] = True
            row += T
        return RoutingTrace(np.array([s["T"] for s in steps], np.int32), probs, topk, hints,
                            hinted, self.layers)


def synthesize(trace: RoutingTrace, layers: int, experts: int) -> RoutingTrace:
    """`trace` mapped onto a model with `layers` MoE layers of `experts` experts (same top-k).

    Each target layer j concatenates the routing of m = experts / E source layers (E: the
    source's experts per layer), each scaled by 1/m: its probabilities are a distribution
    over m * E experts whose top-k follow the recorded choices, with the recorded skew and
    token-to-token locality of each source layer. Source layers are taken in turn,
    (j * m + i) mod L_src for i < m, so every source layer is used as evenly as possible
    and no target layer repeats one. Hints are mapped the same way. m = 1 copies layers."""
    E, k, L_src = trace.num_experts, trace.top_k, len(trace.layers)
    if experts % E:
        raise ValueError(f"cannot map {E} experts per layer onto {experts} (not a multiple)")
    m = experts // E
    if m > L_src:
        raise ValueError(f"{experts} experts per layer need {m} source layers, the trace has {L_src}")
    N = trace.probs.shape[0]
    probs = np.empty((N, layers, experts), np.float32)
    hints = np.empty((N, layers, experts), np.float32)
    hinted = np.ones((len(trace.steps), layers), bool)
    for j in range(layers):
        src = [(j * m + i) % L_src for i in range(m)]
        probs[:, j] = np.concatenate([trace.probs[:, s] for s in src], axis=1) / m
        hints[:, j] = np.concatenate([trace.hints[:, s] for s in src], axis=1) / m
        for s in src:
            hinted[:, j] &= trace.hinted[:, s]
    hinted[:, 0] = False                       # the first layer has no layer before it
    # top-k of the concatenation, ordered as torch.topk orders them (descending)
    topk = torch.topk(torch.from_numpy(probs), k, dim=-1).indices.numpy().astype(np.int16)
    return RoutingTrace(trace.steps.copy(), probs, topk, hints, hinted, tuple(range(layers)))
