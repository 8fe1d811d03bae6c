"""Block pruning at pack time (edgert/pack/prune.py): masks, the error bound, determinism,
the packer's view against ONNX Runtime, and one-line mistakes."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx_models import write_task_set
from task_packs import config

import edgert
from edgert.cli import main
from edgert.pack import PackReader
from edgert.pack.onnx_import import pack_onnx
from edgert.pack.importance import Importance, block_scores
from edgert.pack.prune import PruneOptions, pruning_summary, weight_matrices
from edgert.pack.stats import summary

BS = 4096


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The MLP task set (each task changes its own band of w1 and all of w2) and
    calibration inputs per task."""
    root = tmp_path_factory.mktemp("prune")
    base, tasks = write_task_set(root / "models")
    calib = {}
    for i, t in enumerate(tasks):
        calib[t] = str(root / f"{t}.npz")
        np.savez(calib[t], x=np.random.default_rng(i).standard_normal((16, 64)).astype(np.float32))
    return base, tasks, calib, root


@pytest.fixture(scope="module")
def scenes(models):
    """The same task set, each task's calibration inputs drawn with its own band of the 64
    input features 10x stronger than the rest (tasks that see different inputs)."""
    base, tasks, _, root = models
    calib = {}
    for i, t in enumerate(tasks):
        scale = np.full(64, 0.3, np.float32)
        scale[16 * i:16 * i + 16] = 3.0
        x = np.random.default_rng(i).standard_normal((16, 64)).astype(np.float32) * scale
        calib[t] = str(root / f"{t}-scene.npz")
        np.savez(calib[t], x=x)
    return base, tasks, calib, root


def _pack(models, name, fraction=0.5, joint=False, max_error=None, importance="activation",
          scope="tensor"):
    base, tasks, calib, root = models
    out = root / f"{name}.edgepack"
    pack_onnx(base, tasks, out, block_size=BS,
              prune=PruneOptions(fraction, calib, joint=joint, max_error=max_error,
                                 importance=importance, scope=scope))
    return out


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]) \
        .run(None, {"x": x})[0]


def _zero_positions(reader, task) -> dict[str, set[int]]:
    """tensor -> block positions whose bytes are all zero in the pack."""
    out = {}
    for name in reader.task(task):
        raw = reader.read_tensor(task, name).reshape(-1).view(np.uint8)
        out[name] = {i // BS for i in range(0, raw.size, BS) if not raw[i:i + BS].any()}
    return out


def _pruned_model(path, zeros: dict[str, set[int]]) -> onnx.ModelProto:
    """The task's ONNX model with the given blocks zeroed, built here from the file."""
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        arr = numpy_helper.to_array(t).copy()
        flat = arr.reshape(-1)
        per = BS // arr.dtype.itemsize
        for b in zeros.get(t.name, ()):
            flat[b * per:(b + 1) * per] = 0
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return m


def test_pruned_pack_matches_ort_on_the_pruned_graph(models):
    base, tasks, calib, _ = models
    pack = _pack(models, "indep")
    matrices = set(weight_matrices(onnx.load(str(base))))
    rt = edgert.Runtime(config())
    m = rt.load(pack, prepack="off")
    with PackReader(pack) as r:
        doc = pruning_summary(r)
        for task, path in tasks.items():
            zeros = _zero_positions(r, task)
            orig = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
            for name, arr in orig.items():      # only weight-matrix blocks changed, to zero
                got = r.read_tensor(task, name)
                assert name in matrices or np.array_equal(got, arr)
                keep = np.ones(arr.size, bool)
                for b in zeros[name]:
                    keep[b * (BS // 4):(b + 1) * (BS // 4)] = False
                assert np.array_equal(got.reshape(-1)[keep], arr.reshape(-1)[keep])
            rep = doc["tasks"][task]
            pruned = sum(len(zeros[n]) for n in matrices)
            assert pruned == rep["blocks_pruned"] > 0
            x = np.load(calib[task])["x"]
            want = _ort(_pruned_model(path, zeros), x)
            m.switch(task)
            np.testing.assert_allclose(m.run({"x": x})["y"], want, rtol=1e-5, atol=1e-6)
            dense = _ort(onnx.load(str(path)), x)          # the recorded error, recomputed
            rel = np.linalg.norm(want.astype(np.float64) - dense) / np.linalg.norm(dense)
            assert math.isclose(rep["error"]["rel"], rel, rel_tol=1e-4)
            assert math.isclose(rep["error"]["max_abs"], float(np.abs(want - dense).max()),
                                rel_tol=1e-4)
            assert rep["error"]["top1"] == np.mean(want.argmax(1) == dense.argmax(1))
            assert rep["error"]["samples"] == 16
    m.close()


@pytest.mark.parametrize("importance", ["activation", "norm"])
def test_same_inputs_same_pack_bytes(scenes, importance):
    a = _pack(scenes, f"det-a-{importance}", joint=True, max_error=0.5, importance=importance)
    b = _pack(scenes, f"det-b-{importance}", joint=True, max_error=0.5, importance=importance)
    assert a.read_bytes() == b.read_bytes()
    with PackReader(a) as r:
        assert pruning_summary(r)["importance"] == importance


def _scale_model(op: str, w: np.ndarray, trans_b: int = 0) -> onnx.ModelProto:
    """y = x @ w (MatMul) or Gemm(x, w, transB) with ``w`` an initializer."""
    h = onnx.helper
    node = h.make_node(op, ["x", "w"], ["y"], **({"transB": trans_b} if op == "Gemm" else {}))
    k = w.shape[1] if trans_b else w.shape[0]
    n = w.shape[0] if trans_b else w.shape[1]
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, k])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, n])],
                     [numpy_helper.from_array(w, "w")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("op,trans_b", [("MatMul", 0), ("Gemm", 0), ("Gemm", 1)])
def test_activation_scores_scale_each_input_feature(op, trans_b):
    """Per block: RMS of W * s with s the input feature's RMS, in the weight's own layout."""
    rng = np.random.default_rng(7)
    k, n = 96, 64                                              # 6144 floats: 6 blocks of 4 KiB
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    feature = np.exp(2 * rng.standard_normal(k)).astype(np.float32)   # scales 0.02 .. 50
    x = (rng.standard_normal((32, k)) * feature).astype(np.float32)
    s = np.sqrt(np.mean(np.square(x.astype(np.float64)), axis=0))
    scaled = w * (s[None, :] if trans_b else s[:, None])
    want = [np.sqrt(np.mean(np.square(b))) for b in np.split(scaled.reshape(-1), 6)]
    model = _scale_model(op, w, trans_b)
    got = block_scores(Importance.ACTIVATION, model, {"w": w}, {"x": x}, ["w"], BS)["w"]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    norm = block_scores(Importance.NORM, model, {"w": w}, {"x": x}, ["w"], BS)["w"]
    assert list(np.argsort(got)) != list(np.argsort(norm))


def test_activation_importance_prunes_the_features_a_task_does_not_see(scenes):
    """w0 [64, 256] has 4 input features per 4 KiB block: under activation importance a task
    keeps the 4 blocks of its strong band; block norms know nothing of the band."""
    _, tasks, _, _ = scenes
    kept = {}
    for importance in ("activation", "norm"):
        with PackReader(_pack(scenes, f"band-{importance}", importance=importance)) as r:
            kept[importance] = {t: set(range(16)) - _zero_positions(r, t)["w0"] for t in tasks}
    for i, t in enumerate(tasks):
        band = set(range(4 * i, 4 * i + 4))
        assert band <= kept["activation"][t]
        assert not band <= kept["norm"][t]


def test_error_bound_honoured_with_each_importance(scenes):
    for importance in ("activation", "norm"):
        with PackReader(_pack(scenes, f"bound-{importance}", max_error=0.2,
                              importance=importance)) as r:
            doc = pruning_summary(r)
        for t in doc["tasks"].values():
            assert t["error"]["rel"] <= 0.2
            assert t["blocks_pruned"] > 0


def test_error_bound_honoured_and_lowers_the_fraction(models):
    loose = _pack(models, "loose", max_error=10.0)
    with PackReader(loose) as r:
        doc = pruning_summary(r)
    assert doc["max_error"] == 10.0
    assert all(t["fraction"] == 0.5 and t["error"]["rel"] <= 10.0 for t in doc["tasks"].values())
    at_half = min(t["error"]["rel"] for t in doc["tasks"].values())
    bound = at_half / 3
    with PackReader(_pack(models, "tight", max_error=bound)) as r:
        tight = pruning_summary(r)
    for t in tight["tasks"].values():
        assert t["error"]["rel"] <= bound
        assert t["fraction"] < 0.5
        assert t["blocks_pruned"] < doc["tasks"]["det"]["blocks_pruned"]


def test_joint_masks_share_more_blocks_than_independent(models):
    shared = {}
    for joint in (False, True):
        pack = _pack(models, f"share-{joint}", joint=joint)
        with PackReader(pack) as r:
            names = r.tasks
            zeros = {t: _zero_positions(r, t) for t in names}
            hashes = {t: [r.blocks[b].hash for s in r.task(t).values() for b in s.blocks]
                      for t in names}
        same = 0
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                same += sum(x == y for x, y in zip(hashes[a], hashes[b]))
        shared[joint] = same
        if joint:   # one mask for all tasks
            assert all(zeros[t] == zeros[names[0]] for t in names)
        else:
            assert any(zeros[t] != zeros[names[0]] for t in names)
    assert shared[True] > shared[False]


def _shared_and_read(pack) -> tuple[int, float]:
    """(block positions equal in a pair of tasks, summed over pairs; mean bytes read per
    switch)."""
    with PackReader(pack) as r:
        hashes = {t: [r.blocks[b].hash for s in r.task(t).values() for b in s.blocks]
                  for t in r.tasks}
        reads = summary(r)["switch_bytes"].values()
    names = list(hashes)
    same = sum(x == y for i, a in enumerate(names) for b in names[i + 1:]
               for x, y in zip(hashes[a], hashes[b]))
    return same, sum(reads) / len(reads)


def test_joint_activation_masks_align_what_task_inputs_split(scenes):
    """Tasks that see different input features rank the shared w0 differently, so their
    independent masks diverge there; joint masks share those blocks and switches read less."""
    indep = _pack(scenes, "scene-indep")
    joint = _pack(scenes, "scene-joint", joint=True)
    with PackReader(indep) as r:
        w0 = [_zero_positions(r, t)["w0"] for t in r.tasks]
    assert w0[0] != w0[1] != w0[2]
    (same_i, read_i), (same_j, read_j) = _shared_and_read(indep), _shared_and_read(joint)
    assert same_j > same_i
    assert read_j < read_i


def test_model_scope_spends_one_budget_over_the_tensors(scenes):
    """Model scope: floor(F * N) blocks over all the task's weight matrices, fractions per
    tensor unequal, each matrix keeping a block; deterministic."""
    base = onnx.load(str(scenes[0]))
    sizes = {t.name: -(-int(np.prod(t.dims)) * 4 // BS) for t in base.graph.initializer
             if t.name in weight_matrices(base)}
    pack = _pack(scenes, "model-scope", scope="model")
    with PackReader(pack) as r:
        doc = pruning_summary(r)
        for task in r.tasks:
            zeros = _zero_positions(r, task)
            pruned = {n: len(zeros[n]) for n in sizes}
            assert sum(pruned.values()) == doc["tasks"][task]["blocks_pruned"] \
                == math.floor(0.5 * sum(sizes.values()))
            assert len({pruned[n] / sizes[n] for n in sizes}) > 1, pruned
            assert all(pruned[n] < sizes[n] for n in sizes)
    assert doc["scope"] == "model"
    again = _pack(scenes, "model-scope-again", scope="model")
    assert pack.read_bytes() == again.read_bytes()


def test_joint_model_scope_prunes_more_where_tasks_differ(scenes):
    """Joint masks over the model prune fewer blocks of the shared w0 and more of w1 and w2
    (which the fine-tunes changed) than joint masks per tensor."""
    def differing_pruned(pack):
        with PackReader(pack) as r:
            tasks = r.tasks
            z = {t: _zero_positions(r, t) for t in tasks}
        return {n: len(z[tasks[0]][n]) for n in z[tasks[0]]}
    tensor = differing_pruned(_pack(scenes, "joint-tensor", joint=True))
    model = differing_pruned(_pack(scenes, "joint-model", joint=True, scope="model"))
    assert model["w0"] < tensor["w0"]
    assert model["w1"] + model["w2"] > tensor["w1"] + tensor["w2"]


def _one_line(capsys, argv, needle):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc in (1, 2), (rc, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert needle in err.splitlines()[-1], err


def test_mistakes_are_one_line(models, capsys, tmp_path):
    base, tasks, calib, _ = models
    cmd = ["pack", "onnx", "--base", base, "-o", tmp_path / "p.edgepack", "--block-size", BS,
           *[a for t, p in tasks.items() for a in ("--task", f"{t}={p}")]]
    cal = [a for t, p in calib.items() for a in ("--calib", f"{t}={p}")]
    for bad in ("0", "1", "1.5", "-0.2", "nan"):
        _one_line(capsys, cmd + ["--prune-blocks", bad, *cal], "--prune-blocks")
    _one_line(capsys, cmd + ["--joint"], "--joint is used only with --prune-blocks")
    _one_line(capsys, cmd + cal, "--calib is used only with --prune-blocks")
    _one_line(capsys, cmd + ["--prune-blocks", "0.5", *cal[:-2]], "--calib sign=FILE.npz")
    _one_line(capsys, cmd + ["--prune-blocks", "0.5", *cal, "--calib", "nope=x.npz"],
              "no task 'nope'")
    _one_line(capsys, cmd + ["--prune-blocks", "0.5", *cal, "--max-error", "0"], "--max-error")
    _one_line(capsys, cmd + ["--importance", "norm"], "--importance is used only with")
    _one_line(capsys, cmd + ["--prune-scope", "model"], "--prune-scope is used only with")
    _one_line(capsys, cmd + ["--prune-blocks", "0.5", *cal, "--prune-scope", "layer"],
              "invalid choice: 'layer'")
    _one_line(capsys, cmd + ["--prune-blocks", "0.5", *cal, "--importance", "wanda"],
              "invalid choice: 'wanda'")
    x = np.zeros((4, 64), np.float32)
    for arrays, needle in (({"z": x}, "not inputs of the model"),
                           ({}, "lacks the input 'x'"),
                           ({"x": np.zeros((4, 63), np.float32)}, "has shape [4, 63]"),
                           ({"x": x.astype(np.float64)}, "is float64")):
        bad = tmp_path / "bad.npz"
        np.savez(bad, **arrays)
        _one_line(capsys, cmd + ["--prune-blocks", "0.5", *cal[:-2], "--calib", f"sign={bad}"],
                  needle)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _one_line(capsys, cmd + ["--prune-blocks", "0.5", *cal[:-2], "--calib",
                             f"sign={tmp_path / 'junk.npz'}"], "not an .npz")
    assert not (tmp_path / "p.edgepack").exists()


def test_pack_and_inspect_say_it_is_lossy(models, capsys, tmp_path):
    import json
    base, tasks, calib, _ = models
    out = tmp_path / "cli.edgepack"
    assert main(["pack", "onnx", "--base", str(base), "-o", str(out), "--block-size", str(BS),
                 *[a for t, p in tasks.items() for a in ("--task", f"{t}={p}")],
                 *[a for t, p in calib.items() for a in ("--calib", f"{t}={p}")],
                 "--prune-blocks", "0.25", "--joint", "--max-error", "5",
                 "--prune-scope", "model"]) == 0
    printed = capsys.readouterr().out
    assert ("pruned (lossy): joint block masks at 0.25 by activation importance, relative "
            "error bound 5; fraction over all the task's weight-matrix blocks") in printed
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "pruned (lossy)" in shown and "top-1 agreement" in shown
    assert main(["inspect", "--json", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)["pruning"]
    assert doc["joint"] is True and doc["scope"] == "model" and set(doc["tasks"]) == set(tasks)
    assert main(["inspect", "--json", str(_pack(models, "plain", fraction=0.1))]) == 0
    assert json.loads(capsys.readouterr().out)["pruning"]["fraction"] == 0.1
