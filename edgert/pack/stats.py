"""Sharing figures of a pack: stored vs dense bytes, zero blocks, bytes shared and moved per
task pair."""
from __future__ import annotations

from .reader import PackReader


def task_blocks(reader: PackReader, task: str) -> list[tuple[str, int, int]]:
    """(tensor, position, block index) for every block position of a task."""
    return [(name, pos, b) for name, spec in reader.task(task).items()
            for pos, b in enumerate(spec.blocks)]


def switch_cost(reader: PackReader, a: str, b: str) -> tuple[int, int]:
    """(bytes read, bytes memset) by a cold switch A -> B.

    The task switcher writes every block position of B whose block differs from A's: a
    zero block by a memset, any other block from storage (or, warm, from the spare-slot
    cache, so the bytes read are the most a switch reads).
    """
    spec_a, read, zero = reader.task(a), 0, 0
    for name, spec in reader.task(b).items():
        old = spec_a.get(name)
        for pos, blk in enumerate(spec.blocks):
            ent = reader.blocks[blk]
            if old is None or pos >= len(old.blocks) or \
                    reader.blocks[old.blocks[pos]].hash != ent.hash:
                if ent.zero:
                    zero += ent.length
                else:
                    read += ent.length
    return read, zero


def switch_bytes(reader: PackReader, a: str, b: str) -> int:
    """Bytes a cold switch A -> B reads from storage (zero blocks are memset, not read)."""
    return switch_cost(reader, a, b)[0]


def zero_blocks(reader: PackReader) -> dict:
    """Zero blocks: manifest entries, block positions of all tasks that use one, their bytes."""
    ents = reader.blocks
    used = [ents[i].length for specs in reader.manifest.tasks.values()
            for s in specs.values() for i in s.blocks if ents[i].zero]
    return {"entries": sum(b.zero for b in ents), "count": len(used), "bytes": sum(used)}


def shared_bytes(reader: PackReader, a: str, b: str) -> int:
    """Bytes of distinct blocks both tasks use (stored once in the pack)."""
    ha = {reader.blocks[i].hash for s in reader.task(a).values() for i in s.blocks}
    seen, total = set(), 0
    for s in reader.task(b).values():
        for i in s.blocks:
            h = reader.blocks[i].hash
            if h in ha and h not in seen:
                seen.add(h)
                total += reader.blocks[i].length
    return total


def task_io(reader: PackReader) -> dict:
    """A task pack's graph inputs and outputs: name -> {"dtype", "shape"} (symbolic
    dimensions by name), from the pack's ONNX skeleton."""
    raw = reader.sections.get("onnx_skeleton")
    if raw is None:
        return {"inputs": {}, "outputs": {}}
    import onnx
    from onnx import helper
    graph = onnx.ModelProto.FromString(raw).graph
    weights = set(reader.task(reader.tasks[0])) if reader.tasks else set()

    def spec(vi):
        t = vi.type.tensor_type
        return {"dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type)),
                "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                          for d in t.shape.dim]}
    return {"inputs": {vi.name: spec(vi) for vi in graph.input if vi.name not in weights},
            "outputs": {vi.name: spec(vi) for vi in graph.output}}


def moe_summary(reader: PackReader) -> dict:
    """An MoE pack's architecture, experts and tokenizer."""
    ex, cfg = reader.manifest.experts, reader.config
    out = {"architectures": cfg.get("architectures"), "layers": cfg.get("num_hidden_layers"),
           "hidden_size": cfg.get("hidden_size"), "vocab_size": cfg.get("vocab_size"),
           "tokenizer": "tokenizer" in reader.sections}
    if ex is not None:
        out.update(moe_layers=len(ex.moe_layers), experts_per_layer=ex.num_experts,
                   top_k=ex.top_k, experts=len(ex.table), expert_bytes=ex.extent_bytes,
                   expert_dtype=ex.tensors["gate"].dtype,
                   experts_bytes=ex.extent_bytes * len(ex.table))
    if reader.manifest.lowbit is not None:
        from .lowbit_stats import lowbit_summary
        out["lowbit"] = lowbit_summary(reader.manifest.lowbit, ex)
    return out


def summary(reader: PackReader) -> dict:
    tasks = reader.tasks
    dense = {t: sum(s.nbytes for s in reader.task(t).values()) for t in tasks}
    cost = {f"{a}->{b}": switch_cost(reader, a, b) for a in tasks for b in tasks if a != b}
    extra = task_io(reader) if reader.kind == "onnx-tasks" else \
        {"moe": moe_summary(reader)} if reader.kind == "moe" else {}
    return {**extra,
        "path": reader.path,
        "kind": reader.kind,
        "generation": reader.generation,
        "block_size": reader.block_size,
        "tasks": tasks,
        "blocks": len(reader.blocks),
        "bytes_stored": sum(b.length for b in reader.blocks if not b.zero),
        "bytes_file": reader.file_size,
        "bytes_dense": sum(dense.values()),
        "task_bytes": dense,
        "zero_blocks": zero_blocks(reader),
        "sections": {k: len(v) for k, v in reader.sections.items()},
        "shared_bytes": {f"{a}<->{b}": shared_bytes(reader, a, b)
                         for i, a in enumerate(tasks) for b in tasks[i + 1:]},
        "switch_bytes": {k: read for k, (read, _) in cost.items()},
        "switch_zero_bytes": {k: zero for k, (_, zero) in cost.items()},
    }
