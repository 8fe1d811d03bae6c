"""Pruning at pack time on a trained task set (edgert/recipes/trained.py, quick variant):
the tasks learn, and joint masks align what independent activation-aware masks do not."""
from __future__ import annotations

import numpy as np
import pytest

from edgert.bench.switch_pruned import ModelSet, heldout_accuracy
from edgert.pack import PackReader
from edgert.pack.onnx_import import pack_onnx
from edgert.pack.prune import PruneOptions, pruning_summary
from edgert.pack.stats import summary
from edgert.recipes import trained

BS = trained.BLOCK_BYTES
# NOTE: 512 held-out images per task: chance (0.25) plus 5 standard deviations of a
# guessing classifier's accuracy (0.019) is 0.35
BEATS_CHANCE = 0.35


@pytest.fixture(scope="module")
def task_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    paths = trained.build(str(root / "models"), "quick")
    return root, paths


def _same_positions(path: str) -> float:
    """Mean over task pairs of the block positions whose blocks are equal (zero or not)."""
    with PackReader(path) as r:
        h = {t: [r.blocks[i].hash for name in r.task(t) for i in r.task(t)[name].blocks]
             for t in r.tasks}
    ts = list(h)
    return float(np.mean([sum(x == y for x, y in zip(h[a], h[b]))
                          for i, a in enumerate(ts) for b in ts[i + 1:]]))


def _pack(task_set, name: str, **prune) -> tuple[str, dict]:
    root, paths = task_set
    tasks = {t: p for t, p in paths.items() if t != "base"}
    calib = {t: str(root / "models" / "calib" / f"{t}.npz") for t in tasks}
    out = str(root / f"{name}.edgepack")
    pack_onnx(paths["base"], tasks, out, block_size=BS,
              prune=None if not prune else PruneOptions(calib=calib, **prune))
    with PackReader(out) as r:
        return out, summary(r)


def _models(task_set) -> ModelSet:
    return ModelSet(str(task_set[0] / "models"), "trained:quick", None, BS)


def test_tasks_beat_chance_on_heldout_data(task_set):
    out, _ = _pack(task_set, "dense")
    acc = heldout_accuracy(out, _models(task_set))
    assert set(acc) == set(trained.TASKS)
    assert all(a > BEATS_CHANCE for a in acc.values()), acc


def test_frozen_layers_are_shared_and_finetuned_ones_differ(task_set):
    _, s = _pack(task_set, "dense")
    per_task = s["task_bytes"]["lane"]
    # every pair shares the frozen layers (more than half the bytes), and differs in the rest
    for pair, shared in s["shared_bytes"].items():
        assert 0.5 * per_task < shared < per_task, pair


def test_joint_masks_align_what_independent_ones_do_not(task_set):
    ind, ind_s = _pack(task_set, "independent", fraction=0.5, importance="activation")
    joint, joint_s = _pack(task_set, "joint", fraction=0.5, joint=True, importance="activation")
    read = {k: np.mean(list(s["switch_bytes"].values()))
            for k, s in (("independent", ind_s), ("joint", joint_s))}
    # the trained tasks rank the frozen blocks by their own inputs: independent masks
    # diverge there, and a switch reads what the target kept and the source pruned
    assert read["joint"] < 0.85 * read["independent"], read
    assert _same_positions(joint) > _same_positions(ind)


def test_joint_model_scope_reads_less_than_joint_per_tensor(task_set):
    """Per tensor, joint masks keep half of the fine-tuned blocks, which differ between
    every pair of tasks; one budget over the model prunes more of them."""
    _, tensor = _pack(task_set, "joint-tensor", fraction=0.5, joint=True)
    model, model_s = _pack(task_set, "joint-model", fraction=0.5, joint=True, scope="model")
    read = {k: np.mean(list(s["switch_bytes"].values()))
            for k, s in (("tensor", tensor), ("model", model_s))}
    assert read["model"] < read["tensor"], read
    with PackReader(model) as r:
        pruned = {p["blocks_pruned"] for p in pruning_summary(r)["tasks"].values()}
    assert pruned == {model_s["zero_blocks"]["count"] // len(trained.TASKS)}


def test_block_penalty_is_the_group_lasso_over_pack_blocks():
    """The training penalty groups exactly the bytes a 4 KiB pack block holds: the sum of
    the L2 norms of the blocks of the exported weight matrices."""
    import torch
    from edgert.pack.prune import _blocks, weight_matrices
    from edgert.recipes.tasks import vit_graph
    spec = trained.TrainedSpec.from_name("quick")
    torch.manual_seed(0)
    model = trained._torch_model(spec)
    with torch.no_grad():
        got = float(trained.block_penalty(trained._weight_matrices(model)))
    w = trained.onnx_weights(model, trained.TASKS[0])
    graph = vit_graph(spec.vit(), w)
    heads = [n for n in weight_matrices(graph) if n.startswith("head.")]
    # the torch model holds every task's head; the graph one: add the other heads' norms
    others = sum(float(np.linalg.norm(b)) for t in trained.TASKS[1:]
                 for name, arr in trained.onnx_weights(model, t).items() if name in heads
                 for b in _blocks(arr, BS))
    want = sum(float(np.linalg.norm(b)) for name in weight_matrices(graph)
               for b in _blocks(w[name], BS)) + others
    assert got == pytest.approx(want, rel=1e-5)
