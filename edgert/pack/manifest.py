"""The pack manifest: a msgpack map, validated field by field before use.

Nothing here trusts the bytes: every field is type-checked and every block reference is
bounds-checked, so a damaged manifest becomes a ValueError (the reader turns it into
PackCorrupt) rather than an IndexError deep inside a switch. That includes the known
structured section "experts" (an MoE pack's expert table), decoded into `ExpertsSection`.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import msgpack
import numpy as np

from ..dtypes import FLOATS, STORAGE
from .format import (ALIGN, HASH_BYTES, HEADER_SIZE, MAX_MANIFEST_BYTES, MAX_ZERO_BLOCK,
                     ZERO_OFFSET, zero_hashes)

DTYPES = STORAGE   # dtype names a pack may hold (edgert/dtypes.py is the one table)
MAX_RANK = 16
MAX_LAYERS = 1 << 12      # far above any MoE model's depth; more is damage, not a model
MAX_EXPERTS = 1 << 16
EXPERT_TENSORS = ("gate", "up", "down")
FORMAT = 1              # a manifest without zero blocks: what every edgert reads
FORMAT_ZERO = 2         # a manifest with zero blocks (an older edgert refuses it by number)


@dataclass(frozen=True)
class BlockEntry:
    """A stored extent, or (offset ZERO_OFFSET) a zero block: ``length`` zero bytes, none
    stored, filled by a memset; its hash is the hash of those zeros."""
    hash: bytes
    offset: int
    length: int

    @property
    def zero(self) -> bool:
        return self.offset == ZERO_OFFSET


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]
    blocks: tuple[int, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.np_dtype.itemsize


@dataclass
class Manifest:
    kind: str
    block_size: int
    generation: int = 0
    blocks: list[BlockEntry] = field(default_factory=list)
    tasks: dict[str, dict[str, TensorSpec]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    sections: dict[str, bytes] = field(default_factory=dict)
    # decoded from sections["experts"] (present in every "moe" pack); None elsewhere
    experts: "ExpertsSection | None" = None
    # decoded from sections["lowbit"] (low-bit expert copies; edgert.pack.lowbit); or None
    lowbit: "object | None" = None

    def encode(self) -> bytes:
        doc = {
            "format": FORMAT_ZERO if any(b.zero for b in self.blocks) else FORMAT,
            "kind": self.kind,
            "block_size": self.block_size,
            "generation": self.generation,
            "blocks": [[b.hash, b.offset, b.length] for b in self.blocks],
            "tasks": {t: {n: [s.dtype, list(s.shape), list(s.blocks)] for n, s in ts.items()}
                      for t, ts in self.tasks.items()},
            "config": self.config,
            "sections": self.sections,
        }
        return msgpack.packb(doc, use_bin_type=True)

    @staticmethod
    def decode(raw: bytes, data_end: int) -> "Manifest":
        """Parse and validate; blocks must lie in [HEADER_SIZE, data_end)."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ValueError("manifest larger than the 1 GiB limit")
        try:
            doc = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
        except Exception as e:  # msgpack raises several unrelated types for bad bytes
            raise ValueError(f"manifest is not valid msgpack: {type(e).__name__}: {e}") from None
        _expect(doc, dict, "manifest")
        fmt = doc.get("format")
        if type(fmt) is not int or fmt not in (FORMAT, FORMAT_ZERO):
            raise ValueError(f"manifest format {fmt!r}, expected {FORMAT} or {FORMAT_ZERO}")
        kind = _expect(doc.get("kind"), str, "kind")
        block_size = _expect(doc.get("block_size"), int, "block_size")
        if block_size <= 0 or block_size % ALIGN:
            raise ValueError(f"block_size {block_size} is not a positive multiple of {ALIGN}")
        gen = _expect(doc.get("generation"), int, "generation")
        blocks = []
        for i, ent in enumerate(_expect(doc.get("blocks"), list, "blocks")):
            _expect(ent, list, f"blocks[{i}]")
            if len(ent) != 3:
                raise ValueError(f"blocks[{i}] has {len(ent)} fields, expected 3")
            h, off, length = ent
            _expect(h, bytes, f"blocks[{i}].hash")
            _expect(off, int, f"blocks[{i}].offset")
            _expect(length, int, f"blocks[{i}].length")
            if len(h) != HASH_BYTES:
                raise ValueError(f"blocks[{i}].hash has {len(h)} bytes, expected {HASH_BYTES}")
            if off == ZERO_OFFSET:
                _zero_entry(i, length, fmt, block_size)
            elif off < HEADER_SIZE or off % ALIGN or length < 0 or off + length > data_end:
                raise ValueError(f"blocks[{i}] extent {off}+{length} is invalid "
                                 f"(data region {HEADER_SIZE}..{data_end})")
            blocks.append(BlockEntry(h, off, length))
        _check_zero_hashes(blocks)
        tasks: dict[str, dict[str, TensorSpec]] = {}
        for tname, tensors in _expect(doc.get("tasks"), dict, "tasks").items():
            _expect(tname, str, "task name")
            specs = {}
            for name, spec in _expect(tensors, dict, f"tasks[{tname}]").items():
                specs[_expect(name, str, "tensor name")] = _tensor(spec, blocks, block_size,
                                                                   f"{tname}/{name}")
            tasks[tname] = specs
        config = _expect(doc.get("config"), dict, "config")
        sections = _expect(doc.get("sections"), dict, "sections")
        for k, v in sections.items():
            _expect(k, str, "section name")
            _expect(v, bytes, f"sections[{k}]")
        experts = None
        if "experts" in sections:
            experts = ExpertsSection.decode(sections["experts"], blocks)
        elif kind == "moe":
            raise ValueError("moe pack has no 'experts' section")
        lowbit = None
        if "lowbit" in sections:
            from .lowbit import LowbitSection
            lowbit = LowbitSection.decode(sections["lowbit"], blocks, experts)
        return Manifest(kind, block_size, gen, blocks, tasks, config, sections, experts,
                        lowbit)


def _zero_entry(i: int, length: int, fmt: int, block_size: int) -> None:
    if fmt != FORMAT_ZERO:
        raise ValueError(f"blocks[{i}] is a zero block (offset {ZERO_OFFSET}) in a format-{fmt} "
                         f"manifest")
    if not 0 < length <= min(block_size, MAX_ZERO_BLOCK):
        raise ValueError(f"blocks[{i}] is a zero block of {length} bytes; a zero block holds "
                         f"1..{min(block_size, MAX_ZERO_BLOCK)} (block_size {block_size})")


def _check_zero_hashes(blocks: list[BlockEntry]) -> None:
    """Every zero block's hash is the hash of its zeros (so a memset is the verified content)."""
    want = zero_hashes(b.length for b in blocks if b.zero)
    for i, b in enumerate(blocks):
        if b.zero and b.hash != want[b.length]:
            raise ValueError(f"blocks[{i}] is a zero block of {b.length} bytes whose hash is not "
                             f"the hash of {b.length} zero bytes")


def _expect(value, typ, what):
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"manifest field {what} is {type(value).__name__}, expected {typ.__name__}")
    return value


def _tensor(spec, blocks: list[BlockEntry], block_size: int, where: str) -> TensorSpec:
    _expect(spec, list, where)
    if len(spec) != 3:
        raise ValueError(f"tensor {where} has {len(spec)} fields, expected 3")
    dtype, shape, refs = spec
    if _expect(dtype, str, f"{where}.dtype") not in DTYPES:
        raise ValueError(f"tensor {where} has unknown dtype {dtype!r}")
    _expect(shape, list, f"{where}.shape")
    _expect(refs, list, f"{where}.blocks")
    if len(shape) > MAX_RANK or any(not isinstance(d, int) or isinstance(d, bool) or d < 0
                                    for d in shape):
        raise ValueError(f"tensor {where} has invalid shape {shape!r}")
    total = 0
    for r in refs:
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < len(blocks):
            raise ValueError(f"tensor {where} refers to missing block {r!r}")
        total += blocks[r].length
    ts = TensorSpec(dtype, tuple(shape), tuple(refs))
    if total != ts.nbytes:
        raise ValueError(f"tensor {where} blocks hold {total} bytes, its shape needs {ts.nbytes}")
    if any(blocks[r].length > block_size for r in refs):
        raise ValueError(f"tensor {where} refers to a block larger than block_size {block_size}")
    return ts


# --- the "experts" section (kind "moe"; docs/internals.md, "MoE pack layout") ----------------
@dataclass(frozen=True)
class ExpertTensor:
    """One of gate/up/down inside every expert extent."""
    dtype: str
    shape: tuple[int, ...]
    offset: int              # bytes from the start of the extent

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class ExpertsSection:
    num_layers: int
    num_experts: int
    top_k: int
    extent_bytes: int
    tensors: dict[str, ExpertTensor]        # gate, up [ffn, hidden]; down [hidden, ffn]
    table: dict[tuple[int, int], int]       # (layer, expert) -> block index
    moe_layers: tuple[int, ...]             # layers that have experts, ascending

    @staticmethod
    def decode(raw: bytes, blocks: list[BlockEntry]) -> "ExpertsSection":
        """Parse and validate against the pack's blocks; ValueError naming what is wrong."""
        try:
            doc = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
        except Exception as e:  # msgpack raises several unrelated types for bad bytes
            raise ValueError(f"experts section is not valid msgpack: {type(e).__name__}: {e}") \
                from None
        _expect(doc, dict, "experts")
        L = _count(doc.get("num_layers"), "experts.num_layers", 1, MAX_LAYERS)
        E = _count(doc.get("num_experts"), "experts.num_experts", 1, MAX_EXPERTS)
        k = _count(doc.get("top_k"), "experts.top_k", 1, E)
        extent = _count(doc.get("extent_bytes"), "experts.extent_bytes", 1, None)
        tensors = _expert_tensors(_expect(doc.get("tensors"), dict, "experts.tensors"), extent)
        table: dict[tuple[int, int], int] = {}
        for i, row in enumerate(_expect(doc.get("table"), list, "experts.table")):
            where = f"experts.table[{i}]"
            if not isinstance(row, list) or len(row) != 3:
                raise ValueError(f"manifest field {where} is not [layer, expert, block]")
            layer = _count(row[0], f"{where}.layer", 0, L - 1)
            expert = _count(row[1], f"{where}.expert", 0, E - 1)
            b = _count(row[2], f"{where}.block", 0, len(blocks) - 1)
            if blocks[b].length != extent:
                raise ValueError(f"{where}: block {b} holds {blocks[b].length} bytes, an expert "
                                 f"extent is {extent}")
            if (layer, expert) in table:
                raise ValueError(f"{where}: expert {expert} of layer {layer} appears twice")
            table[(layer, expert)] = b
        if not table:
            raise ValueError("experts.table is empty")
        per_layer = Counter(l for l, _ in table)
        layers = tuple(sorted(per_layer))
        for l in layers:   # the router of a sparse layer may pick any of its E experts
            if per_layer[l] != E:
                raise ValueError(f"experts.table: layer {l} has {per_layer[l]} of {E} experts")
        if "moe_layers" in doc:
            listed = _expect(doc["moe_layers"], list, "experts.moe_layers")
            if listed != list(layers):
                raise ValueError(f"experts.moe_layers {listed!r} differ from the table's "
                                 f"layers {list(layers)}")
        return ExpertsSection(L, E, k, extent, tensors, table, layers)


def _count(value, what: str, lo: int, hi: int | None) -> int:
    _expect(value, int, what)
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"manifest field {what} = {value} is outside "
                         f"{lo}..{'' if hi is None else hi}")
    return value


def _expert_tensors(doc: dict, extent: int) -> dict[str, ExpertTensor]:
    if set(doc) != set(EXPERT_TENSORS):
        raise ValueError(f"experts.tensors names {list(doc)!r}, expected {list(EXPERT_TENSORS)}")
    out = {}
    for name in EXPERT_TENSORS:
        t, where = _expect(doc[name], dict, f"experts.tensors.{name}"), f"experts.tensors.{name}"
        dtype = _expect(t.get("dtype"), str, f"{where}.dtype")
        if dtype not in FLOATS:
            raise ValueError(f"{where} has dtype {dtype!r}; experts are one of {FLOATS}")
        shape = _expect(t.get("shape"), list, f"{where}.shape")
        if len(shape) != 2 or any(not isinstance(d, int) or isinstance(d, bool) or d < 0
                                  for d in shape):
            raise ValueError(f"{where} has shape {shape!r}, expected two non-negative ints")
        off = _count(t.get("offset"), f"{where}.offset", 0, extent)
        ten = ExpertTensor(dtype, tuple(shape), off)
        if off % DTYPES[dtype].itemsize or off + ten.nbytes > extent:
            raise ValueError(f"{where} spans {off}..{off + ten.nbytes}, outside the "
                             f"{extent}-byte extent or misaligned for {dtype}")
        out[name] = ten
    g, u, d = (out[n] for n in EXPERT_TENSORS)
    if g.shape != u.shape or d.shape != g.shape[::-1] or len({g.dtype, u.dtype, d.dtype}) != 1:
        raise ValueError(f"experts.tensors do not form a SwiGLU expert: gate {g.shape} "
                         f"{g.dtype}, up {u.shape} {u.dtype}, down {d.shape} {d.dtype}")
    return out
