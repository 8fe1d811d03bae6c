"""Counters of the expert cache, per layer, and the rates derived from them.

Two levels, because they answer different questions:
- *demands* (router level, counted in `route`): one per token and selected expert. Each is an
  exact hit (resident and loaded when routed), a substitution (lossy mode served it with a
  resident unselected expert) or a miss. `exact_hit_rate = exact_hits / demands` and
  `effective_hit_rate = (exact_hits + substitutions) / demands` (what SMoE calls the cache
  ratio); they are reported apart so a lossy cache cannot pass for an exact one.
- *requests* (mechanism level, counted in `acquire`): one per expert a layer pins. A request
  is served by a resident expert (`ready_hits`), by waiting for a read already in flight
  (`inflight_waits`, never read twice) or by its own demand read (`loads`). Reads by the
  worker are `prefetch_loads` (from hints) and `ahead_loads` (routed experts read in parallel
  with acquire's own read).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class LayerCounters:
    demands: int = 0            # token x selected expert, at route time
    exact_hits: int = 0         # ... resident and loaded
    substitutions: int = 0      # ... replaced by a resident unselected expert (lossy only)
    inflight_at_route: int = 0  # ... still being read (counted as misses)
    requests: int = 0           # experts pinned by acquire
    ready_hits: int = 0
    inflight_waits: int = 0
    loads: int = 0              # demand reads
    ahead_loads: int = 0        # worker reads of routed, missing experts (beside acquire's)
    prefetch_loads: int = 0     # reads started by hint(), completed
    prefetch_used: int = 0      # ... of which a later acquire used before eviction
    prefetch_errors: int = 0    # ... that failed verification (the slot was freed)
    predicted: int = 0          # experts named by hints of this layer
    hints: int = 0              # hints received for this layer
    hints_queued: int = 0       # ... that queued a read (a predicted expert was missing)
    hints_skipped: int = 0      # hints the engine was told to skip (prefetch paused)
    demanded_after_hint: int = 0   # distinct experts routed in steps that had a hint
    demanded_and_predicted: int = 0
    evictions: int = 0
    borrowed: int = 0           # slots taken beyond the layer's quota (pins > quota)
    bytes_read: int = 0         # demand + prefetch
    stall_s: float = 0.0        # time acquire spent waiting on reads
    # demand reads split by what came before them: the first of an acquire follows compute
    # (storage and threads idle: measured ~0.1 ms dearer here), a next one follows a read
    first_reads: int = 0
    first_read_s: float = 0.0   # acquire's time in them (the read and its bookkeeping)
    next_reads: int = 0
    next_read_s: float = 0.0

    def add(self, other: "LayerCounters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def misses(self) -> int:
        return self.demands - self.exact_hits - self.substitutions

    def report(self) -> dict:
        d = asdict(self)
        d["misses"] = self.misses
        d["exact_hit_rate"] = _ratio(self.exact_hits, self.demands)
        d["effective_hit_rate"] = _ratio(self.exact_hits + self.substitutions, self.demands)
        d["substitution_rate"] = _ratio(self.substitutions, self.demands)
        d["request_hit_rate"] = _ratio(self.ready_hits, self.requests)
        # precision: prefetched reads that were used; recall: routed experts the hint predicted
        d["prefetch_precision"] = _ratio(self.prefetch_used, self.prefetch_loads)
        d["prefetch_recall"] = _ratio(self.demanded_and_predicted, self.demanded_after_hint)
        return d


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(layers: dict[int, LayerCounters]) -> dict:
    total = LayerCounters()
    for c in layers.values():
        total.add(c)
    return {"total": total.report(),
            "layers": {int(l): c.report() for l, c in sorted(layers.items())}}
