"""Block importance for pruning at pack time: which pack blocks of a weight matrix matter.

- ``norm``: the block's RMS, ``sqrt(mean(W^2))`` over its elements. Depends on the weights
  only, so fine-tunes that share a block's bytes score it the same.
- ``activation`` (Wanda-style): the RMS of ``W * s`` over the block's elements, where
  ``s[k]`` is the RMS over the task's calibration inputs of input feature ``k``, the
  activation that row ``k`` of the weight multiplies. A block that multiplies features the
  task never excites scores low even when its weights are large, so two tasks sharing a
  block's bytes may rank it differently: that is what joint masks align.

Activation scores cover the weight input (B) of MatMul and Gemm: MatMul B is
``[..., K, N]`` (features on axis -2; the input's features on its last axis), Gemm B is
``[K, N]`` or ``[N, K]`` with ``transB`` (and A ``[M, K]`` or ``[K, M]`` with ``transA``).
Conv weights, and a weight whose input is itself an initializer, are scored by ``norm``.
A weight used by several nodes gets the mean of its uses' squared scales.
"""
from __future__ import annotations

import math
from enum import Enum

import numpy as np
import onnx

from .reference import run_model


class Importance(str, Enum):
    NORM = "norm"
    ACTIVATION = "activation"


DEFAULT = Importance.ACTIVATION   # the calibration inputs are there anyway (docs/pack-format.md)


def _block_rms(sq: np.ndarray, per: int) -> np.ndarray:
    """RMS over each run of ``per`` elements of the flattened squares ``sq`` (float64)."""
    flat = sq.reshape(-1)
    n = -(-flat.size // per)
    return np.array([math.sqrt(float(np.mean(flat[i * per:(i + 1) * per]))) for i in range(n)])


def norm_scores(arr: np.ndarray, block_size: int) -> np.ndarray:
    return _block_rms(np.square(arr, dtype=np.float64), block_size // arr.dtype.itemsize)


def _uses(model: onnx.ModelProto, names: list[str]) -> dict[str, list[onnx.NodeProto]]:
    """weight -> the MatMul/Gemm nodes that take it as B and whose A is not an initializer."""
    init = {t.name for t in model.graph.initializer}
    out: dict[str, list[onnx.NodeProto]] = {n: [] for n in names}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 \
                and node.input[1] in out and node.input[0] not in init:
            out[node.input[1]].append(node)
    return out


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def _element_scale_sq(node: onnx.NodeProto, act: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """``s^2`` broadcastable to ``w`` for one use, None when the shapes do not line up."""
    a = act.astype(np.float64)
    if node.op_type == "Gemm":
        feat = a.T if _attr(node, "transA") else a                 # [M, K]
        s2 = np.mean(np.square(feat), axis=0)                      # [K]
        trans_b = _attr(node, "transB")
        k = w.shape[1] if trans_b else w.shape[0]
        if w.ndim != 2 or s2.size != k:
            return None
        return s2[None, :] if trans_b else s2[:, None]
    if a.ndim < 1 or a.shape[-1] != w.shape[-2]:
        return None
    return np.mean(np.square(a.reshape(-1, a.shape[-1])), axis=0)[:, None]   # MatMul: [K, 1]


def activation_scores(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                      feeds: dict[str, np.ndarray], names: list[str], block_size: int
                      ) -> dict[str, np.ndarray]:
    """weight -> activation-aware block scores (norm scores where not applicable), from one
    run of the dense task (``weights`` as its initializers) on its calibration inputs.

    NOTE: every exposed activation of the whole calibration batch is held at once; a
    calibration set is a few samples, so this is a few times the model's working set."""
    uses = _uses(model, names)
    wanted = sorted({n.input[0] for ns in uses.values() for n in ns})
    graph_outputs = [o.name for o in model.graph.output]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    dtype = {t.name: t.data_type for t in model.graph.initializer}
    by_act = {n.input[0]: dtype[n.input[1]] for ns in uses.values() for n in ns}
    for a in wanted:          # expose each weight's input activation as a graph output
        if a not in feeds and a not in graph_outputs:
            m.graph.output.append(onnx.helper.make_tensor_value_info(a, by_act[a], None))
    ys = run_model(m, feeds, weights)
    acts = {**dict(zip([o.name for o in m.graph.output], ys)), **feeds}
    out = {}
    for name in names:
        w = weights[name]
        scales = [_element_scale_sq(n, acts[n.input[0]], w) for n in uses[name]]
        if not scales or any(s is None for s in scales):
            out[name] = norm_scores(w, block_size)
            continue
        s2 = sum(scales) / len(scales)
        out[name] = _block_rms(np.square(w, dtype=np.float64) * s2, block_size // w.dtype.itemsize)
    return out


def block_scores(kind: Importance, model: onnx.ModelProto, weights: dict[str, np.ndarray],
                 feeds: dict[str, np.ndarray], names: list[str], block_size: int
                 ) -> dict[str, np.ndarray]:
    """weight -> one score per pack block (higher: keep longer) under ``kind``."""
    if kind is Importance.ACTIVATION:
        return activation_scores(model, weights, feeds, names, block_size)
    return {n: norm_scores(weights[n], block_size) for n in names}
