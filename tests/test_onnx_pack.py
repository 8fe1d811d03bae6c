import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgert import IncompatibleModels
from edgert.pack import PackReader
from edgert.pack.onnx_import import SKELETON, pack_onnx
from edgert.pack.stats import summary
from onnx_models import base_weights, mlp, variant, write_task_set

BS = 8192


@pytest.fixture
def task_set(tmp_path):
    base, tasks = write_task_set(tmp_path / "models")
    out = tmp_path / "tasks.edgepack"
    pack_onnx(base, tasks, out, block_size=BS)
    return base, tasks, out


def _inits(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_tensors_equal_initializers_and_skeleton_is_bare(task_set):
    base, tasks, out = task_set
    with PackReader(out) as r:
        assert r.tasks == list(tasks)
        for name, path in tasks.items():
            for tname, arr in _inits(path).items():
                assert np.array_equal(r.read_tensor(name, tname), arr)
        sk = onnx.load_from_string(r.sections[SKELETON])
        assert len(sk.graph.initializer) == 0 and len(sk.graph.node) > 0
        assert r.config["inputs"] == ["x"] and r.config["outputs"] == ["y"]


def test_switch_bytes_count_changed_blocks(task_set):
    """Independent count from the arrays: changed block positions times their sizes."""
    _, tasks, out = task_set
    w = {n: _inits(p) for n, p in tasks.items()}
    with PackReader(out) as r:
        s = summary(r)
    for a in tasks:
        for b in tasks:
            if a == b:
                continue
            expect, zero = 0, 0
            for tname, arr in w[b].items():
                ra = w[a][tname].reshape(-1).view(np.uint8)
                rb = arr.reshape(-1).view(np.uint8)
                for i in range(0, len(rb), BS):
                    if not np.array_equal(ra[i:i + BS], rb[i:i + BS]):
                        if rb[i:i + BS].any():
                            expect += len(rb[i:i + BS])
                        else:                       # a zero block: memset, not read
                            zero += len(rb[i:i + BS])
            assert s["switch_bytes"][f"{a}->{b}"] == expect > 0
            assert s["switch_zero_bytes"][f"{a}->{b}"] == zero
    assert s["bytes_stored"] < s["bytes_dense"]


def test_incompatible_graphs_name_what_differs(tmp_path):
    base = base_weights()
    bp = tmp_path / "base.onnx"
    onnx.save(mlp(base), str(bp))
    other = mlp(base)
    other.graph.node[1].op_type = "Sub"
    op = tmp_path / "other.onnx"
    onnx.save(other, str(op))
    with pytest.raises(IncompatibleModels, match="node 1 .*add0"):
        pack_onnx(bp, {"x": op}, tmp_path / "o.edgepack")
    bad = dict(base)
    bad["b0"] = np.zeros(7, np.float32)
    onnx.save(mlp(bad), str(op))
    with pytest.raises(IncompatibleModels, match="initializer b0"):
        pack_onnx(bp, {"x": op}, tmp_path / "o.edgepack")
    assert not (tmp_path / "o.edgepack").exists()


def test_alignment_snaps_small_deltas_and_reports_error(tmp_path):
    base = base_weights()
    bp, tp = tmp_path / "base.onnx", tmp_path / "t.onnx"
    onnx.save(mlp(base), str(bp))
    tuned = variant(base, seed=5, scale=1e-4)               # tiny deltas everywhere they touch
    tuned["w2"][:, :8] += 0.5                               # and one real change
    onnx.save(mlp(tuned), str(tp))
    lossless = pack_onnx(bp, {"t": tp}, tmp_path / "l.edgepack", block_size=BS)
    aligned = pack_onnx(bp, {"t": tp}, tmp_path / "a.edgepack", block_size=BS, align_tol=1e-3)
    assert lossless.tasks[0].snapped == 0 and lossless.tasks[0].max_output_error == 0
    rep = aligned.tasks[0]
    assert rep.snapped > 0 and 0 < rep.max_output_error < 0.05
    with PackReader(tmp_path / "a.edgepack") as r:
        got = r.read_tensor("t", "w1")
        assert np.array_equal(got, base["w1"])              # snapped to the base exactly
        assert not np.array_equal(r.read_tensor("t", "w2"), base["w2"])  # big change kept
        assert r.config["alignment"]["t"]["snapped_blocks"] == rep.snapped
    with PackReader(tmp_path / "l.edgepack") as r:
        assert np.array_equal(r.read_tensor("t", "w1"), tuned["w1"])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgert", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_pack_verify_inspect(tmp_path):
    base, tasks = write_task_set(tmp_path / "m")
    out = tmp_path / "c.edgepack"
    res = _cli("pack", "onnx", "--base", base, *sum((["--task", f"{n}={p}"] for n, p in tasks.items()), []),
               "-o", out, "--block-size", BS)
    assert res.returncode == 0, res.stderr
    assert _cli("verify", out).returncode == 0
    res = _cli("inspect", out, "--json")
    doc = json.loads(res.stdout)
    assert {"tasks", "blocks", "bytes_stored", "bytes_dense", "switch_bytes", "switch_zero_bytes",
            "zero_blocks"} <= set(doc)
    assert set(doc["switch_bytes"]) == {f"{a}->{b}" for a in tasks for b in tasks if a != b}
    text = _cli("inspect", out).stdout
    assert "bytes a switch reads from storage" in text
    # damage one block of a known tensor: verify fails and names it
    with PackReader(out) as r:
        idx = r.task("lane")["w2"].blocks[-1]
        ent = r.blocks[idx]
    with open(out, "r+b") as f:
        f.seek(ent.offset + 100)
        f.write(b"\x00\x01\x02")
    res = _cli("verify", out)
    assert res.returncode == 1
    assert f"block {idx}" in res.stderr and f"offset {ent.offset}" in res.stderr and "w2" in res.stderr
    # bad inputs: clear messages, non-zero exits, no tracebacks
    res = _cli("inspect", tmp_path / "missing.edgepack")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    res = _cli("pack", "onnx", "--base", base, "--task", "nameonly", "-o", out)
    assert res.returncode != 0 and "NAME=FILE" in res.stderr


def test_blocks_are_grouped_by_the_tasks_that_use_them(task_set):
    """A switch A -> B reads the blocks B uses and A lacks: with 3 tasks those are two
    user-set groups ({B} and {B, C}), so at most two back-to-back runs in the file."""
    _, tasks, out = task_set
    with PackReader(out) as r:
        for a in tasks:
            for b in tasks:
                if a == b:
                    continue
                have = {r.blocks[i].hash for s in r.task(a).values() for i in s.blocks}
                need = sorted({i for s in r.task(b).values() for i in s.blocks
                               if r.blocks[i].hash not in have}, key=lambda i: r.blocks[i].offset)
                runs = 1 + sum(1 for x, y in zip(need, need[1:])
                               if r.blocks[y].offset != r.blocks[x].offset
                               + -(-r.blocks[x].length // 4096) * 4096)
                assert need and runs <= 2, (a, b, runs)
