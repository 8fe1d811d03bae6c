"""Block pruning at pack time: zero whole pack blocks of weight matrices, lowest norms first.

A pack block of a tensor is ``block_size`` bytes of its row-major data (the last one may be
shorter), so pruning a block zeroes exactly the bytes one block index of the pack holds:
every pruned block of every task is the same all-zero content, stored once and moved by a
switch only where the other task holds something else.

- **Which tensors.** Float initializers of two or more dimensions that a MatMul, Gemm or
  Conv takes as its weight (input 1). Biases, norms, position embeddings and everything
  else stay dense.
- **Which blocks.** Lowest importance first (``importance.py``: ``norm``, the block RMS, or
  ``activation``, the RMS of the weights scaled by the task's input-feature RMS on its
  calibration inputs); ties go to the lower position (graph order, then block index).
  ``Scope.TENSOR`` (the default): each tensor of ``n`` blocks loses ``floor(fraction * n)``
  (a tensor of one block is never pruned). ``Scope.MODEL``: the fraction is a budget of
  ``floor(fraction * N)`` over all ``N`` weight-matrix blocks of the task, ranked across
  tensors by each block's **share of its tensor's energy** (``score^2 * elements`` over
  the tensor's sum; ``energy_share``), and every tensor keeps its most important block.
- **Independent** masks rank each task's own scores. **Joint** masks rank block positions
  once for all tasks: the mean over tasks of the scores, each task's normalised by its mean
  over the tensor (tensor scope) or taken as energy shares (model scope), so a task whose
  activations run larger does not outvote the others,
  discounted by ``SWITCH_COST_WEIGHT`` times the share of task pairs whose blocks differ
  there. A position where tasks agree costs nothing to keep (a switch moves nothing there);
  one where they differ costs a read on every switch between them, so among blocks of
  similar importance the differing ones go first. Every task then prunes a prefix of the
  same order, so two tasks prune the same positions (up to the shorter prefix when
  ``--max-error`` stops one of them earlier).
- **Lossy, measured.** Each task's outputs on the user's calibration inputs are compared
  with its dense original ONNX model (ONNX Runtime, one thread, so the figures and the
  pack bytes are deterministic): max abs error, relative error ``|y - y0| / |y0|`` (L2 over
  the whole batch, worst output), and top-1 agreement for 2-D float outputs. ``max_error``
  bounds the relative error: the fraction is bisected down until it holds. The figures are
  stored in the pack as the section ``pruning`` (msgpack), shown by ``edgert inspect``.
"""
from __future__ import annotations

import math
import os
import zipfile
from dataclasses import asdict, dataclass, field
from enum import Enum

import msgpack
import numpy as np
import onnx

from ..errors import InputMismatch
from .format import block_hash
from .importance import DEFAULT as DEFAULT_IMPORTANCE, Importance
from .reference import run_model

SECTION = "pruning"
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}  # op -> weight input
# NOTE: a block where every pair of tasks differs must have 1/(1-0.5) = 2x the mean norm
# of a shared block to be kept: keeping it costs a storage read on every switch
SWITCH_COST_WEIGHT = 0.5
SEARCH_STEPS = 6          # bisection steps of the fraction under max_error: 1/64 resolution


class Scope(str, Enum):
    TENSOR = "tensor"     # every weight matrix prunes the fraction of its blocks
    MODEL = "model"       # the fraction is a budget over all the task's weight-matrix blocks


@dataclass(frozen=True)
class PruneOptions:
    fraction: float
    calib: dict[str, str]                 # task -> .npz of calibration inputs
    joint: bool = False
    max_error: float | None = None        # bound on the relative output error
    importance: Importance = DEFAULT_IMPORTANCE
    scope: Scope = Scope.TENSOR

    def __post_init__(self):
        try:
            object.__setattr__(self, "scope", Scope(self.scope))
        except ValueError:
            raise ValueError(f"--prune-scope {self.scope!r}: one of "
                             f"{', '.join(s.value for s in Scope)}") from None
        try:
            object.__setattr__(self, "importance", Importance(self.importance))
        except ValueError:
            raise ValueError(f"--importance {self.importance!r}: one of "
                             f"{', '.join(i.value for i in Importance)}") from None
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction < 1):
            raise ValueError(f"--prune-blocks {self.fraction!r}: the fraction of blocks to "
                             "prune must lie strictly between 0 and 1")
        if self.max_error is not None and not (self.max_error > 0 and math.isfinite(self.max_error)):
            raise ValueError(f"--max-error {self.max_error!r}: must be a positive number "
                             "(a bound on the relative output error)")


@dataclass
class OutputError:
    """A pruned task's outputs against its dense original on the calibration inputs."""
    max_abs: float = 0.0
    rel: float = 0.0
    top1: float | None = None             # argmax agreement of 2-D float outputs, if any
    samples: int = 0


@dataclass
class TaskPruning:
    fraction: float = 0.0                 # the fraction applied (max_error may lower it)
    blocks_pruned: int = 0
    blocks_prunable: int = 0              # blocks of the task's weight matrices
    error: OutputError = field(default_factory=OutputError)


# --- masks ------------------------------------------------------------------------------

def weight_matrices(model: onnx.ModelProto) -> list[str]:
    """Initializers a MatMul/Gemm/Conv uses as its weight, float and >= 2-D, graph order."""
    used = {n.input[WEIGHT_INPUT[n.op_type]] for n in model.graph.node
            if n.op_type in WEIGHT_INPUT and len(n.input) > WEIGHT_INPUT[n.op_type]}
    return [t.name for t in model.graph.initializer if t.name in used and len(t.dims) >= 2
            and onnx.helper.tensor_dtype_to_np_dtype(t.data_type).kind == "f"]


def _blocks(arr: np.ndarray, block_size: int) -> list[np.ndarray]:
    per = block_size // arr.dtype.itemsize
    flat = arr.reshape(-1)
    return [flat[i:i + per] for i in range(0, flat.size, per)]


def _elements(arr: np.ndarray, block_size: int) -> np.ndarray:
    """Elements of each pack block of ``arr`` (the last one may be short): [n]."""
    per = block_size // arr.dtype.itemsize
    n = -(-arr.size // per)
    out = np.full(n, per, np.float64)
    out[-1] = arr.size - per * (n - 1)
    return out


def energy_share(score: np.ndarray, elements: np.ndarray) -> np.ndarray:
    """Each block's share of its tensor's energy: ``score^2 * elements`` over the sum.

    NOTE: this is what makes scores of different tensors comparable. A block's squared
    score times its elements estimates the output energy it carries (for activation
    importance, Wanda's ``||W s||^2`` of its rows), so its share is about the relative error
    pruning it adds at that layer's output; every block costs the same bytes, so ranking
    by share removes the least relative damage per byte first. Raw scores are not
    comparable: a head's weights and an MLP's differ in scale by design."""
    e = np.square(score) * elements
    total = float(e.sum())
    return e / total if total > 0 else np.zeros_like(e)


@dataclass(frozen=True)
class PruneOrder:
    """One task's weight-matrix blocks, the first to prune first, and how a fraction
    picks a prefix of them (per tensor, or over the model)."""
    scope: Scope
    sizes: dict[str, int]                  # tensor -> its blocks
    ranked: list[tuple[str, int]]          # (tensor, block); model scope omits each
    #                                        tensor's most important block (never pruned)

    def select(self, fraction: float) -> dict[str, list[int]]:
        """tensor -> the block positions pruned at ``fraction``."""
        out: dict[str, list[int]] = {n: [] for n in self.sizes}
        if self.scope is Scope.MODEL:
            k = min(pruned_count(sum(self.sizes.values()), fraction), len(self.ranked))
            for name, b in self.ranked[:k]:
                out[name].append(b)
            return out
        left = {n: pruned_count(s, fraction) for n, s in self.sizes.items()}
        for name, b in self.ranked:
            if left[name] > 0:
                out[name].append(b)
                left[name] -= 1
        return out


def _tensor_order(score: np.ndarray) -> np.ndarray:
    return np.argsort(score, kind="stable")


def _over_model(names: list[str], score: dict[str, np.ndarray]) -> list[tuple[str, int]]:
    """(tensor, block) over all tensors by ascending ``score``, each tensor's highest left
    out; ties in graph order, then block order."""
    keys, flat = [], []
    for name in names:
        keep = int(_tensor_order(score[name])[-1])
        for b, v in enumerate(score[name].tolist()):
            if b != keep:
                keys.append((name, b))
                flat.append(v)
    return [keys[i] for i in np.argsort(np.asarray(flat), kind="stable").tolist()]


def _differ_share(weights: dict[str, dict[str, np.ndarray]], tasks: list[str], name: str,
                  block_size: int) -> np.ndarray:
    """Per block position of ``name``: the share of task pairs whose blocks differ."""
    hashes = [[block_hash(memoryview(b.view(np.uint8))) for b in
               _blocks(np.ascontiguousarray(weights[t][name]), block_size)] for t in tasks]
    pairs = len(tasks) * (len(tasks) - 1) // 2
    differ = np.zeros(len(hashes[0]))
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            differ += [a != b for a, b in zip(hashes[i], hashes[j])]
    return differ / pairs if pairs else differ


def prune_order(weights: dict[str, dict[str, np.ndarray]], scores: dict[str, dict[str, np.ndarray]],
                names: list[str], block_size: int, joint: bool,
                scope: Scope = Scope.TENSOR) -> dict[str, PruneOrder]:
    """task -> its PruneOrder; ``scores`` is task -> tensor -> one importance per block
    (importance.py)."""
    tasks = list(weights)
    sizes = {n: len(scores[tasks[0]][n]) for n in names}
    if scope is Scope.MODEL:      # comparable across tensors (energy_share)
        scores = {t: {n: energy_share(scores[t][n], _elements(weights[t][n], block_size))
                      for n in names} for t in tasks}
    if not joint:
        return {t: PruneOrder(scope, sizes, _ranked(scope, names, scores[t])) for t in tasks}
    shared: dict[str, np.ndarray] = {}
    for name in names:
        imp = np.stack([scores[t][name] for t in tasks])                          # [T, n]
        if scope is Scope.TENSOR:
            mean = imp.mean(axis=1, keepdims=True)
            imp = np.divide(imp, mean, out=np.zeros_like(imp), where=mean > 0)
        share = _differ_share(weights, tasks, name, block_size)
        shared[name] = imp.mean(axis=0) * (1 - SWITCH_COST_WEIGHT * share)
    order = PruneOrder(scope, sizes, _ranked(scope, names, shared))
    return {t: order for t in tasks}


def _ranked(scope: Scope, names: list[str], score: dict[str, np.ndarray]) -> list[tuple[str, int]]:
    if scope is Scope.MODEL:
        return _over_model(names, score)
    return [(n, int(b)) for n in names for b in _tensor_order(score[n])]


def pruned_count(n_blocks: int, fraction: float) -> int:
    return int(math.floor(fraction * n_blocks + 1e-9))


def apply(arr: np.ndarray, blocks: list[int], block_size: int) -> np.ndarray:
    """``arr`` with ``blocks`` zeroed (a copy; ``arr`` itself when there are none)."""
    if not blocks:
        return arr
    per = block_size // arr.dtype.itemsize
    flat = arr.reshape(-1).copy()
    for b in blocks:
        flat[b * per:(b + 1) * per] = 0
    return flat.reshape(arr.shape)


# --- calibration and error ----------------------------------------------------------------

def load_calib(task: str, path: str, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The calibration feeds of ``task``: every graph input, its dtype, its rank and fixed
    dimensions; one InputMismatch line for each mistake."""
    where = f"--calib {task}={path}"
    if not os.path.isfile(path):
        raise InputMismatch(f"{where}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            feeds = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputMismatch(f"{where}: not an .npz of input arrays ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    init = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in init]
    extra = sorted(set(feeds) - {vi.name for vi in inputs})
    if extra:
        raise InputMismatch(f"{where}: arrays {extra} are not inputs of the model "
                            f"(inputs: {[vi.name for vi in inputs]})")
    for vi in inputs:
        if vi.name not in feeds:
            raise InputMismatch(f"{where}: lacks the input {vi.name!r}")
        tt, arr = vi.type.tensor_type, feeds[vi.name]
        want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if arr.dtype != want:
            raise InputMismatch(f"{where}: input {vi.name!r} is {arr.dtype}, the model takes {want}")
        if arr.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims, arr.shape)):
            shape = ", ".join("?" if d is None else str(d) for d in dims)
            raise InputMismatch(f"{where}: input {vi.name!r} has shape {list(arr.shape)}, the "
                                f"model takes [{shape}]")
        if arr.size == 0:
            raise InputMismatch(f"{where}: input {vi.name!r} is empty")
    return feeds


def compare(ref: list[np.ndarray], out: list[np.ndarray]) -> OutputError:
    err = OutputError(samples=int(ref[0].shape[0]) if ref and ref[0].ndim else 1)
    for y0, y in zip(ref, out):
        if y0.dtype.kind != "f" or y0.size == 0:
            continue
        d = np.asarray(y, np.float64) - y0
        err.max_abs = max(err.max_abs, float(np.max(np.abs(d))))
        norm = float(np.linalg.norm(y0.astype(np.float64)))
        diff = float(np.linalg.norm(d))
        err.rel = max(err.rel, diff / norm if norm else (0.0 if diff == 0 else math.inf))
        if y0.ndim == 2 and y0.shape[1] > 1:
            agree = float(np.mean(np.argmax(y, axis=1) == np.argmax(y0, axis=1)))
            err.top1 = agree if err.top1 is None else min(err.top1, agree)
    return err


def prune_task(model: onnx.ModelProto, weights: dict[str, np.ndarray],
               order: PruneOrder, feeds: dict[str, np.ndarray], block_size: int,
               opts: PruneOptions) -> tuple[dict[str, np.ndarray], TaskPruning]:
    """Prune one task at ``opts.fraction``, or at the largest bisected fraction whose
    relative error stays within ``opts.max_error``; (its weights, what was done)."""
    ref = run_model(model, feeds)

    def at(f: float) -> tuple[dict[str, np.ndarray], TaskPruning]:
        w, rep = dict(weights), TaskPruning(fraction=f)
        for name, blocks in order.select(f).items():
            w[name] = apply(weights[name], blocks, block_size)
            rep.blocks_pruned += len(blocks)
            rep.blocks_prunable += order.sizes[name]
        rep.error = compare(ref, run_model(model, feeds, w))
        return w, rep

    best = at(opts.fraction)
    if opts.max_error is None or best[1].error.rel <= opts.max_error:
        return best
    lo, hi, best = 0.0, opts.fraction, None
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        got = at(mid)
        if got[1].error.rel <= opts.max_error:
            lo, best = mid, got
        else:
            hi = mid
    return best if best is not None else at(0.0)


# --- the pack section -------------------------------------------------------------------

def encode_section(opts: PruneOptions, tasks: dict[str, TaskPruning]) -> bytes:
    doc = {"fraction": float(opts.fraction), "joint": bool(opts.joint),
           "importance": opts.importance.value, "scope": opts.scope.value,
           "max_error": opts.max_error, "bound": "relative output error",
           "tasks": {t: {**{k: v for k, v in asdict(p).items() if k != "error"},
                         "error": asdict(p.error)} for t, p in tasks.items()}}
    return msgpack.packb(doc, use_bin_type=True)


def pruning_summary(reader) -> dict | None:
    """The ``pruning`` section of a pack as a dict, None when the pack was not pruned."""
    raw = reader.sections.get(SECTION)
    if raw is None:
        return None
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:   # msgpack raises several unrelated types for bad bytes
        return {"invalid": f"{type(e).__name__}: {e}"}
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), dict):
        return {"invalid": "not a map with tasks"}
    return doc


def describe(doc: dict) -> list[str]:
    """Lines for ``edgert inspect`` and ``edgert pack``: what pruning did to each task."""
    if "invalid" in doc:
        return [f"pruning: section unreadable ({doc['invalid']})"]
    bound = doc.get("max_error")
    # NOTE: packs written before --importance existed ranked blocks by norm
    lines = [f"pruned (lossy): {'joint' if doc.get('joint') else 'independent'} block masks at "
             f"{doc.get('fraction')} by {doc.get('importance', 'norm')} importance"
             + (f", relative error bound {bound:g}" if bound else "")
             # NOTE: packs written before --prune-scope existed pruned per tensor
             + ("; fraction over all the task's weight-matrix blocks"
                if doc.get("scope") == Scope.MODEL.value else "; fraction per weight matrix")]
    for t, p in doc["tasks"].items():
        e = p.get("error", {})
        top1 = e.get("top1")
        lines.append(f"  {t}: fraction {p.get('fraction', 0):.3g}, {p.get('blocks_pruned')}/"
                     f"{p.get('blocks_prunable')} weight-matrix blocks zeroed; vs dense on "
                     f"{e.get('samples')} calibration samples: max abs {e.get('max_abs', 0):.3g}, "
                     f"relative {e.get('rel', 0):.3g}"
                     + (f", top-1 agreement {top1:.3f}" if top1 is not None else ""))
    return lines
