"""One budget with everything low-bit at once: a mixed-precision MoE (expert slots of two
sizes), its KV pages and an int8 task model quantized by ONNX Runtime, in one runtime. Every
byte is attributed, the expert bytes stay inside their budget, and the task model keeps
switching and answering as before."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from moe_models import mixtral_config, prompt, runtime, save
from onnx_models import write_task_set

from edgert.experts.api import ExpertLayout
from edgert.pack import PackReader
from edgert.pack.hf_import import pack_hf
from edgert.pack.onnx_import import pack_onnx
from edgert.pack.onnx_quant import OnnxQuant


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cores")
    d = save(mixtral_config(hidden_size=64, intermediate_size=32), root / "ckpt")
    moe = root / "mixed.edgepack"
    pack_hf(d, moe, progress=False, quant="mixed", group_size=32)
    base, tasks = write_task_set(root / "tasks")
    task = root / "tasks.int8.edgepack"
    pack_onnx(base, tasks, task, block_size=4096, quant=OnnxQuant("int8"))
    return moe, task


def test_mixed_experts_kv_and_an_int8_task_model_share_one_budget(packs):
    moe, task = packs
    with PackReader(moe) as r:
        big, small = ExpertLayout.from_reader(r).slot_bytes, \
            ExpertLayout.from_reader(r, "int4").slot_bytes
    budget = 3 * big + 5 * small
    rt = runtime(experts="4 MiB", kv="2 MiB", weights="4 MiB")
    tm = rt.load(str(task), prepack="off")
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    before = {t: tm.run({"x": x}, task=t)["y"] for t in ("det", "lane", "sign")}
    lm = rt.load(str(moe), precision="mixed", expert_budget=budget)
    out = lm.generate(prompt(12), max_new_tokens=8)
    assert len(out) == 8
    st = rt.arena.stats()
    held = st["holders"]
    experts = held[f"{lm.name}: expert slots (exact)"]["bytes"] + \
        held[f"{lm.name}: expert slots (int4)"]["bytes"]
    assert experts <= budget
    assert held[f"{lm.name}: kv pages"]["bytes"] > 0
    assert held[f"{tm.name}: task weights"]["bytes"] > 0
    assert sum(h["bytes"] for h in held.values()) == st["in_use_bytes"] <= st["mapped"]
    ex = lm.stats()["experts"]
    assert ex["computed"]["exact"] + ex["computed"]["int4"] > 0
    for t in ("sign", "det", "lane"):                # switches beside the MoE model
        np.testing.assert_array_equal(tm.run({"x": x}, task=t)["y"], before[t])
    lm.close()
    tm.close()
    assert rt.arena.stats()["in_use_bytes"] == 0
