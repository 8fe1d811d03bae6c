"""ONNX task models quantized by ONNX Runtime: `pack onnx --quant int8|qdq|int4` and
pre-quantized files given as they are. They pack and switch like float ones, outputs equal
ONNX Runtime on the quantized files, and tensors equal across tasks stay shared blocks."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx_models import write_task_set
from task_packs import assert_matches, config
from test_cli_mistakes import one_line

from edgert import Runtime
from edgert.cli import main
from edgert.pack import PackReader
from edgert.pack.onnx_import import pack_onnx
from edgert.pack.onnx_quant import OnnxQuant, quantize_file, quantize_files, source_of
from edgert.pack.quant import QuantOptionError

BS = 4096
MODES = ("int8", "qdq", "int4")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-models")
    base, tasks = write_task_set(root / "float")
    calib = {}
    for i, t in enumerate(tasks):
        calib[t] = root / f"{t}.npz"
        x = np.random.default_rng(10 + i).standard_normal((16, 64)).astype(np.float32)
        np.savez(calib[t], x=x)
    return root, base, tasks, calib


def _quant(mode, calib):
    return OnnxQuant(mode, calib={t: str(p) for t, p in calib.items()} if mode == "qdq" else {})


def _inits(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _ref(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("mode", MODES)
def test_quantized_pack_switches_like_ort_on_the_quantized_files(models, tmp_path, mode):
    _, base, tasks, calib = models
    quant = _quant(mode, calib)
    pack = tmp_path / "q.edgepack"
    pack_onnx(base, tasks, pack, block_size=BS, quant=quant)
    # the same quantizer, run again on its own: what the pack must hold and compute
    qdir = tmp_path / "files"
    qdir.mkdir()
    _, files, _ = quantize_files(base, tasks, quant, qdir)
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    with PackReader(pack) as r:
        for t, f in files.items():
            inits = _inits(f)
            assert set(r.task(t)) == set(inits)
            for name, arr in inits.items():
                assert np.array_equal(r.read_tensor(t, name), arr), (t, name)
        assert r.config["quant"]["mode"] == mode and not r.config["quant"]["mismatched"]
    with Runtime(config()) as rt:
        m = rt.load(str(pack), prepack="off")
        for t in ["det", "lane", "sign", "det", "sign"]:
            res = m.switch(t)
            assert_matches(m.run({"x": x})["y"], _ref(files[t], x))
        assert res.bytes_moved > 0


@pytest.mark.parametrize("mode", MODES)
def test_tensors_equal_across_tasks_stay_shared_blocks(models, tmp_path, mode):
    """Quantization parameters come from each weight tensor alone: a tensor equal in two
    tasks is equal, scales and zero points included, after quantization (qdq's activation
    scales are each task's own, and are the only quantized tensors without a float source)."""
    _, base, tasks, calib = models
    qdir = tmp_path / "files"
    qdir.mkdir()
    qbase, files, record = quantize_files(base, tasks, _quant(mode, calib), qdir)
    assert record["mismatched"] == []
    fb, qb = _inits(base), _inits(qbase)
    for t, path in tasks.items():
        ft, qt = _inits(path), _inits(files[t])
        equal = {n for n in ft if np.array_equal(ft[n], fb[n])}
        assert equal and len(equal) < len(ft)            # the fixture shares some, not all
        for q, arr in qt.items():
            src = source_of(q, ft)
            if src is None:
                assert mode == "qdq", q                  # an activation's scale or zero point
            elif src in equal:
                assert np.array_equal(arr, qb[q]), (t, q)
        rec = record["tasks"][t]
        assert rec["float_equal_to_base"] == len(equal)
        assert 0 < rec["error"]["rel_l2"] < (0.3 if mode == "int4" else 0.06)
    # the pack stores each shared tensor once: a switch reads only what the tasks differ in
    pack = tmp_path / "q.edgepack"
    pack_onnx(base, tasks, pack, block_size=BS, quant=_quant(mode, calib))
    with PackReader(pack) as r:
        for name in r.task("det"):
            if source_of(name, fb) in {n for n in fb if np.array_equal(
                    _inits(tasks["det"])[n], fb[n])}:
                assert r.task("det")[name].blocks == r.task("lane")[name].blocks, name


@pytest.mark.parametrize("mode", MODES)
def test_prequantized_files_pack_and_switch(models, tmp_path, mode):
    """Files the user quantized with ONNX Runtime, given to `pack onnx` as they are."""
    _, base, tasks, calib = models
    files = {}
    for t, path in {"base": base, **tasks}.items():
        files[t] = tmp_path / f"{t}.onnx"
        feeds = dict(np.load(calib.get(t, calib["det"])))
        quantize_file(path, files[t], OnnxQuant(mode), feeds)
    pack = tmp_path / "pre.edgepack"
    pack_onnx(files["base"], {t: files[t] for t in tasks}, pack, block_size=BS)
    x = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    with PackReader(pack) as r:
        assert "quant" not in r.config
        assert any(s.dtype in ("int8", "uint8") for s in r.task("det").values())
    with Runtime(config()) as rt:
        m = rt.load(str(pack))
        for t in ["sign", "det", "lane", "sign"]:
            assert_matches(m.run({"x": x}, task=t)["y"], _ref(files[t], x))


def test_cli_pack_inspect_and_wrong_options(models, tmp_path, capsys):
    _, base, tasks, calib = models
    task_args = [a for t, p in tasks.items() for a in ("--task", f"{t}={p}")]
    out = tmp_path / "q.edgepack"
    argv = ["pack", "onnx", "--base", base, *task_args, "-o", out]
    assert main([str(a) for a in argv + ["--quant", "int4", "--group-size", "64"]]) == 0
    assert "quantized by onnxruntime" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "int4, group 64" in shown and "tensors equal to the base" in shown
    bad = tmp_path / "bad.edgepack"
    argv = ["pack", "onnx", "--base", base, *task_args, "-o", bad]
    for extra, needle in ((["--quant", "int3"], "--quant 'int3'"),
                          (["--quant", "int4", "--group-size", "0"], "--group-size 0"),
                          (["--quant", "int4", "--group-size", "48"], "--group-size 48"),
                          (["--quant", "int8", "--group-size", "32"], "--group-size 32"),
                          (["--group-size", "32"], "--group-size needs --quant int4"),
                          (["--quant", "qdq"], "--calib det=FILE.npz"),
                          (["--quant", "int8", "--calib", f"det={calib['det']}"], "--calib"),
                          (["--quant", "int8", "--align-tol", "0.1"], "--align-tol")):
        one_line(capsys, argv + extra, needle)
        assert not bad.exists()


def test_quant_options_refused_before_any_work(models, tmp_path):
    _, base, tasks, calib = models
    with pytest.raises(QuantOptionError, match="no task 'nope'"):
        pack_onnx(base, tasks, tmp_path / "x.edgepack",
                  quant=OnnxQuant("qdq", calib={"nope": str(calib["det"]),
                                                **{t: str(p) for t, p in calib.items()}}))
    assert not list(tmp_path.iterdir())
