"""Weight-only quantization of expert weights: a transform of tensors at pack time.

Two schemes, each the one a torch kernel consumes (edgert.engines.lowbit runs them):
- "int8": symmetric, one float32 scale per output row (a group is the whole input
  dimension): w ~= q * s[n], q int8 [N, K]. `torch._weight_int8pack_mm`'s scheme.
- "int4": asymmetric, per group of `group_size` inputs: w ~= (u - 8) * scale + zero with
  u in 0..15, scale and zero float16 [K/g, N, 2] (`qScaleAndZeros`). The 4-bit values are
  stored in the layout `torch._convert_weight_to_int4pack_for_cpu` makes ([N, K/2] uint8),
  so a missed expert is used as read, without a repack.

The scheme is data in the pack (docs/pack-format.md, "Low-bit expert copies"), never a
branch in the hot path. `dequantize` is the definition every kernel is checked against.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..errors import EdgertError

QUANT_CHOICES = ("int8", "int4", "mixed")   # `edgert pack hf --quant`
INT4_GROUPS = (32, 64, 128, 256)            # what torch's int4 kernels accept
DEFAULT_INT4_GROUP = 64                     # 0.28x the bytes of a 16-bit expert (32: 0.31x)
INT4_ROWS = 16                              # the int4 kernels tile N by 16


class QuantOptionError(EdgertError, ValueError):
    """A low-bit option that cannot apply: unknown scheme, bad group size, a shape the
    kernel does not take, a precision the pack holds no copy for."""


def check_options(quant: str | None, group_size: int | None) -> None:
    """Refuse a bad --quant / --group-size before anything is read."""
    if quant is None:
        if group_size is not None:
            raise QuantOptionError("--group-size needs --quant int4 or mixed")
        return
    if quant not in QUANT_CHOICES:
        raise QuantOptionError(f"--quant {quant!r}: choose one of {', '.join(QUANT_CHOICES)}")
    if group_size is None:
        return
    if quant == "int8":
        raise QuantOptionError(f"--group-size {group_size}: int8 is per output row (the scheme "
                               f"of torch._weight_int8pack_mm); --group-size is for int4/mixed")
    if isinstance(group_size, bool) or not isinstance(group_size, int) \
            or group_size not in INT4_GROUPS:
        raise QuantOptionError(f"--group-size {group_size!r}: torch's int4 kernels take "
                               f"{', '.join(map(str, INT4_GROUPS))}")


def check_shape(scheme: str, group: int, shape, name: str) -> None:
    """The int4 kernels need K % group == 0, K even and N % 16 == 0: say which fails."""
    n, k = shape
    if scheme != "int4":
        return
    if k % group:
        raise QuantOptionError(f"--group-size {group} does not divide the input dimension {k} "
                               f"of {name} (shape {list(shape)})")
    if n % INT4_ROWS:
        raise QuantOptionError(f"{name} has {n} output rows; torch's int4 kernels need a "
                               f"multiple of {INT4_ROWS} (pack it with --quant int8)")


def quantize(w: torch.Tensor, scheme: str, group: int) -> dict[str, torch.Tensor]:
    """Stored tensors of w [N, K] (float32): int8 {"q", "s"}; int4 {"q", "sz"}."""
    w = w.float()
    if scheme == "int8":
        s = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        return {"q": q, "s": s}
    N, K = w.shape
    g = w.view(N, K // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)                        # [N, K/g]
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.float16)  # stored: round first
    zero = (lo + 8 * scale.float()).to(torch.float16)
    u = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8)
    u = u.clamp(0, 15).to(torch.int32).view(N, K)
    q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)  # [N, K/2] uint8
    sz = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()  # [K/g, N, 2]
    return {"q": q, "sz": sz}


def dequantize(parts: dict[str, torch.Tensor], scheme: str, group: int,
               shape) -> torch.Tensor:
    """float32 [N, K]: the definition of what the stored tensors mean."""
    if scheme == "int8":
        return parts["q"].float() * parts["s"].float()[:, None]
    N, K = shape
    u = unpack_int4(parts["q"], N, K).float()
    sz = parts["sz"].float()                                       # [K/g, N, 2]
    scale = sz[..., 0].t().repeat_interleave(group, dim=1)         # [N, K]
    zero = sz[..., 1].t().repeat_interleave(group, dim=1)
    return (u - 8) * scale + zero


def unpack_int4(q: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The 4-bit values [N, K] (int32) of a CPU-kernel-packed tensor [N, K/2] uint8."""
    nib = torch.stack([q & 15, q >> 4], dim=-1).reshape(-1).to(torch.int32)
    out = torch.empty(n * k, dtype=torch.int32)
    out[_int4_order(n, k)] = nib
    return out.view(n, k)


@lru_cache(maxsize=64)
def _int4_order(n: int, k: int) -> torch.Tensor:
    """For each nibble of the packed layout, the flat index of the value it holds.

    NOTE: learnt from torch's own packer (it is a permutation of positions, independent of
    the values): pack the index digits four bits at a time, read them back."""
    idx = torch.arange(n * k, dtype=torch.int64)
    where = torch.zeros(n * k, dtype=torch.int64)
    shift = 0
    while (n * k - 1) >> shift:
        digit = ((idx >> shift) & 15).to(torch.int32).view(n, k)
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 2)
        where |= torch.stack([p & 15, p >> 4], dim=-1).reshape(-1).to(torch.int64) << shift
        shift += 4
    return where


def error(w: torch.Tensor, deq: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, max abs error) of a dequantized tensor against its original."""
    d = (deq - w.float())
    norm = float(w.float().norm())
    return (float(d.norm()) / norm if norm else 0.0), float(d.abs().max())


def np_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a CPU tensor as uint8 (float16 through its int16 bits)."""
    t = t.contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy().view(np.uint8).reshape(-1)
