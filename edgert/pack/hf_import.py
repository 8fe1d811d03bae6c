"""Pack a Hugging Face MoE checkpoint (Mixtral family) into an edgert pack of kind "moe".

Layout (docs/internals.md, "MoE pack layout"): every non-expert tensor goes into task
"model" under its checkpoint name; each expert becomes one extent holding gate|up|down
back to back in the checkpoint's dtype, so loading an expert is one read.
"""
from __future__ import annotations

import json
import os
import re

import msgpack
import numpy as np

from ..errors import PackCorrupt, UnsupportedModel
from .families import SUPPORTED_ARCHITECTURES, family_of, moe_layers  # noqa: F401
from .format import DEFAULT_BLOCK_SIZE
from .writer import PackWriter, check_output

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class CheckpointIncomplete(PackCorrupt):
    """A checkpoint directory lacks a file or tensor its config or index promises.

    A subclass of PackCorrupt: the input to the packer is damaged in the same sense a pack
    can be, and callers that already handle PackCorrupt keep working.
    """


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
        t = f.get_tensor(name).contiguous()
        if dtype == "bfloat16":
            import torch
            return t.view(torch.int16).numpy().view(np.uint16), dtype
        return t.numpy(), dtype

    def close(self) -> None:
        self._open.clear()


_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.(\w+)\.experts\.(\d+)\.(\w+)\.weight$")


def pack_hf(model_dir, out_path, block_size: int = DEFAULT_BLOCK_SIZE,
            progress: bool = True) -> dict:
    """Pack a Mixtral / Qwen2-MoE checkpoint directory into `out_path`. Returns a summary."""
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
    fam = family_of(config)
    ckpt = _Checkpoint(model_dir)
    n_layers = int(config["num_hidden_layers"])
    sparse = moe_layers(config, fam)
    n_exp = int(config.get(fam.num_experts_key, 0))
    expert_names = {(l, e): [f"model.layers.{l}.{fam.moe_prefix}.experts.{e}.{p}.weight"
                             for p in (fam.gate, fam.up, fam.down)]
                    for l in sparse for e in range(n_exp)}
    claimed = {n for names in expert_names.values() for n in names}
    # NOTE: a sparse layer whose experts are absent must fail here, not be packed as dense.
    for names in expert_names.values():
        for n in names:
            if n not in ckpt:
                raise CheckpointIncomplete("expert tensor missing from the checkpoint",
                                           path=model_dir, tensor=n)
    stray = [n for n in ckpt.names() if _EXPERT_RE.match(n) and n not in claimed]
    if stray:
        raise UnsupportedModel(f"expert tensors outside the config's MoE layers: {stray[:3]}")
    others = [n for n in ckpt.names() if n not in claimed]
    if "lm_head.weight" not in ckpt and not config.get("tie_word_embeddings", False):
        raise CheckpointIncomplete("lm_head.weight missing and tie_word_embeddings is false",
                                   path=model_dir, tensor="lm_head.weight")

    bar = _progress(len(others) + len(expert_names), progress,
                    os.path.basename(model_dir.rstrip("/")))
    summary = {"family": fam.name, "experts": len(expert_names), "tensors": len(others),
               "expert_bytes": 0, "tensor_bytes": 0}
    w = PackWriter(out_path, kind="moe", block_size=block_size)
    try:
        specs = {}
        for name in others:
            arr, dtype = ckpt.get(name)
            specs[name] = w.add_tensor(arr, dtype=dtype)
            summary["tensor_bytes"] += arr.nbytes
            bar.update(1)
        w.add_task("model", specs)
        table, layout = [], None
        for (l, e), names in expert_names.items():
            parts = [ckpt.get(n) for n in names]
            this = _expert_layout(parts, names)
            if layout is None:
                layout = this
            elif this != layout:
                raise UnsupportedModel(f"expert {l}.{e} differs in dtype or shape from the others: "
                                       f"{this} vs {layout}")
            table.append([l, e, w.add_extent(b"".join(a.tobytes() for a, _ in parts))])
            summary["expert_bytes"] += layout["extent_bytes"]
            bar.update(1)
        if layout is None:
            raise UnsupportedModel(f"{fam.name} checkpoint with no sparse layers")
        w.sections["experts"] = msgpack.packb({
            "num_layers": n_layers, "num_experts": n_exp,
            "top_k": int(config["num_experts_per_tok"]),
            "extent_bytes": layout["extent_bytes"], "tensors": layout["tensors"],
            "table": table, "moe_layers": sparse}, use_bin_type=True)
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
