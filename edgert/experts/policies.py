"""Eviction policies of the expert cache: which resident expert of a layer leaves next.

The mechanism (`ExpertCache` in cache.py over `ExpertSlots` in slots.py) owns slots, pins
and loads; a policy only observes events and, when a slot is needed, picks the victim among
the candidates the mechanism offers (resident, loaded, unpinned experts of one layer). A new
policy is one class here plus one enum value; the mechanism has no `if policy == ...`.

Slot partition: per layer. Each MoE layer owns a quota of slots (total // layers) and a
victim is chosen among that layer's experts only. Why not one global ordering: a forward
pass visits layers cyclically, so globally the least recently used expert always belongs to
the layer that runs next -- LRU over all layers evicts exactly what is needed soonest, the
classic cyclic-scan failure. Per-layer quotas keep each layer's working set independent and
match the mixtral-offloading baseline (a fixed number of slots per layer), so the benchmark
compares policies, not partitions. (The mechanism lets a layer borrow a slot beyond its
quota only when it must pin more experts at once than its quota holds; see slots.py.)

Events, in the order the mechanism sends them for one layer and one step:
`observe(layer, probs)` with the router's probabilities of every expert (gate-score uses the
unselected experts' scores too), then `on_access(layer, expert)` per expert used (hit or
load, in acquire order), `on_insert` when an expert becomes resident (demand or prefetch),
`on_evict` when it leaves.
"""
from __future__ import annotations

import bisect
import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np


class PolicyName(str, enum.Enum):
    LRU = "lru"
    LFU = "lfu"
    GATE = "gate"
    BELADY = "belady"
    STALE = "stale"


class EvictionPolicy(ABC):
    """Base: a recency clock shared by every policy (used for tie-breaks)."""

    name: PolicyName
    observes_scores = False   # True: the mechanism must pass router probabilities to observe()

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self._clock = 0
        # last_use[layer, expert]: clock of the latest access or insert (0 = never)
        self.last_use = np.zeros((num_layers, num_experts), dtype=np.int64)

    def observe(self, layer: int, probs: np.ndarray) -> None:
        """Router probabilities [T, E] of `layer` for the current step (all experts)."""

    def on_access(self, layer: int, expert: int) -> None:
        self._clock += 1
        self.last_use[layer, expert] = self._clock

    def on_insert(self, layer: int, expert: int) -> None:
        """`expert` became resident. It counts as recently used so that it is not the very
        next victim (a prefetched expert must survive until the step that wanted it)."""
        self._clock += 1
        self.last_use[layer, expert] = self._clock

    def on_evict(self, layer: int, expert: int) -> None:
        pass

    @abstractmethod
    def victim(self, layer: int, candidates: Sequence[int]) -> int:
        """One of `candidates` (non-empty: resident, loaded, unpinned experts of `layer`)."""

    def _lru_among(self, layer: int, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda e: (self.last_use[layer, e], e))


class LRUPolicy(EvictionPolicy):
    """Least recently used, per layer (mixtral-offloading's policy)."""

    name = PolicyName.LRU

    def victim(self, layer, candidates):
        return self._lru_among(layer, candidates)


class LFUPolicy(EvictionPolicy):
    """Least frequently used, with aging: fewest accesses, where a layer's counts are halved
    each time it has seen `age_every` accesses per expert (so a service that runs all day
    forgets the morning's topic within a few hundred tokens instead of never); ties go to
    the least recent. `age_every=0` keeps counts since start."""

    name = PolicyName.LFU
    # NOTE: 64 accesses per expert is ~8x longer than the benchmark's runs (256 steps of
    # top-8 over 64 experts = 32 per expert), so aging never acts inside one of them
    AGE_EVERY = 64

    def __init__(self, num_layers, num_experts, age_every: int = AGE_EVERY):
        super().__init__(num_layers, num_experts)
        if age_every < 0:
            raise ValueError(f"age_every must be >= 0, got {age_every}")
        self.uses = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.age_after = age_every * num_experts          # accesses of a layer between halvings
        self.since_aging = np.zeros(num_layers, dtype=np.int64)

    def on_access(self, layer, expert):
        super().on_access(layer, expert)
        self.uses[layer, expert] += 1
        if self.age_after:
            self.since_aging[layer] += 1
            if self.since_aging[layer] >= self.age_after:
                self.uses[layer] >>= 1
                self.since_aging[layer] = 0

    def victim(self, layer, candidates):
        return min(candidates, key=lambda e: (self.uses[layer, e], self.last_use[layer, e], e))


class GateScorePolicy(EvictionPolicy):
    """Lowest decayed mean gate score (SMoE's importance): each step, every expert's score
    moves toward its mean router probability over the step's tokens, selected or not:
    `score = decay * score + (1 - decay) * mean_t probs[t, e]`. `decay = 1 - 1/n`
    approximates a mean over the last n steps. Ties go to the least recently used."""

    name = PolicyName.GATE
    observes_scores = True

    def __init__(self, num_layers, num_experts, decay: float = 0.9):
        super().__init__(num_layers, num_experts)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.score = np.zeros((num_layers, num_experts), dtype=np.float64)

    def observe(self, layer, probs):
        mean = np.asarray(probs, dtype=np.float64).reshape(-1, self.num_experts).mean(axis=0)
        self.score[layer] = self.decay * self.score[layer] + (1.0 - self.decay) * mean

    def victim(self, layer, candidates):
        return min(candidates, key=lambda e: (self.score[layer, e], self.last_use[layer, e], e))


class LeastStalePolicy(EvictionPolicy):
    """Least stale (after SpecMD's observation that plain recency and frequency misjudge MoE
    reuse): an expert is fresh while the router keeps ranking it near the top, chosen or
    not. Each step, the `width` highest-scoring experts of every token (default E / 4, about
    twice the top-k of the shapes people deploy) are marked fresh; the victim is the expert
    marked longest ago, then the least used, then the least recent."""

    name = PolicyName.STALE
    observes_scores = True

    def __init__(self, num_layers, num_experts, width: int | None = None):
        super().__init__(num_layers, num_experts)
        self.width = max(1, min(num_experts, width or num_experts // 4))
        self.step = np.zeros(num_layers, dtype=np.int64)
        self.fresh = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.uses = np.zeros((num_layers, num_experts), dtype=np.int64)

    def observe(self, layer, probs):
        p = np.asarray(probs).reshape(-1, self.num_experts)
        self.step[layer] += 1
        near = np.argpartition(-p, self.width - 1, axis=1)[:, :self.width]
        self.fresh[layer, np.unique(near)] = self.step[layer]

    def on_access(self, layer, expert):
        super().on_access(layer, expert)
        self.uses[layer, expert] += 1

    def victim(self, layer, candidates):
        return min(candidates, key=lambda e: (self.fresh[layer, e], self.uses[layer, e],
                                              self.last_use[layer, e], e))


class BeladyPolicy(EvictionPolicy):
    """Offline optimal (Belady's MIN) on a recorded trace: evict the expert whose next use
    lies farthest in the future (never used again = infinitely far).

    `future` maps layer -> the sequence of experts that layer will access, in access order
    (`ExpertCache.trace()` of a previous run of the same workload). Each `on_access` moves the
    layer's cursor one step; a run that diverges from the trace stays correct but is no longer
    optimal. For the benchmark only: a real server does not know the future.
    """

    name = PolicyName.BELADY

    def __init__(self, num_layers, num_experts, future: Mapping[int, Sequence[int]] | None = None):
        super().__init__(num_layers, num_experts)
        if future is None:
            raise ValueError("BeladyPolicy needs the recorded future access trace")
        self.cursor = [0] * num_layers
        # positions[layer][expert] = sorted access indices of that expert in the layer's trace
        self.positions: list[dict[int, list[int]]] = [dict() for _ in range(num_layers)]
        for layer, seq in future.items():
            pos = self.positions[int(layer)]
            for i, e in enumerate(seq):
                pos.setdefault(int(e), []).append(i)

    def on_access(self, layer, expert):
        super().on_access(layer, expert)
        self.cursor[layer] += 1

    def next_use(self, layer: int, expert: int) -> float:
        pos = self.positions[layer].get(expert)
        if not pos:
            return float("inf")
        i = bisect.bisect_left(pos, self.cursor[layer])
        return float(pos[i]) if i < len(pos) else float("inf")

    def victim(self, layer, candidates):
        return max(candidates,
                   key=lambda e: (self.next_use(layer, e), -self.last_use[layer, e], -e))


_POLICIES: dict[PolicyName, type[EvictionPolicy]] = {
    PolicyName.LRU: LRUPolicy, PolicyName.LFU: LFUPolicy,
    PolicyName.GATE: GateScorePolicy, PolicyName.BELADY: BeladyPolicy,
    PolicyName.STALE: LeastStalePolicy,
}


def make_policy(name: str | PolicyName, num_layers: int, num_experts: int,
                **options) -> EvictionPolicy:
    """The policy called `name` ("lru", "lfu", "gate", "belady", "stale"); options go to its
    constructor (`decay=` for gate, `future=` for belady, `width=` for stale)."""
    try:
        key = PolicyName(name)
    except ValueError:
        raise ValueError(f"unknown expert policy {name!r}; known: "
                         f"{', '.join(p.value for p in PolicyName)}") from None
    return _POLICIES[key](num_layers, num_experts, **options)


__all__ = ["PolicyName", "EvictionPolicy", "LRUPolicy", "LFUPolicy", "GateScorePolicy",
           "BeladyPolicy", "LeastStalePolicy", "make_policy"]
