"""The reference run of an ONNX model at pack time: ONNX Runtime on one thread, with its
initializers replaced by other weights (a pruned candidate), so the figures pruning reports
and the block scores it ranks by are deterministic. Shared by pruning (prune.py) and the
activation-aware importance (importance.py), which both run a task on its calibration inputs,
and by the importer and ONNX Runtime's quantizer (onnx_import.py, onnx_quant.py): reading a
model file, and random inputs for a model's error figures.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import IncompatibleModels, InputMismatch


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
              weights: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """ONNX Runtime on ``model`` (its initializers replaced by ``weights``), one thread."""
    import onnxruntime as ort
    if weights is not None:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        del m.graph.initializer[:]
        m.graph.initializer.extend(numpy_helper.from_array(weights[t.name], t.name)
                                   for t in model.graph.initializer)
        model = m
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1   # deterministic figures
    try:
        s = ort.InferenceSession(model.SerializeToString(), opts,
                                 providers=["CPUExecutionProvider"])
        return [np.asarray(y) for y in s.run(None, feeds)]
    except Exception as e:   # ORT's own exception types; the calibration inputs are to blame
        raise InputMismatch(f"the calibration inputs do not run on the model: "
                            f"{str(e).splitlines()[0][:300]}") from None


def load_model(path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise IncompatibleModels(f"cannot read ONNX model {path}: {e}") from None


def random_inputs(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    init = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.dtype(dtype).kind == "f":
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds
