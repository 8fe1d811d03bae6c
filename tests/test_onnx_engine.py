"""OnnxEngine: bound weights equal ORT on the original file; inputs are checked."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from task_packs import assert_matches, tiny  # noqa: F401  (tiny is a fixture)

from edgert.engines.onnx_engine import OnnxEngine, choose_providers
from edgert.errors import InputMismatch
from edgert.pack.onnx_import import skeleton_of


def engine_for(path, **kw):
    model = onnx.load(path)
    weights = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    return OnnxEngine(skeleton_of(model).SerializeToString(), weights, **kw), weights


def test_bound_and_prepacked_equal_reference(tiny):
    for task, path in tiny.files.items():
        eng, _ = engine_for(path, threads=1)
        assert_matches(eng.run({"image": tiny.x})["logits"], tiny.ref[task])
        assert_matches(eng.build_prepacked().run({"image": tiny.x})["logits"], tiny.ref[task])


def test_weights_are_bound_in_place(tiny):
    a, b = tiny.names[:2]
    eng, weights = engine_for(tiny.files[a], threads=1)
    fast_a = eng.build_prepacked()
    other = {t.name: numpy_helper.to_array(t) for t in onnx.load(tiny.files[b]).graph.initializer}
    for name, arr in weights.items():
        arr[...] = other[name]                 # what a switch does to the arena
    assert_matches(eng.run({"image": tiny.x})["logits"], tiny.ref[b])
    # the pre-packed session holds its own copy: still task a
    assert_matches(fast_a.run({"image": tiny.x})["logits"], tiny.ref[a])


@pytest.mark.parametrize("feeds, words", [
    ({"img": 0}, ["unknown input 'img'", "image"]),
    ({}, ["missing input 'image'"]),
    ({"image": np.zeros((1, 3, 32, 32), np.float64)}, ["'image'", "float64", "float32"]),
    ({"image": np.zeros((1, 3, 16, 32), np.float32)}, ["'image'", "(1, 3, 16, 32)", "32"]),
    ({"image": np.zeros((3, 32, 32), np.float32)}, ["'image'", "(3, 32, 32)"]),
])
def test_input_mismatch_names_the_input(tiny, feeds, words):
    eng, _ = engine_for(tiny.files[tiny.names[0]], threads=1)
    with pytest.raises(InputMismatch) as e:
        eng.run(feeds)
    for w in words:
        assert w in str(e.value)
    eng.run({"image": tiny.x})                 # still runnable


def test_providers_in_config_order_with_cpu_last():
    assert choose_providers(["cpu"]) == ["CPUExecutionProvider"]
    got = choose_providers(["tensorrt", "cuda", "cpu"])
    assert got[-1] == "CPUExecutionProvider"
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert got == [p for p in order if p in got]


def test_missing_gpu_falls_back_with_a_logged_reason(tiny, caplog):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to fall back from")
    caplog.set_level(logging.WARNING)
    eng, _ = engine_for(tiny.files[tiny.names[0]], providers=["cuda", "cpu"], threads=1)
    assert_matches(eng.run({"image": tiny.x})["logits"], tiny.ref[tiny.names[0]])
    if eng.active_providers == ["CPUExecutionProvider"]:
        assert "CUDAExecutionProvider" in caplog.text
