"""`edgert pack onnx`: task models that share one graph -> one pack.

Every initializer of every task becomes a tensor of that task; identical blocks are
stored once. The graph itself, with initializer data removed, is stored once as the
section ``onnx_skeleton``. With ``align_tol > 0`` a task block within ``align_tol``
(max abs difference) of the base model's block at the same position is replaced by the
base block: lossy, opt-in, and reported per task with the output error it causes.
With ``prune`` (``--prune-blocks``), whole blocks of the tasks' weight matrices are zeroed
after that (``prune.py``, ranked by ``importance.py``): lossy, opt-in, measured on the
user's calibration inputs.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import IncompatibleModels
from . import prune as pruning
from .format import DEFAULT_BLOCK_SIZE, block_hash
from .onnx_quant import OnnxQuant, quantize_files
from .onnx_quant import check_options as check_quant
from .prune import PruneOptions, TaskPruning
from .reference import load_model, random_inputs
from .writer import PackWriter, check_output

log = logging.getLogger(__name__)
SKELETON = "onnx_skeleton"
_FLOAT_KINDS = "f"


@dataclass
class TaskReport:
    name: str
    blocks: int = 0
    snapped: int = 0
    max_output_error: float = 0.0
    outputs_checked: int = 0
    pruning: TaskPruning | None = None


@dataclass
class PackReport:
    tasks: list[TaskReport] = field(default_factory=list)
    blocks_stored: int = 0


def skeleton_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with initializer data removed (names, dtypes and shapes live in the pack)."""
    sk = onnx.ModelProto()
    sk.CopyFrom(model)
    del sk.graph.initializer[:]
    return sk


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def check_compatible(base: onnx.ModelProto, other: onnx.ModelProto, name: str) -> None:
    """Raise IncompatibleModels naming the first node or initializer that differs."""
    gb, go = base.graph, other.graph
    for what, a, b in (("input", gb.input, go.input), ("output", gb.output, go.output)):
        if [x.SerializeToString() for x in a] != [x.SerializeToString() for x in b]:
            raise IncompatibleModels(f"task {name}: graph {what}s differ from the base model")
    for i in range(max(len(gb.node), len(go.node))):
        if i >= len(gb.node) or i >= len(go.node):
            raise IncompatibleModels(f"task {name}: graph has {len(go.node)} nodes, "
                                     f"the base has {len(gb.node)} (first extra node at {i})")
        nb, no = gb.node[i], go.node[i]
        if nb.SerializeToString() != no.SerializeToString():
            raise IncompatibleModels(f"task {name}: node {i} ({no.name or no.op_type}) differs "
                                     f"from the base node {nb.name or nb.op_type}")
    ib = {t.name: (t.data_type, tuple(t.dims)) for t in gb.initializer}
    io = {t.name: (t.data_type, tuple(t.dims)) for t in go.initializer}
    for n in sorted(set(ib) | set(io)):
        if ib.get(n) != io.get(n):
            side = "missing from the task" if n not in io else \
                "not in the base" if n not in ib else \
                f"dtype/shape {io[n]} vs base {ib[n]}"
            raise IncompatibleModels(f"task {name}: initializer {n} differs: {side}")


def align_to_base(arr: np.ndarray, base: np.ndarray, block_size: int, tol: float) -> tuple[np.ndarray, int]:
    """Replace each block of ``arr`` within ``tol`` of the base block by the base block."""
    if tol <= 0 or arr.dtype.kind not in _FLOAT_KINDS or arr.size == 0:
        return arr, 0
    per = max(1, block_size // arr.dtype.itemsize)
    flat, bflat = arr.reshape(-1).copy(), base.reshape(-1)
    snapped = 0
    for i in range(0, flat.size, per):
        a, b = flat[i:i + per], bflat[i:i + per]
        if not np.array_equal(a, b) and float(np.max(np.abs(a.astype(np.float64) - b))) <= tol:
            flat[i:i + per] = b
            snapped += 1
    return flat.reshape(arr.shape), snapped


def output_error(original: onnx.ModelProto, weights: dict[str, np.ndarray], trials: int = 3) -> float:
    """Max abs output difference between the original model and one with ``weights``."""
    import onnxruntime as ort
    changed = onnx.ModelProto()
    changed.CopyFrom(original)
    for t in changed.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sa = ort.InferenceSession(original.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(changed.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    err = 0.0
    for _ in range(trials):
        feeds = random_inputs(original, rng)
        for x, y in zip(sa.run(None, feeds), sb.run(None, feeds)):
            if np.asarray(x).size:
                err = max(err, float(np.max(np.abs(np.asarray(x, np.float64) - y))))
    return err


def pack_onnx(base_path, tasks: dict[str, str | Path], out_path, *,
              block_size: int = DEFAULT_BLOCK_SIZE, align_tol: float = 0.0,
              prune: PruneOptions | None = None, quant: OnnxQuant | None = None) -> PackReport:
    """Pack ``tasks`` (name -> ONNX file) sharing the graph of ``base_path``. With ``quant``
    every file is first quantized by ONNX Runtime (onnx_quant.py) and the quantized files are
    packed; quantized files given as they are pack like float ones."""
    if not (isinstance(align_tol, (int, float)) and align_tol >= 0):   # NaN fails too
        raise ValueError(f"align_tol must be >= 0 (0 = lossless), got {align_tol!r}")
    if not tasks:
        raise ValueError("at least one --task NAME=FILE is needed")
    check_quant(quant, tasks, align_tol=align_tol, prune=prune)
    if prune is not None:
        _check_calib_names(prune, tasks)
    check_output(os.fspath(out_path))                 # before reading any model
    if quant is None:
        return _pack(base_path, tasks, out_path, block_size, align_tol, prune, None)
    out_dir = os.path.dirname(os.path.abspath(os.fspath(out_path)))
    with tempfile.TemporaryDirectory(prefix=".edgert-quant-", dir=out_dir) as tmp:
        qbase, qtasks, record = quantize_files(base_path, tasks, quant, tmp)
        record["base"] = Path(base_path).name
        return _pack(qbase, qtasks, out_path, block_size, align_tol, prune, record)


def _pack(base_path, tasks, out_path, block_size: int, align_tol: float,
          prune: PruneOptions | None, quant_record: dict | None) -> PackReport:
    base = load_model(base_path)
    base_w = initializers(base)
    report = PackReport()
    weights: dict[str, dict[str, np.ndarray]] = {}
    models, feeds = {}, {}
    for name, path in tasks.items():
        model = base if Path(path).resolve() == Path(base_path).resolve() else load_model(path)
        check_compatible(base, model, name)
        if prune is not None:                         # a calibration mistake before any work
            models[name], feeds[name] = model, pruning.load_calib(name, prune.calib[name], model)
        rep = TaskReport(name)
        weights[name] = {}
        for tname, arr in initializers(model).items():
            arr, snapped = align_to_base(arr, base_w[tname], block_size, align_tol)
            rep.snapped += snapped
            weights[name][tname] = arr
        if rep.snapped:
            rep.max_output_error = output_error(model, weights[name])
            rep.outputs_checked = 3
        report.tasks.append(rep)
    if prune is not None:
        _prune(base, weights, models, feeds, block_size, prune, report)
    with PackWriter(out_path, kind="onnx-tasks", block_size=block_size) as w:
        for block in layout_order(weights, block_size):
            w.add_extent(block)
        for rep in report.tasks:
            specs = {t: w.add_tensor(a) for t, a in weights[rep.name].items()}
            rep.blocks = sum(len(s.blocks) for s in specs.values())
            w.add_task(rep.name, specs)
            log.info("task %s: %d blocks, %d snapped to the base", rep.name, rep.blocks,
                     rep.snapped)
        w.sections[SKELETON] = skeleton_of(base).SerializeToString()
        if prune is not None:
            w.sections[pruning.SECTION] = pruning.encode_section(
                prune, {r.name: r.pruning for r in report.tasks})
        w.config = {"base": (quant_record or {}).get("base", Path(base_path).name),
                    "align_tol": float(align_tol),
                    "inputs": [vi.name for vi in base.graph.input
                               if vi.name not in base_w],
                    "outputs": [vi.name for vi in base.graph.output],
                    "alignment": {r.name: {"snapped_blocks": r.snapped,
                                           "max_output_error": r.max_output_error}
                                  for r in report.tasks}}
        if quant_record is not None:
            w.config["quant"] = quant_record
        report.blocks_stored = w.block_count
    return report


def _check_calib_names(prune: PruneOptions, tasks) -> None:
    unknown = sorted(set(prune.calib) - set(tasks))
    if unknown:
        raise ValueError(f"--calib {unknown[0]}=...: no task {unknown[0]!r} "
                         f"(tasks: {', '.join(tasks)})")
    missing = [t for t in tasks if t not in prune.calib]
    if missing:
        raise ValueError(f"--prune-blocks needs calibration inputs for every task: add "
                         f"--calib {missing[0]}=FILE.npz (arrays named by model input)")


def _prune(base, weights, models, feeds, block_size: int, prune: PruneOptions,
           report: PackReport) -> None:
    """Zero weight-matrix blocks of every task in place of ``weights`` (prune.py)."""
    from .importance import block_scores
    names = pruning.weight_matrices(base)
    scores = {t: block_scores(prune.importance, models[t], weights[t], feeds[t], names, block_size)
              for t in weights}
    order = pruning.prune_order(weights, scores, names, block_size, prune.joint,
                                 prune.scope)
    for rep in report.tasks:
        weights[rep.name], rep.pruning = pruning.prune_task(models[rep.name], weights[rep.name],
                                                    order[rep.name], feeds[rep.name],
                                                    block_size, prune)
        log.info("task %s: %d/%d weight-matrix blocks pruned, relative error %.3g", rep.name,
                 rep.pruning.blocks_pruned, rep.pruning.blocks_prunable,
                 rep.pruning.error.rel)


def layout_order(weights: dict[str, dict[str, np.ndarray]], block_size: int) -> list[memoryview]:
    """Every distinct block, grouped by the set of tasks that use it.

    A switch A -> B reads exactly the blocks B uses and A does not; with blocks grouped
    by their user set, those are a few long runs in the file instead of scattered pieces.
    Groups used by more tasks come first; inside a group blocks keep tensor order.
    """
    names = list(weights)
    users: dict[bytes, int] = {}                 # hash -> bit set of task indices
    first: dict[bytes, memoryview] = {}
    for i, t in enumerate(names):
        for arr in weights[t].values():
            raw = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
            for k in range(0, len(raw), block_size):
                piece = raw[k:k + block_size]
                h = block_hash(piece)
                users[h] = users.get(h, 0) | (1 << i)
                first.setdefault(h, piece)
    order = sorted(first, key=lambda h: (-bin(users[h]).count("1"), users[h]))
    return [first[h] for h in order]   # sorted() is stable: tensor order inside a group
