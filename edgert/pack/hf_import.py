"""Pack a Hugging Face MoE checkpoint into an edgert pack of kind "moe".

Layout (docs/internals.md, "MoE pack layout"): the non-expert tensors the engine uses, and
nothing else (families.dense_tensors), go into task "model" under their hub names; each
expert becomes one extent holding gate|up|down back to back in the checkpoint's dtype, so
loading an expert is one read.
"""
from __future__ import annotations

import json
import os
import re

import msgpack
import numpy as np

from ..errors import CheckpointIncomplete, UnsupportedModel
from .families import (SUPPORTED_ARCHITECTURES, check_runnable, dense_tensors,  # noqa: F401
                       hub_name, moe_layers, num_experts)
from .format import DEFAULT_BLOCK_SIZE
from .lowbit_writer import LowbitWriter
from .quant import check_options as check_quant_options
from .writer import PackWriter, check_output

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class _Checkpoint:
    """Tensor name -> shard file, over one file or a sharded index."""

    def __init__(self, model_dir: str):
        self.dir = model_dir
        single = os.path.join(model_dir, "model.safetensors")
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                try:
                    wm = json.load(f)["weight_map"]
                except (ValueError, KeyError) as e:
                    raise CheckpointIncomplete(f"unreadable shard index: {e!r}",
                                               path=index) from None
            self.where = dict(wm)
            for shard in sorted(set(wm.values())):
                p = os.path.join(model_dir, shard)
                if not os.path.exists(p):
                    raise CheckpointIncomplete(f"shard {shard} named by the index is missing",
                                               path=p)
        elif os.path.exists(single):
            from safetensors import safe_open
            try:
                with safe_open(single, framework="np") as f:
                    self.where = {k: "model.safetensors" for k in f.keys()}
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointIncomplete(f"not a readable safetensors file (truncated or "
                                           f"damaged?): {e}", path=single) from None
        else:
            raise CheckpointIncomplete("no model.safetensors or model.safetensors.index.json",
                                       path=model_dir)
        self._open: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def _file(self, shard: str):
        f = self._open.get(shard)
        if f is None:
            from safetensors import safe_open
            path = os.path.join(self.dir, shard)
            try:
                f = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointIncomplete(f"cannot open shard: {e}", path=path) from None
            self._open[shard] = f
        return f

    def get(self, name: str) -> tuple[np.ndarray, str]:
        """(array of the raw element bytes, dtype name); bf16 comes back as uint16 bits."""
        return self._read(name, None)

    def get_row(self, name: str, i: int) -> tuple[np.ndarray, str]:
        """Row i of tensor `name` (a fused expert tensor's expert i), read alone."""
        return self._read(name, i)

    def _read(self, name: str, row: int | None) -> tuple[np.ndarray, str]:
        shard = self.where.get(name)
        if shard is None:
            raise CheckpointIncomplete("tensor missing from the checkpoint", path=self.dir,
                                       tensor=name)
        f = self._file(shard)
        try:
            sl = f.get_slice(name)
        except Exception:
            raise CheckpointIncomplete("tensor named by the index is not in its shard",
                                       path=os.path.join(self.dir, shard), tensor=name) from None
        dtype = _DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise UnsupportedModel(f"tensor {name} has dtype {sl.get_dtype()}; edgert packs "
                                   f"{', '.join(_DTYPES.values())} checkpoints")
        if row is None:
            t = f.get_tensor(name)
        elif not 0 <= row < sl.get_shape()[0]:
            raise CheckpointIncomplete(f"tensor has {sl.get_shape()[0]} rows, row {row} is "
                                       f"wanted", path=self.dir, tensor=name)
        else:
            t = sl[row]
        t = t.contiguous()
        if dtype == "bfloat16":
            import torch
            return t.view(torch.int16).numpy().view(np.uint16), dtype
        return t.numpy(), dtype

    def close(self) -> None:
        self._open.clear()


_FUSED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


class _Experts:
    """Where each expert of a checkpoint lives: the hub layout (one tensor per expert and
    projection) or transformers 5's fused format (`save_original_format=False`: per layer
    `mlp.experts.gate_up_proj` [E, 2F, H], gate rows first, and `mlp.experts.down_proj`
    [E, H, F]). Either way an expert comes out as (gate, up, down) arrays."""

    def __init__(self, ckpt: "_Checkpoint", fam, sparse: list[int], n_exp: int):
        self.ckpt, self.fam = ckpt, fam
        self.keys = [(l, e) for l in sparse for e in range(n_exp)]
        fused = {int(m.group(1)) for n in ckpt.names() if (m := _FUSED_RE.match(n))}
        self.fused = set(sparse) & fused
        self.claimed: set[str] = set()
        for l in sparse:
            names = self._fused_names(l) if l in self.fused else [
                n for e in range(n_exp) for n in self._hub_names(l, e)]
            for n in names:  # NOTE: a sparse layer without experts fails here, not as dense
                if n not in ckpt:
                    raise CheckpointIncomplete("expert tensor missing from the checkpoint",
                                               path=ckpt.dir, tensor=n)
            self.claimed.update(names)

    def _hub_names(self, l: int, e: int) -> list[str]:
        f = self.fam
        return [f"model.layers.{l}.{f.moe_prefix}.experts.{e}.{p}.weight"
                for p in (f.gate, f.up, f.down)]

    @staticmethod
    def _fused_names(l: int) -> list[str]:
        return [f"model.layers.{l}.mlp.experts.gate_up_proj",
                f"model.layers.{l}.mlp.experts.down_proj"]

    def names(self, l: int, e: int) -> list[str]:
        """What to call expert (l, e)'s gate, up and down in messages."""
        if l not in self.fused:
            return self._hub_names(l, e)
        gu, down = self._fused_names(l)
        return [f"{gu}[{e}] (gate rows)", f"{gu}[{e}] (up rows)", f"{down}[{e}]"]

    def get(self, l: int, e: int) -> list[tuple[np.ndarray, str]]:
        if l not in self.fused:
            return [self.ckpt.get(n) for n in self._hub_names(l, e)]
        gu_name, down_name = self._fused_names(l)
        gu, dtype = self.ckpt.get_row(gu_name, e)          # [2F, H]
        down, ddtype = self.ckpt.get_row(down_name, e)     # [H, F]
        if gu.ndim != 2 or gu.shape[0] % 2:
            raise UnsupportedModel(f"{gu_name} has rows of shape {gu.shape}; expected [2F, H]")
        F = gu.shape[0] // 2
        return [(np.ascontiguousarray(gu[:F]), dtype), (np.ascontiguousarray(gu[F:]), dtype),
                (down, ddtype)]


def _dense_names(ckpt: "_Checkpoint", config: dict, fam, claimed: set[str]) -> dict[str, str]:
    """{hub name: checkpoint name} of the non-expert tensors, exactly the set the engine uses
    (families.dense_tensors). A tensor the engine would not use is UnsupportedModel, a missing
    one CheckpointIncomplete, each naming the tensor and the checkpoint."""
    want = dense_tensors(config)
    have: dict[str, str] = {}
    for n in ckpt.names():
        if n in claimed:
            continue
        hub = hub_name(fam, n)
        if hub not in want and n == "lm_head.weight" and config.get("tie_word_embeddings"):
            # tied embeddings: a copy of the embeddings is harmless, anything else is not
            if _same(ckpt, n, "model.embed_tokens.weight"):
                continue
            raise UnsupportedModel(f"{ckpt.dir}: lm_head.weight differs from the embeddings "
                                   f"but tie_word_embeddings is true")
        if hub not in want:
            raise UnsupportedModel(f"{ckpt.dir}: tensor {n} is not part of a {fam.name} model "
                                   f"(architectures {config.get('architectures')}); edgert "
                                   f"refuses it rather than ignore it")
        if hub in have:
            raise UnsupportedModel(f"{ckpt.dir}: tensors {have[hub]} and {n} are both {hub} "
                                   f"(hub and fused layouts mixed)")
        have[hub] = n
    for name in want:
        if name not in have:
            raise CheckpointIncomplete(f"tensor a {fam.name} model needs is missing from the "
                                       f"checkpoint", path=ckpt.dir, tensor=name)
    return have


def _same(ckpt: "_Checkpoint", a: str, b: str) -> bool:
    x, y = ckpt.get(a), ckpt.get(b)
    return x[1] == y[1] and np.array_equal(x[0], y[0])


def pack_hf(model_dir, out_path, block_size: int = DEFAULT_BLOCK_SIZE,
            progress: bool = True, quant: str | None = None,
            group_size: int | None = None) -> dict:
    """Pack a checkpoint of a supported family (families.SUPPORTED_ARCHITECTURES) into
    `out_path`. Returns a summary.

    quant: None, or "int8" / "int4" / "mixed": beside the 16-bit experts the pack holds a
    low-bit copy of each (int8, or int4 for int4 and mixed; the name is the pack's default
    precision). group_size: inputs per int4 scale (quant.INT4_GROUPS; default 64)."""
    check_quant_options(quant, group_size)            # before reading anything
    model_dir = os.fspath(model_dir)
    check_output(os.fspath(out_path))                 # before reading any tensor
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointIncomplete("config.json missing", path=cfg_path)
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointIncomplete(f"config.json is not valid JSON: {e}", path=cfg_path) from None
    if not isinstance(config, dict):
        raise CheckpointIncomplete("config.json is not a JSON object", path=cfg_path)
    fam = check_runnable(config)
    ckpt = _Checkpoint(model_dir)
    n_layers = int(config["num_hidden_layers"])
    sparse = moe_layers(config, fam)
    n_exp = num_experts(config)
    experts = _Experts(ckpt, fam, sparse, n_exp)
    dense = _dense_names(ckpt, config, fam, experts.claimed)
    shapes = dense_tensors(config)
    ffn, hid = int(config.get(fam.ffn_key) or 0), int(config["hidden_size"])

    bar = _progress(len(dense) + len(experts.keys), progress,
                    os.path.basename(model_dir.rstrip("/")))
    summary = {"family": fam.name, "experts": len(experts.keys), "tensors": len(dense),
               "expert_bytes": 0, "tensor_bytes": 0}
    lowbit = LowbitWriter(quant, group_size) if quant else None
    w = PackWriter(out_path, kind="moe", block_size=block_size)
    try:
        specs = {}
        for hub, name in dense.items():
            arr, dtype = ckpt.get(name)
            if tuple(arr.shape) != shapes[hub]:
                raise UnsupportedModel(f"{model_dir}: tensor {name} has shape "
                                       f"{list(arr.shape)}; a {fam.name} model with this "
                                       f"config.json has {list(shapes[hub])}")
            specs[hub] = w.add_tensor(arr, dtype=dtype)
            summary["tensor_bytes"] += arr.nbytes
            bar.update(1)
        w.add_task("model", specs)
        table, layout = [], None
        for l, e in experts.keys:
            parts, names = experts.get(l, e), experts.names(l, e)
            this = _expert_layout(parts, names)
            if layout is None:
                layout = this
                g = this["tensors"]["gate"]["shape"]
                if g != [ffn, hid]:
                    raise UnsupportedModel(f"{model_dir}: expert {names[0]} has shape {g}; "
                                           f"config.json says [{fam.ffn_key}, hidden_size] = "
                                           f"{[ffn, hid]}")
                if lowbit is not None:
                    lowbit.check_shapes(this["tensors"], names)
            elif this != layout:
                raise UnsupportedModel(f"expert {l}.{e} differs in dtype or shape from the others: "
                                       f"{this} vs {layout}")
            table.append([l, e, w.add_extent(b"".join(a.tobytes() for a, _ in parts))])
            if lowbit is not None:
                lowbit.add(w, l, e, parts)
            summary["expert_bytes"] += layout["extent_bytes"]
            bar.update(1)
        if layout is None:
            raise UnsupportedModel(f"{fam.name} checkpoint with no sparse layers")
        w.sections["experts"] = msgpack.packb({
            "num_layers": n_layers, "num_experts": n_exp,
            "top_k": int(config["num_experts_per_tok"]),
            "extent_bytes": layout["extent_bytes"], "tensors": layout["tensors"],
            "table": table, "moe_layers": sparse}, use_bin_type=True)
        if lowbit is not None:
            w.sections["lowbit"] = lowbit.section()
            summary.update(lowbit.summary())
        tok = os.path.join(model_dir, "tokenizer.json")
        if os.path.exists(tok):
            with open(tok, "rb") as f:
                w.sections["tokenizer"] = f.read()
        w.config = config
        w.close()
    except BaseException:
        w.abort()
        raise
    finally:
        bar.close()
        ckpt.close()
    return summary


def _expert_layout(parts, names) -> dict:
    tensors, off = {}, 0
    for key, (arr, dtype), name in zip(("gate", "up", "down"), parts, names):
        if arr.ndim != 2:
            raise UnsupportedModel(f"expert tensor {name} has shape {arr.shape}, expected 2-D")
        tensors[key] = {"dtype": dtype, "shape": [int(d) for d in arr.shape], "offset": off}
        off += arr.nbytes
    g, u, d = (tensors[k]["shape"] for k in ("gate", "up", "down"))
    if g != u or d != [g[1], g[0]] or len({t["dtype"] for t in tensors.values()}) != 1:
        raise UnsupportedModel(f"expert tensors {names} do not form a SwiGLU expert: "
                               f"gate {g}, up {u}, down {d}")
    return {"extent_bytes": off, "tensors": tensors}


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, disable=not enabled, desc=f"pack {desc}", unit="tensor")
