"""New versions of a pack: `edgert pack onnx --append` and `edgert pack hf --append`.

A new version adds only blocks the pack lacks plus a new manifest; the pack's generation
(its version, docs/updates.md) grows by one. The old version's bytes are never touched,
so a model serving it keeps serving while the new version is written.
"""
from __future__ import annotations

import os
from dataclasses import replace

import onnx

from ..errors import IncompatibleModels
from ..pack.onnx_import import SKELETON, check_compatible, initializers, load_model, skeleton_of
from ..pack.reader import PackReader
from ..pack.writer import PackWriter


def append_onnx(pack, tasks: dict[str, str]) -> dict:
    """Add or replace ``tasks`` (name -> ONNX file) in an ``onnx-tasks`` pack; each must
    have the pack's graph and tensor shapes. A summary: generation, blocks, bytes added."""
    if not tasks:
        raise ValueError("at least one --task NAME=FILE is needed")
    with PackReader(pack, read_mode="buffered") as r:
        if r.kind != "onnx-tasks" or SKELETON not in r.sections:
            raise IncompatibleModels(f"{pack}: a {r.kind} pack; --append with ONNX tasks "
                                     "needs a pack built by `edgert pack onnx`")
        skel = onnx.ModelProto.FromString(r.sections[SKELETON])
        shapes = {n: (s.dtype, s.shape) for n, s in r.task(r.tasks[0]).items()}
        blocks_before = len(r.blocks)
    weights = {}
    for name, path in tasks.items():             # every model checked before a byte is written
        model = load_model(path)
        check_compatible(skel, skeleton_of(model), name)
        w = initializers(model)
        got = {n: (a.dtype.name, tuple(a.shape)) for n, a in w.items()}
        for n in sorted(set(got) | set(shapes)):
            if got.get(n) != shapes.get(n):
                raise IncompatibleModels(f"task {name}: initializer {n} is {got.get(n)}, the "
                                         f"pack holds {shapes.get(n)}")
        weights[name] = w
    end = os.path.getsize(pack)
    with PackWriter.append(pack) as w:
        for name, arrays in weights.items():
            w.add_task(name, {t: w.add_tensor(a) for t, a in arrays.items()})
        cfg = dict(w.config)
        cfg["alignment"] = {**cfg.get("alignment", {}),
                            **{n: {"snapped_blocks": 0, "max_output_error": 0.0}
                               for n in weights}}
        w.config = cfg
        generation, added = w.generation, w.block_count - blocks_before
    return {"generation": generation, "tasks": list(weights), "blocks_added": added,
            "bytes_added": os.path.getsize(pack) - end}


class _ReaderBlocks:
    """hash -> verified bytes, read from a pack (a graft's source)."""

    def __init__(self, reader: PackReader):
        self.r = reader
        self.index = {b.hash: i for i, b in enumerate(reader.blocks) if not b.zero}

    def __getitem__(self, h: bytes) -> bytes:
        return self.r.read_block(self.index[h])


def append_hf(pack, model_dir, **options) -> dict:
    """A retrained MoE checkpoint of the pack's architecture as the pack's next version:
    packed beside the pack (``PACK.hf-tmp``), then grafted (only blocks that differ are
    appended) and the temporary pack removed."""
    from ..pack.hf_import import pack_hf
    from .graft import graft
    with PackReader(pack, read_mode="buffered") as r:
        old, generation = r.manifest, r.generation
    if old.kind != "moe":
        raise IncompatibleModels(f"{pack}: a {old.kind} pack; `pack hf --append` needs an MoE "
                                 "pack")
    tmp = os.fspath(pack) + ".hf-tmp"
    try:
        summary = pack_hf(model_dir, tmp, block_size=old.block_size, **options)
        with PackReader(tmp, read_mode="buffered") as t:
            new = t.manifest
            a, b = old.experts, new.experts
            if (a.num_layers, a.num_experts, a.extent_bytes, a.moe_layers) != \
                    (b.num_layers, b.num_experts, b.extent_bytes, b.moe_layers) or \
                    set(old.tasks) != set(new.tasks):
                raise IncompatibleModels(f"{model_dir}: not the architecture of {pack} "
                                         f"(layers, experts or expert size differ)")
            end = os.path.getsize(pack)
            graft(pack, replace(new, generation=generation + 1), _ReaderBlocks(t))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {**summary, "generation": generation + 1, "bytes_added": os.path.getsize(pack) - end}
