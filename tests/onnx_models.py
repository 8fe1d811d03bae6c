"""Small task models for tests: one MLP backbone and sparse fine-tuned variants."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DIMS = (64, 256, 256, 16)  # input, hidden, hidden, head


def mlp(weights: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    nodes, prev = [], "x"
    n_layers = len(DIMS) - 1
    for i in range(n_layers):
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"matmul{i}"))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"))
        if i < n_layers - 1:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}"))
            prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [f"a{n_layers - 1}"], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", DIMS[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", DIMS[-1]])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    # IR 10: what current ONNX Runtime releases read (onnx 1.23 would write 14)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def base_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {}
    for i in range(len(DIMS) - 1):
        w[f"w{i}"] = (rng.standard_normal((DIMS[i], DIMS[i + 1])) / np.sqrt(DIMS[i])).astype(np.float32)
        w[f"b{i}"] = (0.01 * rng.standard_normal(DIMS[i + 1])).astype(np.float32)
    return w


def variant(base: dict[str, np.ndarray], seed: int, rows: slice = slice(0, 32),
            scale: float = 0.05) -> dict[str, np.ndarray]:
    """A fine-tune: the head changes entirely, a band of rows of the last hidden layer moves."""
    rng = np.random.default_rng(seed)
    w = {k: v.copy() for k, v in base.items()}
    last = len(DIMS) - 2
    w[f"w{last}"] = w[f"w{last}"] + scale * rng.standard_normal(w[f"w{last}"].shape).astype(np.float32)
    w[f"b{last}"] = w[f"b{last}"] + scale * rng.standard_normal(w[f"b{last}"].shape).astype(np.float32)
    mid = f"w{last - 1}"
    w[mid][rows] += scale * rng.standard_normal(w[mid][rows].shape).astype(np.float32)
    return w


def write_task_set(root: Path, names=("det", "lane", "sign")) -> tuple[Path, dict[str, Path]]:
    """base.onnx plus one variant per name; returns (base path, {name: path})."""
    root.mkdir(parents=True, exist_ok=True)
    base = base_weights()
    base_path = root / "base.onnx"
    onnx.save(mlp(base), str(base_path))
    tasks = {}
    for i, name in enumerate(names):
        p = root / f"{name}.onnx"
        onnx.save(mlp(variant(base, seed=100 + i, rows=slice(32 * i, 32 * i + 32))), str(p))
        tasks[name] = p
    return base_path, tasks
