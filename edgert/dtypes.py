"""The one dtype table: a pack's dtype name -> how its bytes are held in numpy and torch.

bfloat16 has no numpy dtype: its raw 16-bit values are stored as uint16 and viewed as
torch.bfloat16 where torch computes with them.
"""
from __future__ import annotations

import numpy as np

# dtype name -> numpy dtype that holds the bytes (its itemsize is the stored item size)
STORAGE: dict[str, np.dtype] = {name: np.dtype(held) for name, held in {
    "float64": "float64", "float32": "float32", "float16": "float16", "bfloat16": "uint16",
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8",
    "uint64": "uint64", "uint32": "uint32", "uint16": "uint16", "uint8": "uint8", "bool": "bool",
}.items()}

# what the engines compute with (device config dtype, MoE expert weights)
FLOATS = ("float32", "float16", "bfloat16")


def np_storage(name: str) -> np.dtype:
    """The numpy dtype holding values of dtype ``name`` (KeyError for an unknown name)."""
    return STORAGE[name]


def itemsize(name: str) -> int:
    return STORAGE[name].itemsize


def torch_dtype(name: str):
    """The torch dtype of ``name``; torch is imported here, so numpy-only users never load it."""
    if name not in STORAGE:
        raise KeyError(name)
    import torch
    return getattr(torch, name)
