"""Build a trained multi-task model set: a small ViT pretrained on four camera tasks, then
fine-tuned per task.

    python -m edgert.recipes.trained --out models/out/tasks-trained [--quick] [--block-l1 LAMBDA]

Every image is drawn by this recipe (no downloads), each task from its own scene with its
own labels (``TASKS``):

- ``lane``: a grey road with painted stripes; the class is the stripe orientation
  (0/45/90/135 degrees, jittered), over random stripe period, phase and paint colour.
- ``sign``: a saturated sign on a cluttered background; the class is shape x colour
  (circle or triangle, red or blue), over random position and size.
- ``detect``: a street-grey scene with Gaussian blobs; the class is the count (1-4).
- ``parking``: a top-down asphalt grid of bay lines; the class is the grid period
  (4/6/8/11 px), over random offset, slight rotation and line brightness.

Training, deterministic (fixed seeds, one torch thread (``TORCH_THREADS``), a fresh stream of
images per step from a seeded generator):

1. **Multi-task pretraining** of the shared backbone from random init: each step takes an
   equal share of every task's images through the backbone and sums the tasks' losses,
   one small head per task.
2. **Per-task fine-tunes** from it: the last ``finetune_layers`` transformer layers, the
   final norm and the task's head train on the task alone; the patch embedding, position
   embedding and earlier layers stay frozen. This is the usual way several tasks share
   one backbone on a device (the frozen layers are bit-identical across tasks, so a switch
   moves only what the fine-tune changed), and the regime of the seed method: most
   weights shared, each task's importance of them its own. Fine-tuning every layer with a
   small learning rate would change every block, leaving nothing to share or align.

**Trained for block sparsity** (``--block-l1 LAMBDA``, the ``full-sparse`` and
``quick-sparse`` presets with ``BLOCK_L1``): both phases add ``LAMBDA`` times a group lasso
(``block_penalty``: the summed L2 norms of the ``BLOCK_BYTES`` pack blocks of every weight
matrix being trained, in its ONNX layout) to the loss, so the network learns to leave
whole pack blocks near zero and pruning them at pack time costs little: the regime of a
model trained for the device, not a dense one pruned after the fact.

Exported with ``edgert.recipes.tasks.vit_graph`` (Conv patch embedding, MatMul weights,
LayerNormalization, Erf GELU; the ops the packer and pruner handle): ``base.onnx`` (the
pretrained backbone with the first task's pretrained head) and ``TASK.onnx`` per task,
``calib/TASK.npz`` (``CALIB_SAMPLES`` unlabelled images of the task's scene, for ``edgert
pack onnx --prune-blocks``), ``heldout/TASK.npz`` (``image`` and ``label``, drawn with
seeds that training never sees) and ``models.json`` (spec, held-out accuracy of each task
on its exported ONNX file, and changed blocks). Each task file's outputs are checked
against the torch model it came from.

Measured (``python -m edgert.recipes.trained``, one thread on 2 shared cores, preliminary):
170 s; held-out accuracy of the exported task files detect 0.904, lane 1.000, sign 0.889,
parking 1.000 (chance 0.25); each fine-tune changes 223 of the 856 4 KiB blocks (the last
of four layers and the head). The quick preset (the tests') trains in about 10 s. With
``--block-l1 0.001`` (the ``full-sparse`` preset): 172 s; detect 0.914, lane 1.000, sign
0.900, parking 1.000.

Pack it with 4 KiB blocks (``BLOCK_BYTES``): a block of a ``[128, 512]`` float32 MatMul
weight is two input rows, of a ``[128, 128]`` or ``[512, 128]`` one eight, so activation
importance sees individual input features.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

BLOCK_BYTES = 4096        # the pack block size this set is benchmarked with
CALIB_SAMPLES = 32        # calibration images per task (unlabelled)
HELDOUT_SAMPLES = 512     # labelled held-out images per task
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TASKS = ("detect", "lane", "sign", "parking")
CLASSES = 4               # every task has four classes: chance is 25%
RECIPE = 1                # bump when the scenes or training change: ensure_built rebuilds
# NOTE: the group-lasso weight of the -sparse presets, per unit of summed block L2 norm;
# chosen as the largest power of ten at which every task's dense held-out accuracy stays
# within a few points of the unpenalised set's (docs/benchmarks.md)
BLOCK_L1 = 1e-3
# NOTE: one thread: on 2 shared cores two threads ran 5x slower under contention, and one
# thread's float sums are the same on every run
TORCH_THREADS = 1
SEEDS = {"train": 0, "finetune": 100, "calib": 200, "heldout": 300}   # + task index


@dataclass(frozen=True)
class TrainedSpec:
    image: int = 32
    patch: int = 8
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp: int = 512
    head_hidden: int = 128
    finetune_layers: int = 1       # last layers trained per task (with final norm + head)
    pretrain_steps: int = 600
    finetune_steps: int = 120
    batch: int = 128               # images per step (pretraining: split over the tasks)
    lr: float = 2e-3
    block_l1: float = 0.0          # group-lasso weight over the pack blocks (block_penalty)

    @staticmethod
    def from_name(name: str) -> "TrainedSpec":
        """``full``, ``quick`` (the tests'), and each with ``-sparse``: trained with the
        group-lasso penalty ``BLOCK_L1`` (pretraining and fine-tunes)."""
        base, sparse = name.removesuffix("-sparse"), name.endswith("-sparse")
        if base == "full":
            spec = TrainedSpec()
        elif base == "quick":      # for tests: seconds
            spec = TrainedSpec(dim=64, depth=2, heads=2, mlp=256, head_hidden=64,
                               pretrain_steps=100, finetune_steps=30, batch=64, lr=3e-3)
        else:
            raise ValueError(f"unknown preset {name!r} (full, quick, full-sparse, quick-sparse)")
        return replace(spec, block_l1=BLOCK_L1) if sparse else spec

    def vit(self):
        from .tasks import ViTSpec
        return ViTSpec(image=self.image, patch=self.patch, dim=self.dim, depth=self.depth,
                       heads=self.heads, mlp=self.mlp, head_hidden=self.head_hidden,
                       classes=CLASSES, block_bytes=BLOCK_BYTES, tasks={})


# --- the scenes -------------------------------------------------------------------------

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): (y, x), each [1, size, size]."""
    c = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")
    return y[None], x[None]


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int = 4) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled: [n, size, size]."""
    coarse = rng.standard_normal((n, cells, cells))
    return np.kron(coarse, np.ones((size // cells, size // cells)))


def lane(rng, n, size):
    """Painted stripes on grey road; class: orientation 0/45/90/135 degrees."""
    label = rng.integers(0, CLASSES, n)
    y, x = _grid(size)
    theta = np.deg2rad(label * 45 + rng.uniform(-8, 8, n))[:, None, None]
    freq = rng.uniform(2.5, 4.5, n)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    stripe = (np.sin(2 * np.pi * freq * (x * np.cos(theta) + y * np.sin(theta)) + phase)
              > rng.uniform(0.5, 0.8, n)[:, None, None]).astype(np.float64)
    road = 0.33 + 0.05 * _smooth_noise(rng, n, size)
    paint = np.where(rng.random(n) < 0.5, 1.0, 0.0)[:, None, None]        # white or yellow
    colour = np.stack([np.full(n, 0.9), np.full(n, 0.85), 0.2 + 0.7 * paint[:, 0, 0]], 1)
    img = road[:, None] * (1 - stripe[:, None]) + colour[:, :, None, None] * stripe[:, None]
    return img, label


def sign(rng, n, size):
    """A sign on clutter; class: shape (circle, triangle) x colour (red, blue)."""
    label = rng.integers(0, CLASSES, n)
    y, x = _grid(size)
    cy, cx = (rng.uniform(0.3, 0.7, n)[:, None, None] for _ in range(2))
    r = rng.uniform(0.18, 0.3, n)[:, None, None]
    circle = (y - cy) ** 2 + (x - cx) ** 2 < r ** 2
    top, bottom = cy - r, cy + 0.8 * r
    triangle = (y > top) & (y < bottom) & (np.abs(x - cx) < 0.6 * (y - top))
    mask = np.where((label // 2 == 0)[:, None, None], circle, triangle).astype(np.float64)
    red = (label % 2 == 0)[:, None]
    colour = np.where(red, [0.85, 0.1, 0.1], [0.1, 0.2, 0.85]) + rng.uniform(-0.1, 0.1, (n, 3))
    clutter = 0.45 + 0.25 * np.stack([_smooth_noise(rng, n, size, 8) for _ in range(3)], 1)
    img = clutter * (1 - mask[:, None]) + colour[:, :, None, None] * mask[:, None]
    return img, label


def detect(rng, n, size):
    """Blobs in a street scene; class: how many (1-4), each in its own cell of a 3x3 grid."""
    label = rng.integers(0, CLASSES, n)
    y, x = _grid(size)
    cells = np.argsort(rng.random((n, 9)), axis=1)[:, :CLASSES]            # distinct cells
    img = (0.45 + 0.08 * _smooth_noise(rng, n, size))[:, None].repeat(3, 1)
    for b in range(CLASSES):
        present = (b <= label)[:, None, None]
        cy = (cells[:, b] // 3 + 0.5) / 3 + rng.uniform(-0.06, 0.06, n)
        cx = (cells[:, b] % 3 + 0.5) / 3 + rng.uniform(-0.06, 0.06, n)
        s = rng.uniform(0.05, 0.08, n)                                  # 1.6-2.6 px at 32
        g = np.exp(-((y - cy[:, None, None]) ** 2 + (x - cx[:, None, None]) ** 2)
                   / (2 * s[:, None, None] ** 2)) * present
        shade = np.where(rng.random(n) < 0.5, 1.0, -1.0) * rng.uniform(0.3, 0.5, n)
        colour = shade[:, None] + rng.uniform(-0.15, 0.15, (n, 3))       # light or dark, tinted
        img = img + colour[:, :, None, None] * g[:, None]
    return img, label


def parking(rng, n, size):
    """A top-down grid of bay lines on asphalt; class: grid period 4/6/8/11 px."""
    label = rng.integers(0, CLASSES, n)
    y, x = _grid(size)
    period = np.array([4.0, 6.0, 8.0, 11.0])[label][:, None, None] / size
    rot = np.deg2rad(rng.uniform(-5, 5, n))[:, None, None]
    u = x * np.cos(rot) + y * np.sin(rot) + rng.uniform(0, 1, n)[:, None, None]
    v = -x * np.sin(rot) + y * np.cos(rot) + rng.uniform(0, 1, n)[:, None, None]
    width = 1.0 / size
    lines = ((np.mod(u, period) < width) | (np.mod(v, period * 2) < width)).astype(np.float64)
    asphalt = 0.22 + 0.04 * _smooth_noise(rng, n, size, 8)
    bright = rng.uniform(0.6, 0.95, n)[:, None, None]
    img = asphalt * (1 - lines) + bright * lines
    return img[:, None].repeat(3, 1), label


SCENES = {"detect": detect, "lane": lane, "sign": sign, "parking": parking}


def images(task: str, rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled images of ``task``'s scene, normalised as an ImageNet-trained model
    expects: ([n, 3, size, size] float32, [n] int64)."""
    img, label = SCENES[task](rng, n, size)
    img = np.clip(img + 0.04 * rng.standard_normal(img.shape), 0.0, 1.0)   # sensor noise
    img = (img - np.asarray(IMAGENET_MEAN)[:, None, None]) / np.asarray(IMAGENET_STD)[:, None, None]
    return img.astype(np.float32), label.astype(np.int64)


# --- the model (the computation of edgert.recipes.tasks.vit_graph) -----------------------------

def _torch_model(spec: TrainedSpec):
    import torch
    from torch import nn
    d, t = spec.dim, (spec.image // spec.patch) ** 2

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(d, spec.mlp), nn.Linear(spec.mlp, d)

        def forward(self, x):                                           # x: [N, T, D]
            n, h = x.shape[0], spec.heads
            y = self.ln1(x)
            q, k, v = (m(y).view(n, t, h, d // h).transpose(1, 2) for m in (self.q, self.k, self.v))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
            x = x + self.o((att @ v).transpose(1, 2).reshape(n, t, d))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, d, spec.patch, spec.patch)
            self.pos = nn.Parameter(0.02 * torch.randn(1, t, d))
            self.layers = nn.ModuleList(Layer() for _ in range(spec.depth))
            self.norm = nn.LayerNorm(d)
            self.heads = nn.ModuleDict({task: nn.Sequential(
                nn.Linear(d, spec.head_hidden), nn.ReLU(), nn.Linear(spec.head_hidden, CLASSES))
                for task in TASKS})

        def features(self, img):                                        # img: [N, 3, H, W]
            x = self.patch(img).flatten(2).transpose(1, 2) + self.pos
            for layer in self.layers:
                x = layer(x)
            return self.norm(x).mean(dim=1)                             # [N, D]

        def forward(self, img, task):
            return self.heads[task](self.features(img))

    return ViT()


def onnx_weights(model, task: str) -> dict:
    """The weights of ``model`` with ``task``'s head, named and laid out as vit_graph takes
    them (MatMul weights [in, out]); insertion order is graph order."""
    def a(t):
        return np.ascontiguousarray(t.detach().numpy().astype(np.float32))
    w = {"patch.w": a(model.patch.weight), "patch.b": a(model.patch.bias), "pos": a(model.pos)}
    for i, layer in enumerate(model.layers):
        w[f"l{i}.ln1.g"], w[f"l{i}.ln1.b"] = a(layer.ln1.weight), a(layer.ln1.bias)
        for n in "qkvo":
            lin = getattr(layer, n)
            w[f"l{i}.attn.{n}.w"], w[f"l{i}.attn.{n}.b"] = a(lin.weight.T), a(lin.bias)
        w[f"l{i}.ln2.g"], w[f"l{i}.ln2.b"] = a(layer.ln2.weight), a(layer.ln2.bias)
        w[f"l{i}.mlp.fc1.w"], w[f"l{i}.mlp.fc1.b"] = a(layer.fc1.weight.T), a(layer.fc1.bias)
        w[f"l{i}.mlp.fc2.w"], w[f"l{i}.mlp.fc2.b"] = a(layer.fc2.weight.T), a(layer.fc2.bias)
    w["norm.g"], w["norm.b"] = a(model.norm.weight), a(model.norm.bias)
    head = model.heads[task]
    w["head.fc1.w"], w["head.fc1.b"] = a(head[0].weight.T), a(head[0].bias)
    w["head.fc2.w"], w["head.fc2.b"] = a(head[2].weight.T), a(head[2].bias)
    return w


# --- training ---------------------------------------------------------------------------

def _weight_matrices(model) -> list[tuple]:
    """(parameter, transposed) of every weight the pruner may prune, ``transposed`` when
    the ONNX file holds it as ``weight.T`` (nn.Linear: MatMul B is [in, out])."""
    from torch import nn
    return [(m.weight, isinstance(m, nn.Linear)) for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))]


def block_penalty(matrices: list[tuple]):
    """Group lasso over pack blocks: the sum of the L2 norms of every ``BLOCK_BYTES`` run
    of each weight's row-major bytes in its ONNX layout (the blocks ``edgert pack onnx``
    cuts and ``--prune-blocks`` zeroes), so training drives whole blocks toward zero."""
    import torch
    per = BLOCK_BYTES // 4                                       # float32 elements
    total = torch.zeros(())
    for p, transposed in matrices:
        flat = (p.t() if transposed else p).reshape(-1)
        flat = torch.nn.functional.pad(flat, (0, -flat.numel() % per))
        total = total + flat.view(-1, per).norm(dim=1).sum()
    return total


def _train(model, params, spec: TrainedSpec, tasks: tuple[str, ...], steps: int, lr: float,
           seed: int) -> float:
    """Adam with linear warm-up and cosine decay over a fresh seeded image stream; each
    step splits ``spec.batch`` over ``tasks``, plus ``spec.block_l1`` times the block
    penalty of the trained weight matrices. Returns the last step's task loss."""
    import torch
    trained = {id(p) for p in params}
    matrices = [(p, t) for p, t in _weight_matrices(model) if id(p) in trained]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    rngs = {t: np.random.default_rng(seed + TASKS.index(t)) for t in tasks}
    per = spec.batch // len(tasks)
    loss = torch.zeros(())
    for _ in range(steps):
        batch = [images(t, rngs[t], per, spec.image) for t in tasks]
        x = torch.from_numpy(np.concatenate([b[0] for b in batch]))
        feats = model.features(x)
        loss = sum(torch.nn.functional.cross_entropy(model.heads[t](feats[i * per:(i + 1) * per]),
                                                     torch.from_numpy(batch[i][1]))
                   for i, t in enumerate(tasks)) / len(tasks)
        total = loss + spec.block_l1 * block_penalty(matrices) if spec.block_l1 else loss
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


def _finetune_params(model, spec: TrainedSpec, task: str) -> list:
    """The parameters a task's fine-tune trains; the rest are frozen."""
    late = list(model.layers)[spec.depth - spec.finetune_layers:]
    return [p for m in (*late, model.norm, model.heads[task]) for p in m.parameters()]


def accuracy(path: str, data: dict[str, np.ndarray], weights: dict | None = None) -> float:
    """Top-1 accuracy of the ONNX model at ``path`` (initializers replaced by ``weights``
    when given) on labelled ``data`` (``image``, ``label``)."""
    import onnx
    from ..pack.reference import run_model
    logits = run_model(onnx.load(path), {"image": data["image"]}, weights)[0]
    return float(np.mean(np.argmax(logits, axis=1) == data["label"]))


def build(out_dir: str, preset: str = "full", block_l1: float | None = None) -> dict[str, str]:
    """Train and write base.onnx, TASK.onnx, calib/ and heldout/ into out_dir; {name: path}.
    ``block_l1`` overrides the preset's group-lasso weight."""
    import copy
    import torch
    from .tasks import changed_blocks, vit_graph
    spec = TrainedSpec.from_name(preset)
    if block_l1 is not None:
        spec = replace(spec, block_l1=block_l1)
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = _torch_model(spec)
    pre_loss = _train(model, list(model.parameters()), spec, TASKS, spec.pretrain_steps,
                      spec.lr, SEEDS["train"])
    t_pre = time.perf_counter() - t0
    os.makedirs(os.path.join(out_dir, "calib"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "heldout"), exist_ok=True)
    vit = spec.vit()
    base_w = onnx_weights(model, TASKS[0])
    paths = {"base": _write(os.path.join(out_dir, "base.onnx"), vit_graph(vit, base_w))}
    report = {"preset": preset, "recipe": RECIPE, "spec": asdict(spec), "block_bytes": BLOCK_BYTES,
              "pretrain_loss": pre_loss, "tasks": {}}
    for i, task in enumerate(TASKS):
        ft = copy.deepcopy(model)
        for p in ft.parameters():
            p.requires_grad_(False)
        params = _finetune_params(ft, spec, task)
        for p in params:
            p.requires_grad_(True)
        loss = _train(ft, params, spec, (task,), spec.finetune_steps, spec.lr / 4,
                      SEEDS["finetune"] + 10 * i)
        w = onnx_weights(ft, task)
        paths[task] = _write(os.path.join(out_dir, f"{task}.onnx"), vit_graph(vit, w))
        held = images(task, np.random.default_rng(SEEDS["heldout"] + i), HELDOUT_SAMPLES,
                      spec.image)
        heldout = {"image": held[0], "label": held[1]}
        np.savez(os.path.join(out_dir, "heldout", f"{task}.npz"), **heldout)
        calib = images(task, np.random.default_rng(SEEDS["calib"] + i), CALIB_SAMPLES,
                       spec.image)[0]
        np.savez(os.path.join(out_dir, "calib", f"{task}.npz"), image=calib)
        with torch.no_grad():                    # the export computes what was trained
            ref = ft(torch.from_numpy(held[0][:16]), task).numpy()
        from ..pack.reference import run_model
        got = run_model(vit_graph(vit, w), {"image": held[0][:16]})[0]
        assert np.allclose(ref, got, atol=1e-3, rtol=1e-3), float(np.abs(ref - got).max())
        diff, total = changed_blocks(base_w, w, BLOCK_BYTES)
        report["tasks"][task] = {"heldout_accuracy": accuracy(paths[task], heldout),
                                 "finetune_loss": loss, "changed_blocks": diff, "blocks": total}
    report["weight_bytes"] = sum(a.nbytes for a in base_w.values())
    report["seconds"] = {"pretrain": round(t_pre, 1), "total": round(time.perf_counter() - t0, 1)}
    with open(os.path.join(out_dir, "models.json"), "w") as f:
        json.dump(report, f, indent=1)
    return paths


def _write(path: str, model) -> str:
    with open(path + ".tmp", "wb") as f:
        f.write(model.SerializeToString())
    os.replace(path + ".tmp", path)
    return path


def ensure_built(out_dir: str, preset: str = "full") -> dict[str, str]:
    """Build unless out_dir already holds this preset's models, calibration and held-out data."""
    spec = TrainedSpec.from_name(preset)
    paths = {n: os.path.join(out_dir, f"{n}.onnx") for n in ("base", *TASKS)}
    data = [os.path.join(out_dir, d, f"{t}.npz") for d in ("calib", "heldout") for t in TASKS]
    try:
        with open(os.path.join(out_dir, "models.json")) as f:
            built = json.load(f)
        # NOTE: sets built before block_l1 existed were trained without the penalty
        same = (built.get("recipe"), {"block_l1": 0.0, **built.get("spec", {})}) == \
            (RECIPE, json.loads(json.dumps(asdict(spec))))
    except (OSError, ValueError):
        same = False
    if same and all(os.path.exists(p) for p in [*paths.values(), *data]):
        return paths
    return build(out_dir, preset)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/out/tasks-trained")
    ap.add_argument("--quick", action="store_true", help="the test's small model (seconds)")
    ap.add_argument("--block-l1", type=float, metavar="LAMBDA",
                    help="train for block sparsity: a group-lasso penalty, LAMBDA x the summed "
                         f"L2 norms of the {BLOCK_BYTES // 1024} KiB pack blocks of the weight "
                         f"matrices, in pretraining and fine-tunes (the -sparse presets: "
                         f"{BLOCK_L1:g})")
    args = ap.parse_args(argv)
    if args.block_l1 is not None and not (args.block_l1 >= 0 and math.isfinite(args.block_l1)):
        ap.error(f"--block-l1 {args.block_l1}: must be a non-negative number")
    build(args.out, "quick" if args.quick else "full", block_l1=args.block_l1)
    with open(os.path.join(args.out, "models.json")) as f:
        report = json.load(f)
    print(f"trained in {report['seconds']['total']:.0f} s (pretraining "
          f"{report['seconds']['pretrain']:.0f} s); backbone + head "
          f"{report['weight_bytes'] / 1e6:.2f} MB float32 -> {args.out}")
    for name, r in report["tasks"].items():
        print(f"  {name:8s} held-out accuracy {r['heldout_accuracy']:.3f} (chance "
              f"{1 / CLASSES:.2f}); {r['changed_blocks']}/{r['blocks']} {BLOCK_BYTES // 1024} KiB "
              f"blocks differ from base")


if __name__ == "__main__":
    main()
