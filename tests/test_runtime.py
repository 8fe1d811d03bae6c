"""The Runtime owns memory and models: co-residence in one budget (either load order),
reclaim of cache, lifecycles (del, close twice, with, failed loads, many cycles),
thread safety, and pack faults while loaded."""
from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import edgert
from edgert.config import DeviceConfig
from edgert.errors import BudgetExceeded, ModelClosed, PackCorrupt
from edgert.pack.hf_import import pack_hf
from moe_models import mixtral_config, prompt, ref_greedy, ref_logits, reference, save
from task_packs import assert_matches, tiny  # noqa: F401  (tiny is a fixture)

torch.set_num_threads(1)
MiB = 1 << 20


@pytest.fixture(scope="module")
def lm_pack(tmp_path_factory):
    d = save(mixtral_config(num_local_experts=8), tmp_path_factory.mktemp("moe") / "ckpt")
    pack = d.parent / "moe.edgepack"
    pack_hf(d, pack, progress=False)
    return pack, reference(d)


def edgert_threads() -> int:
    """Threads edgert started (its threads are named edgert-*); others belong to libraries."""
    return sum(t.name.startswith("edgert") for t in threading.enumerate())


def config(arena: int, engine: int = 8 * MiB, experts: int = 0, kv: int = 0,
           read_mode: str = "direct") -> DeviceConfig:
    return DeviceConfig.from_dict({
        "name": "test-runtime", "threads": 1, "storage": {"read_mode": read_mode},
        "memory": {"total": arena + engine, "engine": engine, "experts": experts, "kv": kv}})


def sizes(tiny, lm_pack) -> dict:
    """What each model holds when loaded alone with the arena to itself."""
    rt = edgert.Runtime(config(64 * MiB))
    m = rt.load(tiny.pack, prepack="off", keep_displaced=False)
    lm = rt.load(lm_pack[0], expert_budget=1.0)
    lm.generate(prompt(20), max_new_tokens=4)
    out = {"run": m.switcher.run_bytes, "lm": lm.memory()["arena_bytes"]}
    rt.close()
    return out


def check_accounting(rt) -> None:
    st = rt.arena.stats()
    assert st["in_use_bytes"] == sum(h["bytes"] for h in st["holders"].values())
    assert st["in_use_bytes"] + st["free_bytes"] == st["mapped"]
    assert st["peak_bytes"] <= st["mapped"] <= rt.config.budget.total - rt.config.budget.engine
    assert sum(m["arena_bytes"] for m in rt.models()) == st["in_use_bytes"]


def check_task(m, tiny, task) -> None:
    assert_matches(m.run({"image": tiny.x}, task=task)["logits"], tiny.ref[task])


def check_lm(lm, lm_pack) -> None:
    ref = lm_pack[1]
    p = prompt(24)
    np.testing.assert_allclose(lm.logits(p), ref_logits(ref, p), atol=1e-4, rtol=0)
    assert lm.generate(p[:5], max_new_tokens=8) == ref_greedy(ref, p[:5], 8)


@pytest.mark.parametrize("order", ["tasks first", "moe first"])
def test_co_residence_in_either_order_is_exact_and_fits(tiny, lm_pack, order):
    need = sizes(tiny, lm_pack)
    # room for the task run and the whole MoE model, and a little spare: the task model's
    # spare blocks must give way to the MoE load when tasks come first
    rt = edgert.Runtime(config(need["run"] + need["lm"] + 64 * 1024))
    loads = [lambda: rt.load(tiny.pack, prepack="off"),
             lambda: rt.load(lm_pack[0], expert_budget=1.0)]
    if order == "moe first":
        loads.reverse()
    first = loads[0]()
    if order == "tasks first":
        for t in tiny.names:                      # fills the spare memory with blocks
            first.switch(t)
        first.prewarm(tiny.names)
        assert first.memory()["reclaimable_bytes"] > 0
    second = loads[1]()
    m, lm = (first, second) if order == "tasks first" else (second, first)
    if order == "tasks first":
        assert rt.arena.stats()["reclaimed_bytes"] > 0
    check_accounting(rt)
    for t in tiny.names:
        check_task(m, tiny, t)
    check_lm(lm, lm_pack)
    for t in reversed(tiny.names):                 # switching again beside the LM
        check_task(m, tiny, t)
    check_accounting(rt)
    rt.close()
    assert rt.arena.stats()["in_use_bytes"] == 0


def test_idle_experts_give_way_to_a_task_load_and_the_lm_stays_exact(tiny, lm_pack):
    need = sizes(tiny, lm_pack)
    rt = edgert.Runtime(config(need["run"] + need["lm"] - 8 * 4096))
    lm = rt.load(lm_pack[0], expert_budget=1.0)     # every expert: more than the arena leaves
    lm.generate(prompt(20), max_new_tokens=4)
    m = rt.load(tiny.pack, prepack="off")             # needs some expert slots back
    assert lm.provider.reclaimed > 0
    assert lm.provider.pool.count >= lm.provider.minimum
    check_task(m, tiny, tiny.names[1])
    check_lm(lm, lm_pack)                             # fewer slots, same logits
    check_accounting(rt)


def test_budget_exceeded_names_the_holders_and_changes_nothing(tiny, lm_pack):
    need = sizes(tiny, lm_pack)
    rt = edgert.Runtime(config(need["run"] + 8 * 4096))
    m = rt.load(tiny.pack, prepack="off")
    before = rt.arena.stats()["in_use_bytes"]
    with pytest.raises(BudgetExceeded) as e:
        rt.load(lm_pack[0], expert_budget=1.0)
    assert "tasks: task weights" in str(e.value)
    assert rt.arena.stats()["in_use_bytes"] <= before   # only reclaimed cache went
    assert [x["name"] for x in rt.models()] == ["tasks"]
    check_task(m, tiny, tiny.names[2])


def test_close_is_idempotent_and_closed_models_refuse_work(tiny, lm_pack):
    rt = edgert.Runtime(config(64 * MiB))
    with rt.load(tiny.pack, prepack="off") as m:
        check_task(m, tiny, tiny.names[0])
    m.close()
    with pytest.raises(ModelClosed, match="closed"):
        m.run({"image": tiny.x})
    with pytest.raises(ModelClosed):
        m.switch(tiny.names[1])
    with rt.load(lm_pack[0], expert_budget=0.5) as lm:
        s = lm.sequence()
        s.feed(prompt(3))
    s.close()                                         # after its model: nothing to give back
    with pytest.raises(ModelClosed):
        lm.generate(prompt(3), max_new_tokens=2)
    assert rt.models() == [] and rt.arena.stats()["in_use_bytes"] == 0


def test_runtime_close_closes_live_models(tiny, lm_pack):
    with edgert.Runtime(config(64 * MiB)) as rt:
        m = rt.load(tiny.pack, prepack="off")
        lm = rt.load(lm_pack[0], expert_budget=0.5)
        lm.generate(prompt(4), max_new_tokens=2)
    assert m.closed and lm.closed and rt.arena.stats()["in_use_bytes"] == 0
    with pytest.raises(ModelClosed):
        rt.load(tiny.pack)


@pytest.mark.parametrize("bad", [{"policy": "bogus"}, {"expert_budget": -1},
                                 {"expert_budget": 1.5}, {"lossy_alpha": float("nan")},
                                 {"expert_budget": 100}, {"arena": "weights only"}])
def test_failed_lm_loads_give_everything_back(tiny, lm_pack, bad):
    arena = 64 * MiB
    if bad.pop("arena", None):       # the dense weights fit, the experts then do not
        arena = sizes(tiny, lm_pack)["lm"] - 16 * 4096
        bad = {"expert_budget": 1.0}
    rt = edgert.Runtime(config(arena))
    threads = edgert_threads()
    with pytest.raises((ValueError, BudgetExceeded)):
        rt.load(lm_pack[0], **bad)
    gc.collect()
    assert rt.arena.stats()["in_use_bytes"] == 0 and rt.arena.stats()["holders"] == {}
    assert edgert_threads() == threads and rt.models() == []


def test_failed_task_loads_give_everything_back(tiny):
    rt = edgert.Runtime(config(64 * MiB))
    for bad in ({"prepack": "sometimes"}, {"task": "nope"}):
        with pytest.raises((ValueError, KeyError)):
            rt.load(tiny.pack, **bad)
    with pytest.raises(BudgetExceeded):
        edgert.Runtime(config(64 * 1024)).load(tiny.pack)
    gc.collect()
    assert rt.arena.stats()["in_use_bytes"] == 0 and rt.models() == []


def test_fifty_load_drop_cycles_leave_nothing_behind(tiny, lm_pack):
    rt = edgert.Runtime(config(64 * MiB))
    gc.collect()
    threads = edgert_threads()
    for i in range(50):
        m = rt.load(tiny.pack, prepack="off")
        lm = rt.load(lm_pack[0], expert_budget=0.5)
        if i % 10 == 0:
            check_task(m, tiny, tiny.names[i % len(tiny.names)])
            lm.generate(prompt(5), max_new_tokens=3)
        if i % 2:
            del m, lm                              # the finalizers give everything back
            gc.collect()
        else:
            m.close(), lm.close()
        assert rt.arena.stats()["in_use_bytes"] == 0, i
        assert rt.arena.stats()["engine"]["in_use"] == 0
    gc.collect()
    assert edgert_threads() == threads
    assert rt.models() == []


def test_eight_threads_share_one_task_model(tiny):
    rt = edgert.Runtime(config(64 * MiB))
    m = rt.load(tiny.pack, prepack="off")
    tasks = tiny.names[:4]
    errors: list = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(12):
                t = tasks[int(rng.integers(len(tasks)))]
                out = m.run({"image": tiny.x}, task=t)["logits"]
                np.testing.assert_allclose(out, tiny.ref[t], rtol=1e-5, atol=1e-6,
                                           err_msg=f"output of another task than {t}")
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert m.stats()["runs"] == 8 * 12


def test_two_threads_generate_on_one_lm_at_a_quarter_budget(lm_pack):
    rt = edgert.Runtime(config(64 * MiB))
    lm = rt.load(lm_pack[0], expert_budget=0.25)
    prompts = [prompt(12, seed=s) for s in (4, 5)]
    want = [ref_greedy(lm_pack[1], p, 16) for p in prompts]
    got: dict = {}
    errors: list = []

    def worker(i: int) -> None:
        try:
            got[i] = lm.generate(prompts[i], max_new_tokens=16)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert [got[0], got[1]] == want
    assert lm.stats()["kv"]["in_use"] == 0


@pytest.mark.parametrize("change", ["truncate", "overwrite"])
def test_task_pack_changed_while_loaded_keeps_serving(tiny, tmp_path, change):
    a, b = tiny.names[:2]
    pack = tiny.copy_pack(tmp_path)
    rt = edgert.Runtime(config(64 * MiB))
    m = rt.load(pack, task=a, prepack="off", keep_displaced=False)
    if change == "truncate":
        with open(pack, "r+b") as f:
            f.truncate(4096 * 4)
    else:
        tiny.corrupt_block_of(pack, b, not_in=a)
    with pytest.raises(PackCorrupt) as e:
        m.run({"image": tiny.x}, task=b)
    assert str(pack) in str(e.value)
    check_task(m, tiny, a)                       # the intact task keeps serving


def test_corrupt_expert_while_loaded_names_it_and_others_serve(lm_pack, tmp_path):
    import shutil
    pack = tmp_path / "moe.edgepack"
    shutil.copy(lm_pack[0], pack)
    rt = edgert.Runtime(config(64 * MiB, read_mode="buffered"))
    lm = rt.load(pack, expert_budget=0.25)
    lay = lm.layout
    idx = lay.block(0, 3)
    ent = lm.reader.blocks[idx]
    with open(pack, "r+b") as f:
        f.seek(ent.offset + 5)
        f.write(b"\xde\xad")
    with pytest.raises(PackCorrupt) as e:
        for s in range(40):                       # until some prompt routes to expert 3
            lm.generate(prompt(8, seed=s), max_new_tokens=2)
    assert str(pack) in str(e.value) and f"block {idx}" in str(e.value)
    assert "layer 0 expert 3" in str(e.value)
    assert lm.stats()["kv"]["in_use"] == 0       # the failed request gave its pages back


def test_two_moe_packs_with_different_expert_sizes_co_reside(lm_pack, tmp_path):
    other = save(mixtral_config(intermediate_size=80), tmp_path / "ckpt")   # larger experts
    pack2 = tmp_path / "other.edgepack"
    pack_hf(other, pack2, progress=False)
    rt = edgert.Runtime(config(64 * MiB))
    a = rt.load(lm_pack[0], expert_budget=0.5)
    b = rt.load(pack2, expert_budget=0.5)
    assert a.layout.extent_bytes < b.layout.extent_bytes       # two slot geometries at once
    check_lm(a, lm_pack)
    check_lm(b, (pack2, reference(other)))
    check_accounting(rt)
    rt.close()
    assert rt.arena.stats()["in_use_bytes"] == 0
