"""Weight-only low-bit linears over the bytes of an expert slot, computed by torch's kernels.

- int8 (per output row): `torch._weight_int8pack_mm(x, q, scales)` on CPU and CUDA.
- int4 (per group, asymmetric): on CPU `torch._weight_int4pack_mm_for_cpu` over the stored
  bytes as they are (the pack keeps the CPU kernel's layout); on CUDA the 4-bit values are
  repacked on the GPU for `torch._weight_int4pack_mm` (its tiled layout) at each use, and
  that kernel takes bfloat16 activations only, so other dtypes are converted around it.

What the stored tensors mean is `edgert.pack.quant.dequantize`; tests check each kernel
against "dequantize to the compute dtype, then F.linear".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgert.pack.quant import dequantize, unpack_int4


@dataclass
class Int8Linear:
    q: torch.Tensor          # [N, K] int8
    s: torch.Tensor          # [N] float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:       # x [T, K] -> [T, N]
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.q, self.s.to(x.dtype))

    def dequantized(self) -> torch.Tensor:
        return dequantize({"q": self.q.cpu(), "s": self.s.cpu()}, "int8", 0, self.q.shape)


@dataclass
class Int4Linear:
    q: torch.Tensor          # [N, K/2] uint8, the CPU kernel's layout
    sz: torch.Tensor         # [K/g, N, 2] float16: scale, zero (w = (u - 8) * scale + zero)
    group: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:       # x [T, K] -> [T, N]
        x = x.contiguous()
        if self.q.device.type == "cuda":
            return _int4_cuda(x, self.q, self.sz, self.group)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q, self.group,
                                                           self.sz.to(x.dtype))

    def dequantized(self) -> torch.Tensor:
        n, k = self.q.shape[0], self.q.shape[1] * 2
        return dequantize({"q": self.q.cpu(), "sz": self.sz.cpu()}, "int4", self.group, (n, k))


def _int4_cuda(x, q, sz, group):
    """CUDA: the tiled layout of `_convert_weight_to_int4pack` from [N, K/2] nibbles
    (high nibble first), built on the GPU; bfloat16 in, the caller's dtype out."""
    n, k = q.shape[0], q.shape[1] * 2
    u = unpack_int4(q.cpu(), n, k).to(q.device)
    nibbles = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8)
    tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles)
    y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), packed, group,
                                           sz.to(torch.bfloat16))
    return y.to(x.dtype)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T for a dense weight tensor or a low-bit linear."""
    return torch.nn.functional.linear(x, w) if isinstance(w, torch.Tensor) else w(x)
