"""A retrained task of the demo task models: same graph, new weights for the task's
layers (another seed), the way a fine-tune run again on new data changes the blocks a
fine-tune touches. For `edgert bench update`, the fleet demo and the update tests.

    python -m edgert.recipes.retrain --out models/out/tasks --task lane [--preset demo]
"""
from __future__ import annotations

import argparse
import os

from .tasks import ViTSpec, base_weights, block_scales, scaled, task_weights, vit_graph

RETRAIN_SEED = 100       # added to the task's own seed


def retrain(out_dir: str, task: str, preset: str = "demo", version: int = 2) -> str:
    """Write OUT_DIR/TASK-vVERSION.onnx; returns its path."""
    spec = ViTSpec.from_name(preset)
    if task not in spec.tasks:
        raise ValueError(f"unknown task {task!r} ({', '.join(spec.tasks)})")
    seed, layers, frac = spec.tasks[task]
    base = base_weights(spec)
    w = task_weights(base, spec, seed + RETRAIN_SEED * (version - 1), layers, frac)
    if spec.block_sigma > 0:          # as tasks.build does for the sparse preset
        w = scaled(w, block_scales(base, spec), spec.block_bytes)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{task}-v{version}.onnx")
    with open(path + ".tmp", "wb") as f:
        f.write(vit_graph(spec, w).SerializeToString())
    os.replace(path + ".tmp", path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/out/tasks")
    p.add_argument("--task", default="lane")
    p.add_argument("--preset", default="demo", choices=["demo", "sparse", "tiny"])
    p.add_argument("--version", type=int, default=2)
    a = p.parse_args()
    print(retrain(a.out, a.task, a.preset, a.version))


if __name__ == "__main__":
    main()
