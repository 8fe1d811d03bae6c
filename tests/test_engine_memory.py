"""ONNX Runtime's working memory is part of the budget: charged to the engine allowance
while a run lasts, a batch too large for it is run in pieces (outputs equal ORT on the
original file), an item that cannot fit is refused before any work, and what a large
batch took is handed back to the OS afterwards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
from task_packs import assert_matches, config, tiny  # noqa: F401  (tiny is a fixture)

import edgert
from edgert.errors import BudgetExceeded

TESTS = os.path.dirname(os.path.abspath(__file__))


def spy_runs(m, rt) -> list[dict]:
    """Record, for every ORT run of ``m``'s bound session, the engine charges meanwhile."""
    seen, sess = [], m.engine.session
    inner = sess.run_with_iobinding

    def run(binding, *a, **kw):
        seen.append(rt.arena.stats()["engine"])
        return inner(binding, *a, **kw)
    sess.run_with_iobinding = run
    return seen


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


def test_run_charges_working_memory_and_gives_it_back(tiny):
    rt = edgert.Runtime(config(extra="8 MiB"))
    m = rt.load(tiny.pack, prepack="off")
    seen = spy_runs(m, rt)
    m.run({"image": images(4)})
    (during,) = seen
    mine = during["charges"].get(f"{m.name}: activations", 0)
    assert 0 < mine == during["in_use"] <= during["allowance"]
    assert rt.arena.stats()["engine"]["in_use"] == 0
    assert m.memory()["engine_bytes"] == 0
    assert mine >= 4 * m.stats()["engine"]["activation_bytes_per_item"] > 0


def test_split_batch_equals_ort_on_the_original_file(tiny):
    rt = edgert.Runtime(config(extra="1 MiB"))
    m = rt.load(tiny.pack, prepack="off")
    x = images(200)                        # about 15 MiB of working memory in one run
    seen = spy_runs(m, rt)
    for t in tiny.names[:2]:
        ref = ort.InferenceSession(tiny.files[t], providers=["CPUExecutionProvider"]) \
            .run(None, {"image": x})[0]
        out = m.run({"image": x}, task=t)["logits"]
        assert out.shape == ref.shape
        assert_matches(out, ref)
    assert len(seen) >= 2 * 4, "the batch was not cut into pieces"
    assert all(0 < s["in_use"] <= s["allowance"] for s in seen)
    assert m.stats()["engine"]["split_runs"] == 2


def test_an_item_that_cannot_fit_is_refused_before_any_work(tiny):
    rt = edgert.Runtime(config(extra="16 KiB"))
    m = rt.load(tiny.pack, prepack="off")
    seen = spy_runs(m, rt)
    with pytest.raises(BudgetExceeded) as e:
        m.run({"image": images(1)})
    assert seen == [] and m.stats()["runs"] == 0
    assert e.value.needed > e.value.available == 16 * 1024
    assert f"{e.value.needed} bytes" in str(e.value) and "activations" in str(e.value)
    assert rt.arena.stats()["engine"]["in_use"] == 0


PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import edgert
    from task_packs import config

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    rt = edgert.Runtime(config(extra="8 MiB"))
    m = rt.load(sys.argv[1], prepack="off")
    x = np.random.default_rng(0).standard_normal((4096, 3, 32, 32), dtype=np.float32)
    m.run({"image": x[:1]})
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    out = m.run({"image": x})["logits"]
    print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS"),
                      "out": out.nbytes, "split": m.stats()["engine"].get("split_runs")}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_rss_returns_after_a_large_batch(tiny):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.path.dirname(TESTS)])}
    got = subprocess.run([sys.executable, "-c", PROBE, str(tiny.pack)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    r = json.loads(got.stdout.strip().splitlines()[-1])
    # run within the budget (the 8 MiB allowance, plus the outputs handed back), and
    # resident memory back within 10% of where it was
    assert r["peak"] - r["before"] <= 8 * 2**20 + r["out"] + 2 * 2**20, r
    assert r["after"] <= 1.10 * r["before"], r
    assert r["split"] == 1
