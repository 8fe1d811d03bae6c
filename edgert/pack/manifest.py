"""The pack manifest: a msgpack map, validated field by field before use.

Nothing here trusts the bytes: every field is type-checked and every block reference is
bounds-checked, so a damaged manifest becomes a ValueError (the reader turns it into
PackCorrupt) rather than an IndexError deep inside a switch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgpack
import numpy as np

from .format import ALIGN, HASH_BYTES, HEADER_SIZE, MAX_MANIFEST_BYTES

# dtype name -> (numpy dtype used to hold the bytes, item size)
DTYPES: dict[str, str] = {
    "float64": "float64", "float32": "float32", "float16": "float16", "bfloat16": "uint16",
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8",
    "uint64": "uint64", "uint32": "uint32", "uint16": "uint16", "uint8": "uint8", "bool": "bool",
}
MAX_RANK = 16


@dataclass(frozen=True)
class BlockEntry:
    hash: bytes
    offset: int
    length: int


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]
    blocks: tuple[int, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype])

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

    def encode(self) -> bytes:
        doc = {
            "format": 1,
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
        if doc.get("format") != 1:
            raise ValueError(f"manifest format {doc.get('format')!r}, expected 1")
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
            if len(h) != HASH_BYTES or off < HEADER_SIZE or off % ALIGN or length < 0 \
                    or off + length > data_end:
                raise ValueError(f"blocks[{i}] extent {off}+{length} is invalid "
                                 f"(data region {HEADER_SIZE}..{data_end})")
            blocks.append(BlockEntry(h, off, length))
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
        return Manifest(kind, block_size, gen, blocks, tasks, config, sections)


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
