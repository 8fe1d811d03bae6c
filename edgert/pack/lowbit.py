"""The "lowbit" section of an MoE pack: low-bit copies of its experts.

Written by `edgert pack hf --quant` (hf_import), validated here when the manifest is
decoded (nothing trusted), used by the engine (ExpertLayout.from_reader(precision=...)).
Each copy is one extent per expert, like the 16-bit experts: per projection its integer
weights and their scales (and zero points) back to back, so an expert is one read.
See docs/pack-format.md, "Low-bit expert copies".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import msgpack

from ..dtypes import STORAGE
from .quant import INT4_GROUPS

PROJECTIONS = ("gate", "up", "down")
TENSOR_ALIGN = 64           # each stored tensor starts 64-byte aligned inside the extent
PRECISIONS = ("exact", "int8", "int4", "mixed")
ERROR_FIELDS = ("rel_l2", "max_abs")


def copy_tensors(scheme: str, group: int, shapes: dict[str, tuple[int, int]]) -> dict:
    """{name: (dtype, shape)} of one expert's stored tensors, in extent order."""
    out = {}
    for p in PROJECTIONS:
        n, k = shapes[p]
        if scheme == "int8":
            out[f"{p}.q"], out[f"{p}.s"] = ("int8", (n, k)), ("float32", (n,))
        else:
            out[f"{p}.q"], out[f"{p}.sz"] = ("uint8", (n, k // 2)), ("float16", (k // group, n, 2))
    return out


def copy_layout(scheme: str, group: int, shapes) -> tuple[dict, int]:
    """({name: {"dtype", "shape", "offset"}}, extent bytes) of one expert's copy."""
    tensors, off = {}, 0
    for name, (dtype, shape) in copy_tensors(scheme, group, shapes).items():
        off = -(-off // TENSOR_ALIGN) * TENSOR_ALIGN
        tensors[name] = {"dtype": dtype, "shape": list(shape), "offset": off}
        off += math.prod(shape) * STORAGE[dtype].itemsize
    return tensors, off


@dataclass(frozen=True)
class LowbitCopy:
    scheme: str                              # "int8" | "int4"
    group_size: int                          # inputs per scale (int8: 0, the whole row)
    extent_bytes: int
    tensors: dict                            # name -> {"dtype", "shape", "offset"}
    table: dict[tuple[int, int], int]        # (layer, expert) -> block index
    errors: dict[tuple[int, int], tuple]     # (layer, expert) -> per projection (rel_l2, max_abs)


@dataclass(frozen=True)
class LowbitSection:
    precision: str                           # the pack's default precision (--quant)
    copies: dict[str, LowbitCopy]            # "int8" / "int4" -> its copy

    @staticmethod
    def decode(raw: bytes, blocks, experts) -> "LowbitSection":
        """Parse and validate against the blocks and the 16-bit experts; ValueError."""
        try:
            doc = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
        except Exception as e:  # msgpack raises several unrelated types for bad bytes
            raise ValueError(f"lowbit section is not valid msgpack: {type(e).__name__}: {e}") \
                from None
        if not isinstance(doc, dict) or not isinstance(doc.get("copies"), dict):
            raise ValueError("lowbit section is not a map with 'copies'")
        if experts is None:
            raise ValueError("lowbit section in a pack without experts")
        precision = doc.get("precision")
        if precision not in PRECISIONS[1:]:
            raise ValueError(f"lowbit.precision {precision!r} is not one of {PRECISIONS[1:]}")
        shapes = {p: experts.tensors[p].shape for p in PROJECTIONS}
        copies = {}
        for scheme, c in doc["copies"].items():
            copies[scheme] = _copy(scheme, c, shapes, blocks, experts)
        if not copies:
            raise ValueError("lowbit section holds no copy")
        need = "int4" if precision == "mixed" else precision
        if need not in copies:
            raise ValueError(f"lowbit.precision is {precision} but the pack has no {need} copy")
        return LowbitSection(precision, copies)


def _copy(scheme, c, shapes, blocks, experts) -> LowbitCopy:
    where = f"lowbit.copies.{scheme}"
    if scheme not in ("int8", "int4") or not isinstance(c, dict):
        raise ValueError(f"{where}: unknown scheme or not a map")
    group = c.get("group_size")
    if scheme == "int8" and group != 0 or scheme == "int4" and group not in INT4_GROUPS:
        raise ValueError(f"{where}.group_size {group!r} is not valid for {scheme}")
    tensors, extent = copy_layout(scheme, group, shapes)
    if c.get("tensors") != tensors or c.get("extent_bytes") != extent:
        raise ValueError(f"{where}: tensors or extent_bytes differ from the {scheme} layout of "
                         f"these experts (group {group})")
    table, errors = {}, {}
    rows, errs = c.get("table"), c.get("errors")
    if not isinstance(rows, list) or not isinstance(errs, list) or len(rows) != len(errs):
        raise ValueError(f"{where}: table and errors must be lists of one length")
    for i, (row, err) in enumerate(zip(rows, errs)):
        if not (isinstance(row, list) and len(row) == 3 and all(
                type(v) is int for v in row)) or not 0 <= row[2] < len(blocks):
            raise ValueError(f"{where}.table[{i}] is not [layer, expert, block]")
        key = (row[0], row[1])
        if key not in experts.table or key in table:
            raise ValueError(f"{where}.table[{i}]: expert {key} unknown or listed twice")
        if blocks[row[2]].length != extent:
            raise ValueError(f"{where}.table[{i}]: block {row[2]} holds "
                             f"{blocks[row[2]].length} bytes, the extent is {extent}")
        if not (isinstance(err, list) and len(err) == 2 * len(PROJECTIONS)
                and all(isinstance(v, float) for v in err)):
            raise ValueError(f"{where}.errors[{i}] is not {2 * len(PROJECTIONS)} floats")
        table[key] = row[2]
        errors[key] = tuple(err)
    if set(table) != set(experts.table):
        raise ValueError(f"{where}.table does not cover every expert")
    return LowbitCopy(scheme, group, extent, tensors, table, errors)
