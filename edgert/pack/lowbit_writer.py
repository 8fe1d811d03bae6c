"""Writes the low-bit copies of an MoE pack's experts (the "lowbit" section) as the
16-bit experts are packed: one extent per expert and scheme, and each tensor's error."""
from __future__ import annotations

import msgpack
import numpy as np
import torch

from .lowbit import PROJECTIONS, copy_layout
from .quant import DEFAULT_INT4_GROUP, check_shape, dequantize, error, np_bytes, quantize


class LowbitWriter:
    def __init__(self, quant: str, group_size: int | None):
        self.precision = quant
        scheme = "int4" if quant == "mixed" else quant
        group = 0 if scheme == "int8" else (group_size or DEFAULT_INT4_GROUP)  # 0: per row
        self.scheme, self.group = scheme, group
        self.tensors = self.extent = None
        self.table: list = []
        self.errors: list = []

    def check_shapes(self, tensors: dict, names: list[str]) -> None:
        """Refuse a shape the kernel cannot take (naming the option), before any write."""
        shapes = {p: tuple(tensors[p]["shape"]) for p in PROJECTIONS}
        for p, name in zip(PROJECTIONS, names):
            check_shape(self.scheme, self.group, shapes[p], name)
        self.tensors, self.extent = copy_layout(self.scheme, self.group, shapes)

    def add(self, writer, layer: int, expert: int, parts) -> None:
        buf = np.zeros(self.extent, np.uint8)
        errs = []
        for p, (arr, dtype) in zip(PROJECTIONS, parts):
            w = _as_float(arr, dtype)
            group = self.group if self.scheme == "int4" else w.shape[1]
            stored = quantize(w, self.scheme, group)
            errs += error(w, dequantize(stored, self.scheme, group, w.shape))
            for suffix, t in stored.items():
                spec = self.tensors[f"{p}.{suffix}"]
                raw = np_bytes(t)
                buf[spec["offset"]:spec["offset"] + raw.nbytes] = raw
        self.table.append([layer, expert, writer.add_extent(buf)])
        self.errors.append(errs)

    def section(self) -> bytes:
        return msgpack.packb({"precision": self.precision, "copies": {self.scheme: {
            "group_size": self.group, "extent_bytes": self.extent, "tensors": self.tensors,
            "table": self.table, "errors": self.errors}}}, use_bin_type=True)

    def summary(self) -> dict:
        e = np.array(self.errors, dtype=np.float64).reshape(len(self.errors), -1, 2)
        return {"lowbit": self.scheme, "lowbit_group": self.group,
                "lowbit_bytes": self.extent * len(self.table),
                "lowbit_rel_l2_max": float(e[..., 0].max()) if e.size else 0.0}


def _as_float(arr: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(arr).float()
