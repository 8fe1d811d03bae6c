"""An MoE model's dense (non-expert) weights in one arena extent, in the compute dtype.

Read through the pack's verified read path: straight into place when the pack holds the
compute dtype, else through a few blocks of staging that are arena memory too, so no load
copies weights through memory outside the budget. Each tensor starts 4 KiB-aligned, so
O_DIRECT reads land in place. Beside the checkpoint's tensors the extent holds, per sparse
layer, that layer's router with its post-attention norm folded in (the prefetch hint).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from edgert.align import ALIGN, align_up
from edgert.dtypes import np_storage, torch_dtype
from edgert.errors import PackCorrupt, UnsupportedModel
from edgert.memory.slots import Lease
from edgert.pack.families import dense_tensors, family_of

HINT = "edgert.hint_router.{}"  # per sparse layer: its router with its norm weight folded in
HINT_BIAS = "edgert.hint_router_bias.{}"  # LayerNorm families: the router applied to the bias
QKV = "edgert.qkv.{}"  # per layer: q, k, v projections as one view, where stored back to back
STAGING_BLOCKS = 16  # blocks read at once into arena staging when the pack's dtype differs


def load_dense_weights(arena, reader, cfg, dtype: torch.dtype, label: str, own):
    """Every non-expert tensor of ``reader``'s task "model" (and the hint routers) in one
    extent labelled ``label``; ``own(lease)`` takes it before any read, so a failed load
    gives it back with its owner. Returns ({name: CPU tensor view}, extent bytes).
    BudgetExceeded (naming the holders) before anything is read."""
    specs = reader.task("model")
    check_tensor_set(reader, specs)
    item = torch.empty((), dtype=dtype).element_size()
    shapes = {name: tuple(spec.shape) for name, spec in sorted(specs.items(), key=_qkv_order)}
    for l in cfg.moe_layers:
        shapes[HINT.format(l)] = (cfg.num_experts, cfg.hidden_size)
        if cfg.norm == "layer":
            shapes[HINT_BIAS.format(l)] = (cfg.num_experts,)
    offsets, pos = {}, 0
    for name, shape in shapes.items():
        offsets[name] = pos
        pos = align_up(pos + math.prod(shape) * item)
    lease = own(Lease(arena, label, max(pos, ALIGN)))
    mem = lease.view
    direct, staged = [], []
    for name, spec in specs.items():
        if np_storage(spec.dtype).itemsize == item and torch_dtype(spec.dtype) == dtype:
            direct.append(name)
        elif spec.dtype in ("float32", "float16", "bfloat16"):
            staged.append(name)
        else:
            raise UnsupportedModel(f"tensor {name} has dtype {spec.dtype}")
    blocks, views, names = [], [], []
    bs = reader.block_size
    for name in direct:
        o = offsets[name]
        for k, b in enumerate(specs[name].blocks):
            blocks.append(b)
            views.append(mem[o + k * bs:o + k * bs + align_up(reader.blocks[b].length)])
            names.append(name)
    reader.read_into(blocks, views, tensors=names)
    if staged:
        _load_staged(arena, reader, specs, staged, mem, offsets, dtype, label)
    w = {}
    for name, shape in shapes.items():
        w[name] = _as_tensor(mem[offsets[name]:offsets[name] + math.prod(shape) * item],
                             dtype).view(shape)
    _fuse_qkv(w, mem, offsets, shapes, cfg, dtype, item)
    for l in cfg.moe_layers:
        # The hint for layer l applies l's router to l's post-attention norm of a state:
        # gate(norm_w * x_hat + norm_b) = (gate * norm_w) x_hat + gate norm_b, one matrix
        # product per hint (norm_b: LayerNorm families only).
        p = f"model.layers.{l}."
        norm = w[p + "post_attention_layernorm.weight"]
        gate = w[p + cfg.moe_prefix + ".gate.weight"]
        w[HINT.format(l)].copy_(gate * norm[None, :])
        if cfg.norm == "layer":
            w[HINT_BIAS.format(l)].copy_(gate @ w[p + "post_attention_layernorm.bias"])
    return w, lease.nbytes


def _qkv_order(item) -> tuple:
    """Extent order: a layer's q, k, v projections next to each other, in that order (the
    pack lists tensors by name: k_proj, o_proj, q_proj, v_proj), so `_fuse_qkv` can view them
    as one; everything else by name."""
    name = item[0]
    for i, n in enumerate("qkv"):
        if name.endswith(f".self_attn.{n}_proj.weight"):
            return name.removesuffix(f"{n}_proj.weight") + "q_proj.weight", i
    return name, 0


def _fuse_qkv(w, mem, offsets, shapes, cfg, dtype, item) -> None:
    """Per layer, q/k/v_proj as one [q+k+v rows, hidden] view where their bytes lie back to
    back (sizes that are whole 4 KiB pages) and they have no biases: one product, not three,
    over the same bytes (no copy)."""
    for l in range(cfg.num_layers):
        p = f"model.layers.{l}.self_attn."
        names = [f"{p}{n}_proj.weight" for n in "qkv"]
        if any(f"{p}{n}_proj.bias" in shapes for n in "qkv") or \
                any(n not in offsets for n in names):
            continue
        ends = [offsets[n] + math.prod(shapes[n]) * item for n in names]
        if offsets[names[1]] != ends[0] or offsets[names[2]] != ends[1]:
            continue
        rows = sum(shapes[n][0] for n in names)
        w[QKV.format(l)] = _as_tensor(mem[offsets[names[0]]:ends[2]], dtype).view(
            rows, shapes[names[0]][1])


def check_tensor_set(reader, specs) -> None:
    """The pack holds exactly the dense tensors the engine uses (families.dense_tensors), in
    their shapes: a tensor the engine would not read is refused, never ignored."""
    want = dense_tensors(reader.config)
    for name, spec in specs.items():
        if name not in want:
            raise UnsupportedModel(f"{reader.path}: tensor {name} is not part of a "
                                   f"{family_of(reader.config).name} model; edgert refuses it "
                                   f"rather than ignore it (repack with `edgert pack hf`)")
        if tuple(spec.shape) != want[name]:
            raise UnsupportedModel(f"{reader.path}: tensor {name} has shape {list(spec.shape)}, "
                                   f"its config.json says {list(want[name])}")
    for name in want:
        if name not in specs:
            raise PackCorrupt("tensor the model needs is missing from the pack",
                              path=str(reader.path), tensor=name)


def _load_staged(arena, reader, specs, names, mem, offsets, dtype, label) -> None:
    """Tensors stored in another dtype: blocks read into an arena staging extent, then
    converted into place. The staging goes back when the load is done."""
    bs = reader.block_size
    item = torch.empty((), dtype=dtype).element_size()
    staging = Lease(arena, f"{label} (load staging)", STAGING_BLOCKS * align_up(bs))
    try:
        buf = staging.view
        jobs = [(name, k, b) for name in names for k, b in enumerate(specs[name].blocks)]
        for i in range(0, len(jobs), STAGING_BLOCKS):
            batch = jobs[i:i + STAGING_BLOCKS]
            views = [buf[j * align_up(bs):(j + 1) * align_up(bs)] for j in range(len(batch))]
            reader.read_into([b for _, _, b in batch], views, tensors=[n for n, _, _ in batch])
            for (name, k, b), v in zip(batch, views):
                src_dt = specs[name].dtype
                src = torch.from_numpy(v[:reader.blocks[b].length].view(np_storage(src_dt)))
                if src_dt == "bfloat16":
                    src = src.view(torch.bfloat16)
                first = k * bs // np_storage(src_dt).itemsize    # element index of the block
                o = offsets[name] + first * item
                _as_tensor(mem[o:o + src.numel() * item], dtype).copy_(src)
    finally:
        staging.close()


def _as_tensor(u8: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A torch view of arena bytes in ``dtype`` (bfloat16 through its uint16 storage)."""
    t = torch.from_numpy(u8.view(np_storage(str(dtype).removeprefix("torch."))))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
