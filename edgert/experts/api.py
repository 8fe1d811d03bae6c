"""The interface between the MoE engine and whatever holds expert weights.

The engine asks a provider which experts to compute with (`route`), pins them for one
layer's compute (`acquire` / `release`) and tells it early which experts an upcoming layer
will probably want (`hint`). `ResidentExperts` is the simplest provider: every expert
loaded once, exact. The expert cache (`edgert.experts.cache`) is the one that matters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from edgert.align import align_up
from edgert.dtypes import np_storage, torch_dtype
from edgert.engines.lowbit import Int4Linear, Int8Linear
from edgert.pack.quant import QuantOptionError
from edgert.errors import BudgetExceeded, PackCorrupt
from edgert.memory.slots import SlotPool


@dataclass
class ExpertWeights:
    """One expert's SwiGLU weights, views over the bytes that hold it (slot or buffer):
    tensors, or for a low-bit copy `edgert.engines.lowbit` linears over such views."""
    gate: torch.Tensor  # [ffn, hidden]
    up: torch.Tensor    # [ffn, hidden]
    down: torch.Tensor  # [hidden, ffn]
    # gate and up as one [2*ffn, hidden] view where the bytes hold them back to back (every
    # exact pack: hf_import._expert_layout), so the decode step does one product, not two
    gate_up: torch.Tensor | None = None


def lowbit_copy(reader, scheme: str, asked: str | None = None):
    """The pack's low-bit copy `scheme` ("int8" | "int4"); QuantOptionError naming the
    option (`precision=asked`, default the scheme) when the pack holds none."""
    lb = getattr(reader.manifest, "lowbit", None)
    have = sorted(lb.copies) if lb is not None else []
    if scheme not in have:
        raise QuantOptionError(f"precision={asked or scheme!r}: {getattr(reader, 'path', 'the pack')} "
                               f"holds no {scheme} copy of its experts (it holds "
                               f"{', '.join(have) or 'none'}; pack it with `edgert pack hf "
                               f"--quant {asked or scheme}`)")
    return lb.copies[scheme]


@runtime_checkable
class ExpertProvider(Protocol):
    def route(self, layer: int, probs: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """Expert ids [T, k] to compute with. Exact providers return `topk_idx` unchanged;
        a substituted expert's output is weighted by the weight of the expert it replaces."""

    def acquire(self, layer: int, expert_ids: list[int]) -> dict[int, ExpertWeights]:
        """Weights of `expert_ids`, pinned until `release(layer, expert_ids)`."""

    def release(self, layer: int, expert_ids: list[int]) -> None: ...

    def hint(self, layer: int, probs: torch.Tensor) -> None:
        """Predicted router probabilities [T, E] of an upcoming layer (for prefetch)."""

    def stats(self) -> dict: ...

    # Optional attribute `max_acquire: int | None`: how many experts one `acquire` may pin
    # (None = any number). The engine pins one at a time when a provider does not say.
    # Optional attribute `prefetch: bool` (absent = True): False tells the engine not to
    # compute the next layer's router for `hint`, which such a provider would ignore.
    # Optional method `wants_hint(layer) -> bool`, asked before each hint when present
    # (instead of `prefetch`): a provider may pause hints that are not paying off.


@dataclass(frozen=True)
class ExpertLayout:
    """Where each expert lives in the pack and how its extent splits into gate|up|down.

    Parsed from the pack's "experts" section (docs/internals.md, "MoE pack layout").
    """
    num_layers: int
    num_experts: int
    top_k: int
    extent_bytes: int
    tensors: dict            # name -> {"dtype", "shape", "offset"}
    table: dict              # (layer, expert) -> block index
    moe_layers: tuple        # layer indices that have experts, ascending
    scheme: str | None = None    # None: the checkpoint's precision; "int8" | "int4": a copy
    group_size: int = 0          # int4: inputs per scale (edgert.pack.quant)

    @classmethod
    def from_reader(cls, reader, precision: str = "exact") -> "ExpertLayout":
        """The layout of `reader`'s pack, from the "experts" section as the manifest decoded
        and validated it when the pack was opened (`edgert.pack.manifest.ExpertsSection`);
        precision "int8" / "int4": its low-bit copy (the "lowbit" section) instead."""
        m = getattr(reader, "manifest", None)
        sec = getattr(m, "experts", None)
        if sec is None:
            raise PackCorrupt("pack has no 'experts' section (not an MoE pack)",
                              path=getattr(reader, "path", None))
        if precision != "exact":
            c = lowbit_copy(reader, precision)
            return cls(sec.num_layers, sec.num_experts, sec.top_k, c.extent_bytes,
                       c.tensors, dict(c.table), sec.moe_layers, c.scheme, c.group_size)
        tensors = {name: {"dtype": t.dtype, "shape": list(t.shape), "offset": t.offset}
                   for name, t in sec.tensors.items()}
        return cls(sec.num_layers, sec.num_experts, sec.top_k, sec.extent_bytes, tensors,
                   dict(sec.table), sec.moe_layers)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one expert slot: the extent rounded up to 4 KiB (`edgert.align`)."""
        return align_up(self.extent_bytes)

    @property
    def ffn_hidden(self) -> tuple[int, int]:
        """(ffn, hidden) of one expert, whatever its precision."""
        if self.scheme is None:
            return tuple(self.tensors["gate"]["shape"])
        n, k = self.tensors["gate.q"]["shape"]
        return n, k * 2 if self.scheme == "int4" else k

    @property
    def gate_up_adjacent(self) -> bool:
        """Whether gate and up lie back to back with one shape (exact copies only): the
        decode step then applies them as one [2*ffn, hidden] product (`views`' gate_up)."""
        if self.scheme is not None:
            return False
        g, u = self.tensors["gate"], self.tensors["up"]
        n = int(np.prod(g["shape"])) * np_storage(g["dtype"]).itemsize
        return len(g["shape"]) == 2 and g["shape"] == u["shape"] and \
            g["dtype"] == u["dtype"] and u["offset"] == g["offset"] + n

    @property
    def dtype(self) -> torch.dtype | None:
        """The experts' float dtype (None for a low-bit copy: the kernels take any)."""
        return None if self.scheme else torch_dtype(self.tensors["gate"]["dtype"])

    def block(self, layer: int, expert: int) -> int:
        return self.table[(layer, expert)]

    def views(self, buf: np.ndarray) -> ExpertWeights:
        """Zero-copy torch views of gate/up/down over `buf` (uint8, at least extent_bytes)."""
        assert buf.dtype == np.uint8 and buf.nbytes >= self.extent_bytes, (buf.dtype, buf.nbytes)
        out = {}
        for name, t in self.tensors.items():
            np_dt = np_storage(t["dtype"])
            n = int(np.prod(t["shape"]))
            arr = buf[t["offset"]: t["offset"] + n * np_dt.itemsize].view(np_dt).reshape(t["shape"])
            ten = torch.from_numpy(arr)
            if t["dtype"] == "bfloat16":
                ten = ten.view(torch.bfloat16)
            out[name] = ten
        if self.scheme == "int8":
            return ExpertWeights(*(Int8Linear(out[f"{p}.q"], out[f"{p}.s"])
                                   for p in ("gate", "up", "down")))
        if self.scheme == "int4":
            return ExpertWeights(*(Int4Linear(out[f"{p}.q"], out[f"{p}.sz"], self.group_size)
                                   for p in ("gate", "up", "down")))
        g, u = self.tensors["gate"], self.tensors["up"]
        if self.gate_up_adjacent:
            rows = 2 * g["shape"][0]
            out["gate_up"] = torch.from_numpy(
                buf[g["offset"]:u["offset"] + out["up"].nbytes].view(np_storage(g["dtype"]))
            ).view(out["gate"].dtype).view(rows, g["shape"][1])
        return ExpertWeights(**out)


class ResidentExperts:
    """Every expert loaded once and kept: the exact, 100%-budget provider.

    With `arena` the experts live in arena slots (held, never reclaimed) and count against
    the budget; `BudgetExceeded` is raised before anything is read when they do not all
    fit. Without an arena they live in host buffers (tests only).
    """

    max_acquire = None  # everything is resident: a layer may pin all its experts at once
    prefetch = False    # nothing to prefetch: the engine skips the next layer's router

    def __init__(self, reader, arena=None, label: str = "resident experts"):
        self.layout = ExpertLayout.from_reader(reader)
        keys = sorted(self.layout.table)
        self._pool = None
        blocks = [self.layout.block(*k) for k in keys]
        if arena is not None:
            self._pool = SlotPool(arena, label, self.layout.slot_bytes)
            slots = self._pool.alloc(len(keys), reclaim=True)
            bufs = [self._pool.view(s) for s in slots]
        else:
            bufs = [np.zeros(self.layout.slot_bytes, np.uint8) for _ in keys]
        self.bytes_read, _ = reader.read_into(blocks, bufs)   # verified; PackCorrupt otherwise
        self._weights: dict[tuple[int, int], ExpertWeights] = {
            key: self.layout.views(buf) for key, buf in zip(keys, bufs)}
        self.acquires = 0

    def route(self, layer, probs, topk_idx):
        return topk_idx

    def acquire(self, layer, expert_ids):
        self.acquires += len(expert_ids)
        return {e: self._weights[(layer, e)] for e in expert_ids}

    def release(self, layer, expert_ids):
        pass

    def hint(self, layer, probs):
        pass

    def stats(self) -> dict:
        return {"provider": "resident", "experts": len(self._weights), "hits": self.acquires,
                "misses": 0, "bytes_read": self.bytes_read, "exact_hit_rate": 1.0,
                "effective_hit_rate": 1.0}

    def close(self) -> None:
        self._weights.clear()
        if self._pool is not None:
            self._pool.close()


def slots_for_budget(budget: float | int | None, total_experts: int, extent_bytes: int,
                     pool_capacity: int) -> int:
    """Expert slots for `budget`: None is `pool_capacity` bytes (the config's
    ``memory.experts``); a float in (0, 1] is a fraction of all experts (rounded, at least
    1); an int is bytes (whole slots that fit). Asking for more than `pool_capacity` bytes
    (the arena, for explicit budgets) raises BudgetExceeded. Never more slots than experts."""
    slot = align_up(extent_bytes)
    if budget is None:
        budget = pool_capacity
        if budget < slot:
            raise BudgetExceeded("expert pool: one expert slot", slot, pool_capacity)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"expert budget must be a fraction in (0, 1] or a byte count, "
                         f"got {budget!r}")
    if isinstance(budget, float):
        if budget > 1.0:
            raise ValueError(f"expert budget fraction {budget} is above 1 (pass bytes as an int)")
        n = max(1, round(budget * total_experts))
    else:
        n = budget // slot
        if n < 1:
            raise BudgetExceeded("expert budget: one expert slot", slot, budget)
    n = min(n, total_experts)
    if n * slot > pool_capacity:
        raise BudgetExceeded(f"{n} expert slots", n * slot, pool_capacity)
    return n
