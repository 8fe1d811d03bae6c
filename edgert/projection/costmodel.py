"""What decoding one token costs, for the expert-cache projection (replay.py).

Two parts, one concept each:
- `ModelShape`: the sizes that decide the cost (MoE layers, experts per layer, top-k, bytes
  of one expert, dense bytes per layer); presets for the shapes people deploy (OLMoE-1B-7B,
  Qwen3-30B-A3B) and one from a pack's expert layout (the trained benchmark model).
- `CostModel`: seconds per event of a decode step: a storage read (latency + bytes /
  bandwidth; reads share the bandwidth one after another, their latencies overlap), a
  layer's dense compute, one expert's compute (a hit: its bytes streamed from memory), a
  prefetch hint (the next layer's router), the cache's bookkeeping per layer and per miss.
  `for_device` takes a device config's `perf:` figures (vendor specs, batch-1 decode is
  bandwidth-bound: time = max(bytes / memory bandwidth, FLOPs / compute) + launch overhead);
  `calibrated` takes figures measured on this machine in the same run (edgert bench moe).

Projected figures are projections: they hold as far as the figures and the model hold.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int                 # MoE layers
    experts: int                # per layer
    top_k: int
    expert_bytes: int           # one expert (gate|up|down) in the compute dtype
    hidden: int
    dense_bytes_per_layer: int  # attention, router and norms: read once per token and layer
    head_bytes: int             # lm head (+ final norm) per token

    @property
    def total_experts(self) -> int:
        return self.layers * self.experts

    @classmethod
    def from_name(cls, name: str) -> "ModelShape":
        try:
            return _SHAPES[name]
        except KeyError:
            raise ValueError(f"unknown model shape {name!r}; known: {', '.join(_SHAPES)}") from None

    @classmethod
    def from_layout(cls, name: str, layout, hidden: int, dense_bytes_per_layer: int,
                    head_bytes: int) -> "ModelShape":
        """The shape of a pack (`ExpertLayout`): the benchmark model."""
        return cls(name, len(layout.moe_layers), layout.num_experts, layout.top_k,
                   layout.extent_bytes, hidden, dense_bytes_per_layer, head_bytes)


def _attn_bytes(hidden: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    q = o = hidden * heads * head_dim
    kv = 2 * hidden * kv_heads * head_dim
    return (q + o + kv) * dtype_bytes


_SHAPES = {
    # allenai/OLMoE-1B-7B-0924: 16 layers, hidden 2048, 16 heads (MHA, head 128), 64 experts
    # of FFN 1024, top-8, vocab 50304, bf16: one expert 3 x 2048 x 1024 x 2 = 12.6 MB.
    "olmoe-1b-7b": ModelShape("olmoe-1b-7b", 16, 64, 8, 3 * 2048 * 1024 * 2, 2048,
                              _attn_bytes(2048, 16, 16, 128, 2) + 2048 * 64 * 2,
                              50304 * 2048 * 2),
    # Qwen/Qwen3-30B-A3B: 48 layers, hidden 2048, 32 query / 4 KV heads of 128, 128 experts
    # of FFN 768, top-8, vocab 151936, bf16: one expert 3 x 2048 x 768 x 2 = 9.4 MB.
    "qwen3-30b-a3b": ModelShape("qwen3-30b-a3b", 48, 128, 8, 3 * 2048 * 768 * 2, 2048,
                                _attn_bytes(2048, 32, 4, 128, 2) + 2048 * 128 * 2,
                                151936 * 2048 * 2),
}
SHAPES = tuple(_SHAPES)


@dataclass(frozen=True)
class CostModel:
    """Seconds per event (see the module docstring). Reads: `read_s(n)` alone; the replay
    serialises transfers on one bandwidth and overlaps latencies."""
    read_latency_s: float
    read_Bps: float
    token_s: float          # per token outside the MoE layers (embedding, lm head, norms)
    layer_s: float          # per MoE layer and token: attention, router
    expert_s: float         # per expert computed for one token (a hit's bytes streamed)
    hint_s: float           # one prefetch hint: the next layer's router on this state
    route_s: float = 0.0    # the cache's bookkeeping per layer (0 for resident experts)
    miss_s: float = 0.0     # CPU work per demand read beyond the read itself
    first_read_extra_s: float = 0.0  # more for a demand read that follows compute (the first
                                     # of an acquire) than for one right after another read
    prefetch_cpu_s: float = 0.0   # CPU work of one prefetch read that delays the engine
                                  # (cores all busy computing: 2 here; 0 on a GPU device)
    source: str = ""
    # (policy, route_s) where a policy's bookkeeping was measured apart (gate-score and
    # least-stale read every expert's router probability each layer: 1.6-1.8x LRU's on
    # this machine); `for_policy` picks it
    route_by_policy: tuple = ()

    def for_policy(self, policy: str) -> "CostModel":
        """These costs with `policy`'s own bookkeeping per layer, where it was measured."""
        r = dict(self.route_by_policy).get(str(policy))
        return self if r is None else replace(self, route_s=r)

    def read_s(self, nbytes: int) -> float:
        return self.read_latency_s + nbytes / self.read_Bps

    def resident_tpot(self, shape: ModelShape) -> float:
        """Every expert resident: the compute floor of a decode step."""
        return self.token_s + shape.layers * (self.layer_s + shape.top_k * self.expert_s)

    @classmethod
    def for_device(cls, perf, shape: ModelShape) -> "CostModel":
        """From a device config's `perf:` (edgert.config.Perf) and a model shape."""
        def stream(nbytes: int) -> float:  # batch 1: 2 FLOPs per weight, usually bandwidth-bound
            return max(nbytes / perf.memory_Bps, nbytes / 2 * 2 / perf.compute_flops)
        router = shape.hidden * shape.experts * 2
        return cls(read_latency_s=perf.storage_latency_s, read_Bps=perf.storage_read_Bps,
                   token_s=stream(shape.head_bytes) + perf.layer_overhead_s,
                   layer_s=stream(shape.dense_bytes_per_layer) + perf.layer_overhead_s,
                   expert_s=stream(shape.expert_bytes),
                   hint_s=stream(router) + perf.layer_overhead_s / 8,
                   source="vendor figures (device config perf:)")

    @classmethod
    def calibrated(cls, *, read_latency_s: float, read_Bps: float, resident_tpot_s: float,
                   layers: int, route_s: float, hint_s: float, miss_s: float = 0.0,
                   first_read_extra_s: float = 0.0,
                   route_by_policy: dict | None = None) -> "CostModel":
        """From figures measured on this machine: reads of one expert (O_DIRECT), the
        resident decode step, the cache's bookkeeping per layer (a cache that never misses
        minus resident) and one hint. Compute is lumped per layer (the step is Python-bound
        here: an expert costs about as much as its share of the layer). The prefetch thread's
        CPU work per read equals a demand read's (`miss_s`) and delays compute: every core
        computes here."""
        return cls(read_latency_s=read_latency_s, read_Bps=read_Bps, token_s=0.0,
                   layer_s=resident_tpot_s / layers, expert_s=0.0, hint_s=hint_s,
                   route_s=route_s, miss_s=miss_s, prefetch_cpu_s=miss_s,
                   first_read_extra_s=first_read_extra_s,
                   route_by_policy=tuple(sorted((route_by_policy or {}).items())),
                   source="measured on this machine")

    def with_(self, **kw) -> "CostModel":
        return replace(self, **kw)


def prefetch_pays(cost: CostModel, shape: ModelShape, precision: float = 0.5) -> bool:
    """Whether prefetch hints pay on this device and shape, by the cost model. A prefetched
    read that is used hides at most the compute it overlaps (one layer: `window`); one that
    is not used costs a hint and, when reads outlast the compute (the storage is the
    bottleneck), the bandwidth it took from demand reads. With `precision` the share of
    prefetched reads used, it pays when
        precision * min(read, window) > hint + (1 - precision) * max(0, read - window)."""
    window = cost.layer_s + shape.top_k * cost.expert_s + cost.route_s
    read = cost.read_s(shape.expert_bytes)
    return precision * min(read, window) > cost.hint_s + (1 - precision) * max(0.0, read - window)


def pack_shape(layout) -> ModelShape:
    """A pack's shape from its expert layout, for the cost model: attention and router
    bytes estimated from the hidden size (4 square projections + the router)."""
    ffn, hidden = layout.ffn_hidden if layout.tensors else (0, 0)
    # dense weights stay in the checkpoint's precision beside low-bit experts: say 16-bit
    itemsize = 2 if getattr(layout, "scheme", None) or not hidden else \
        max(1, layout.extent_bytes // max(1, 3 * hidden * ffn))
    return ModelShape("pack", len(layout.moe_layers), layout.num_experts, layout.top_k,
                      layout.extent_bytes, hidden,
                      4 * hidden * hidden * itemsize + hidden * layout.num_experts * itemsize, 0)


def prefetch_default(config, layout) -> bool:
    """The expert cache's prefetch for a device config (its `perf:` section) and a pack's
    expert layout: on where `prefetch_pays`; on when the config has no figures (the hint
    governor still pauses hints that queue no reads)."""
    perf = getattr(config, "perf", None)
    if perf is None:
        return True
    shape = pack_shape(layout)
    return prefetch_pays(CostModel.for_device(perf, shape), shape)


def misses_dominate(config, layout) -> bool:
    """Whether one expert's read outlasts a layer's compute on this device (its `perf:`),
    i.e. decode time follows the bytes read. False when the config has no figures."""
    perf = getattr(config, "perf", None)
    if perf is None:
        return False
    shape = pack_shape(layout)
    cost = CostModel.for_device(perf, shape)
    return cost.read_s(shape.expert_bytes) > cost.layer_s + shape.top_k * cost.expert_s


LFU_BELOW = 0.75   # cache fraction of all experts under which LFU is the default (see below)


def default_policy(config, layout, fraction: float = 0.0) -> str:
    """The expert cache's exact policy when the caller names none, for a cache holding
    `fraction` of all experts, from the cost model: LFU (with aging) where misses dominate
    and the cache holds under LFU_BELOW of the experts, LRU elsewhere or without figures.

    Why (edgert bench moe, projected per shipped config and shape): where a read outlasts a
    layer's compute, decode speed follows bytes read, and at budgets of 10-50% the
    cost-model chooser picked LFU on every config and shape (>= 2% faster than LRU, up to
    1.2x); at 75% it kept LRU (hits ~99.8%: no policy gained 2%). Where a miss costs less
    than a layer, the policies measure within noise of each other and LRU has the least
    bookkeeping."""
    if fraction >= LFU_BELOW or not misses_dominate(config, layout):
        return "lru"
    return "lfu"
