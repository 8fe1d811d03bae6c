"""Build the demo task models: a small ViT backbone plus sparse "fine-tuned" variants.

    python -m edgert.recipes.tasks --out models/out/tasks [--preset demo|sparse|tiny]

Deterministic (fixed seeds, numpy only, graphs written with onnx.helper). Each task
variant re-initialises its heads and perturbs a block-aligned subset of the late
layers' weights, so 5-20% of the 64 KiB blocks differ from the base, the way a
fine-tune that froze most of the backbone would. ``calib/TASK.npz`` holds each task's
calibration inputs (``CALIB_SAMPLES`` images) for ``edgert pack onnx --prune-blocks``,
drawn from the task's own scene (``SCENES``): random images with the spectrum, orientation
and colour statistics its camera sees (street scenes for detect, grey road with long
near-vertical lines for lane, saturated sharp-edged close-ups for sign, a top-down grid of
bay lines for parking), normalised as an ImageNet-trained ViT expects. So activation-aware
importance sees each task's inputs, as it would with real calibration images.

The ``sparse`` preset (the pruned variant set of ``edgert bench switch``) is the demo
with every weight matrix's 64 KiB blocks scaled by log-normal factors (sigma
``block_sigma``, energy kept), base and fine-tunes alike, so a fine-tune's change to a
block scales with the block. A random backbone has blocks of nearly equal norm, where
pruning any half of them is as bad as any other; trained networks, and above all those
trained with a block-sparsity penalty, have a spread of block norms. This emulates that
spread; it does not make the outputs mean anything.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
BLOCK_BYTES = 65536  # the pack's default block size; variants perturb whole blocks of it
CALIB_SAMPLES = 8    # calibration images per task: enough to rank errors, cheap to run


@dataclass(frozen=True)
class ViTSpec:
    image: int = 112
    patch: int = 16
    dim: int = 384
    depth: int = 6
    heads: int = 6
    mlp: int = 1536
    head_hidden: int = 1024
    classes: int = 256
    block_bytes: int = BLOCK_BYTES
    block_sigma: float = 0.0   # log-normal spread of weight-matrix block norms (0: none)
    # task -> (seed, number of late layers touched, fraction of their blocks changed)
    tasks: dict = field(default_factory=lambda: {
        "detect": (11, 1, 0.55), "lane": (12, 2, 0.30), "sign": (13, 1, 0.25), "parking": (14, 2, 0.40)})

    @staticmethod
    def from_name(name: str) -> "ViTSpec":
        if name == "demo":
            return ViTSpec()
        if name == "sparse":
            return ViTSpec(block_sigma=1.0)
        if name == "tiny":  # for tests: ~0.3 MB, pack it with 4 KiB blocks
            return ViTSpec(image=32, patch=8, dim=64, depth=2, heads=2, mlp=128, head_hidden=64,
                           classes=16, block_bytes=4096)
        raise ValueError(f"unknown preset {name!r} (demo, sparse, tiny)")

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2


def base_weights(spec: ViTSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Randomly initialised backbone + heads, name -> float32 array (insertion order = graph order)."""
    rng = np.random.default_rng(seed)
    d, p = spec.dim, spec.patch

    def lin(n_in, n_out):
        return (rng.standard_normal((n_in, n_out), dtype=np.float32) / np.sqrt(n_in)).astype(np.float32)

    def bias(n):
        return (0.02 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    w = {"patch.w": (rng.standard_normal((d, 3, p, p), dtype=np.float32) / np.sqrt(3 * p * p)).astype(np.float32),
         "patch.b": bias(d),
         "pos": (0.02 * rng.standard_normal((1, spec.tokens, d), dtype=np.float32)).astype(np.float32)}
    for i in range(spec.depth):
        w[f"l{i}.ln1.g"] = np.ones(d, np.float32)
        w[f"l{i}.ln1.b"] = np.zeros(d, np.float32)
        for n in "qkvo":
            w[f"l{i}.attn.{n}.w"] = lin(d, d)
            w[f"l{i}.attn.{n}.b"] = bias(d)
        w[f"l{i}.ln2.g"] = np.ones(d, np.float32)
        w[f"l{i}.ln2.b"] = np.zeros(d, np.float32)
        w[f"l{i}.mlp.fc1.w"] = lin(d, spec.mlp)
        w[f"l{i}.mlp.fc1.b"] = bias(spec.mlp)
        w[f"l{i}.mlp.fc2.w"] = lin(spec.mlp, d)
        w[f"l{i}.mlp.fc2.b"] = bias(d)
    w["norm.g"] = np.ones(d, np.float32)
    w["norm.b"] = np.zeros(d, np.float32)
    w["head.fc1.w"] = lin(d, spec.head_hidden)
    w["head.fc1.b"] = bias(spec.head_hidden)
    w["head.fc2.w"] = lin(spec.head_hidden, spec.classes)
    w["head.fc2.b"] = bias(spec.classes)
    return w


def task_weights(base: dict[str, np.ndarray], spec: ViTSpec, seed: int, layers: int,
                 frac: float) -> dict[str, np.ndarray]:
    """A fine-tune of `base`: new heads, final norm, and `frac` of the blocks of the last `layers` layers."""
    rng = np.random.default_rng(seed)
    per_block = spec.block_bytes // 4
    late = tuple(f"l{i}." for i in range(spec.depth - layers, spec.depth))
    out = {}
    for name, arr in base.items():
        if name.startswith(("head.", "norm.")):
            out[name] = arr + (0.05 * rng.standard_normal(arr.shape, dtype=np.float32)).astype(np.float32)
        elif name.startswith(late):
            flat = arr.reshape(-1).copy()
            n_blocks = -(-flat.size // per_block)
            picked = rng.choice(n_blocks, size=max(1, round(frac * n_blocks)), replace=False)
            for b in picked:
                seg = flat[b * per_block:(b + 1) * per_block]
                seg += (0.01 * rng.standard_normal(seg.size, dtype=np.float32)).astype(np.float32)
            out[name] = flat.reshape(arr.shape)
        else:
            out[name] = arr
    return out


def block_scales(weights: dict[str, np.ndarray], spec: ViTSpec, seed: int = 1) -> dict[str, np.ndarray]:
    """Per-block factors of every weight matrix (>= 2-D, but the position embedding),
    log-normal with sigma ``spec.block_sigma``, normalised to keep the matrix's energy."""
    rng = np.random.default_rng(seed)
    per = spec.block_bytes // 4
    out = {}
    for name, arr in weights.items():
        if arr.ndim >= 2 and name != "pos":
            s = np.exp(spec.block_sigma * rng.standard_normal(-(-arr.size // per)))
            out[name] = (s / np.sqrt(np.mean(s ** 2))).astype(np.float32)
    return out


def scaled(weights: dict[str, np.ndarray], scales: dict[str, np.ndarray], block_bytes: int) -> dict[str, np.ndarray]:
    per = block_bytes // 4
    out = dict(weights)
    for name, s in scales.items():
        flat = weights[name].reshape(-1) * np.repeat(s, per)[:weights[name].size]
        out[name] = flat.reshape(weights[name].shape).astype(np.float32)
    return out


@dataclass(frozen=True)
class Scene:
    """The image statistics a task's camera sees: amplitude spectrum ``f^-alpha`` (natural
    images: about 1; lower = more fine detail), energy concentrated at orientation
    ``theta`` with ``fold``-fold symmetry and strength ``kappa`` (0: isotropic), mean colour,
    luminance contrast and colour (chroma) contrast."""
    alpha: float
    kappa: float
    fold: int
    theta: float
    colour: tuple
    contrast: float
    chroma: float


# Chosen once from what each camera sees, not tuned to any benchmark figure.
SCENES = {
    "detect": Scene(1.0, 0.0, 2, 0.0, (0.45, 0.45, 0.45), 0.20, 0.30),    # street: natural, isotropic
    "lane": Scene(1.2, 3.0, 2, 0.0, (0.35, 0.35, 0.37), 0.25, 0.05),      # road ahead: long near-vertical lines, grey
    "sign": Scene(0.5, 0.0, 2, 0.0, (0.55, 0.30, 0.30), 0.30, 0.60),      # close-up signs: sharp edges, saturated colour
    "parking": Scene(1.0, 3.0, 4, 0.0, (0.40, 0.40, 0.40), 0.15, 0.10),   # top-down bays: horizontal and vertical lines
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _field(rng: np.random.Generator, size: int, scene: Scene) -> np.ndarray:
    """One random image plane with the scene's spectrum, unit std: [size, size]."""
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.rfftfreq(size), indexing="ij")
    f = np.hypot(fx, fy)
    amp = np.where(f > 0, np.maximum(f, 1.0 / size) ** -scene.alpha, 0.0)
    amp *= np.exp(scene.kappa * (np.cos(scene.fold * (np.arctan2(fy, fx) - scene.theta)) - 1))
    spec = amp * np.exp(2j * np.pi * rng.random(f.shape))
    x = np.fft.irfft2(spec, s=(size, size))
    return x / (x.std() + 1e-12)


def calib_inputs(spec: ViTSpec, task: str, seed: int) -> dict[str, np.ndarray]:
    """``CALIB_SAMPLES`` images drawn from the task's scene (``SCENES``; a task without one
    gets the street scene), normalised as an ImageNet-trained ViT expects: [N, 3, H, W]."""
    rng = np.random.default_rng(1000 + seed)
    scene = SCENES.get(task, SCENES["detect"])
    u = np.array([[1, -1, 0], [1, 1, -2]], np.float64) / np.array([[np.sqrt(2)], [np.sqrt(6)]])
    out = np.empty((CALIB_SAMPLES, 3, spec.image, spec.image), np.float32)
    for i in range(CALIB_SAMPLES):
        lum, c1, c2 = (_field(rng, spec.image, scene) for _ in range(3))
        rgb = np.asarray(scene.colour)[:, None, None] + scene.contrast * (
            lum[None] + scene.chroma * (u[0][:, None, None] * c1 + u[1][:, None, None] * c2))
        rgb = np.clip(rgb, 0.0, 1.0)
        out[i] = (rgb - np.asarray(IMAGENET_MEAN)[:, None, None]) / np.asarray(IMAGENET_STD)[:, None, None]
    return {"image": out}


def changed_blocks(a: dict[str, np.ndarray], b: dict[str, np.ndarray], block_bytes: int) -> tuple[int, int]:
    """(blocks that differ, total blocks), cutting each tensor's bytes as the pack does."""
    diff = total = 0
    for name, x in a.items():
        xa, xb = x.tobytes(), b[name].tobytes()
        for off in range(0, len(xa), block_bytes):
            total += 1
            diff += xa[off:off + block_bytes] != xb[off:off + block_bytes]
    return diff, total


def vit_graph(spec: ViTSpec, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    d, h = spec.dim, spec.heads
    nodes: list[onnx.NodeProto] = []
    counter = iter(range(1 << 30))

    def op(kind, inputs, **attrs):
        out = f"{kind.lower()}_{next(counter)}"
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def const(values, dtype=np.int64):
        out = f"const_{next(counter)}"
        nodes.append(helper.make_node("Constant", [], [out],
                                      value=numpy_helper.from_array(np.asarray(values, dtype=dtype))))
        return out

    def linear(x, prefix):
        return op("Add", [op("MatMul", [x, prefix + ".w"]), prefix + ".b"])

    def layernorm(x, prefix):
        return op("LayerNormalization", [x, prefix + ".g", prefix + ".b"], axis=-1, epsilon=1e-5)

    x = op("Conv", ["image", "patch.w", "patch.b"], kernel_shape=[spec.patch] * 2, strides=[spec.patch] * 2)
    x = op("Transpose", [op("Reshape", [x, const([0, d, -1])])], perm=[0, 2, 1])     # [N, T, D]
    x = op("Add", [x, "pos"])
    heads_shape, merge_shape = const([0, 0, h, d // h]), const([0, 0, d])
    scale = const(1.0 / np.sqrt(d // h), np.float32)
    half, one, rsqrt2 = const(0.5, np.float32), const(1.0, np.float32), const(1 / np.sqrt(2), np.float32)
    for i in range(spec.depth):
        y = layernorm(x, f"l{i}.ln1")
        q = op("Transpose", [op("Reshape", [linear(y, f"l{i}.attn.q"), heads_shape])], perm=[0, 2, 1, 3])
        k = op("Transpose", [op("Reshape", [linear(y, f"l{i}.attn.k"), heads_shape])], perm=[0, 2, 3, 1])
        v = op("Transpose", [op("Reshape", [linear(y, f"l{i}.attn.v"), heads_shape])], perm=[0, 2, 1, 3])
        att = op("Softmax", [op("Mul", [op("MatMul", [q, k]), scale])], axis=-1)         # [N, H, T, T]
        ctx = op("Reshape", [op("Transpose", [op("MatMul", [att, v])], perm=[0, 2, 1, 3]), merge_shape])
        x = op("Add", [x, linear(ctx, f"l{i}.attn.o")])
        y = linear(layernorm(x, f"l{i}.ln2"), f"l{i}.mlp.fc1")
        gelu = op("Mul", [op("Mul", [y, half]), op("Add", [one, op("Erf", [op("Mul", [y, rsqrt2])])])])
        x = op("Add", [x, linear(gelu, f"l{i}.mlp.fc2")])
    pooled = op("ReduceMean", [layernorm(x, "norm")], axes=[1], keepdims=0)              # [N, D]
    logits = linear(op("Relu", [linear(pooled, "head.fc1")]), "head.fc2")
    nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    graph = helper.make_graph(
        nodes, "edgert_demo_vit",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, spec.image, spec.image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", spec.classes])],
        [numpy_helper.from_array(a, name) for name, a in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgert.models.tasks")
    model.ir_version = 8
    return model


def build(out_dir: str, preset: str = "demo") -> dict[str, str]:
    """Write base.onnx and one ONNX file per task into out_dir; returns {name: path}."""
    spec = ViTSpec.from_name(preset)
    os.makedirs(out_dir, exist_ok=True)
    base = base_weights(spec)
    scales = block_scales(base, spec) if spec.block_sigma > 0 else {}
    paths, report = {}, {"preset": preset, "spec": asdict(spec), "scenes": _scenes(spec),
                         "tasks": {}}
    os.makedirs(os.path.join(out_dir, "calib"), exist_ok=True)
    for name, params in [("base", None), *spec.tasks.items()]:
        w = base if params is None else task_weights(base, spec, *params)
        if params is not None:
            np.savez(os.path.join(out_dir, "calib", f"{name}.npz"),
                     **calib_inputs(spec, name, params[0]))
        path = os.path.join(out_dir, f"{name}.onnx")
        with open(path + ".tmp", "wb") as f:
            f.write(vit_graph(spec, scaled(w, scales, spec.block_bytes)).SerializeToString())
        os.replace(path + ".tmp", path)
        paths[name] = path
        if params is not None:
            diff, total = changed_blocks(base, w, spec.block_bytes)   # scaling keeps equality
            report["tasks"][name] = {"changed_blocks": diff, "blocks": total, "changed_frac": diff / total}
    report["weight_bytes"] = sum(a.nbytes for a in base.values())
    with open(os.path.join(out_dir, "models.json"), "w") as f:
        json.dump(report, f, indent=1)
    return paths


def _scenes(spec: ViTSpec) -> dict:
    return {t: asdict(SCENES.get(t, SCENES["detect"])) for t in spec.tasks}


def ensure_built(out_dir: str, preset: str = "demo") -> dict[str, str]:
    """Build unless out_dir already holds this preset's models and calibration inputs."""
    spec = ViTSpec.from_name(preset)
    names = ["base", *spec.tasks]
    try:
        with open(os.path.join(out_dir, "models.json")) as f:
            built = json.load(f)
        same = [built.get("spec"), built.get("scenes")] == \
            json.loads(json.dumps([asdict(spec), _scenes(spec)]))
    except (OSError, ValueError):
        same = False
    paths = {n: os.path.join(out_dir, f"{n}.onnx") for n in names}
    calib = [os.path.join(out_dir, "calib", f"{n}.npz") for n in spec.tasks]
    if same and all(os.path.exists(p) for p in [*paths.values(), *calib]):
        return paths
    return build(out_dir, preset)


def ensure_task_pack(pack: str, models: str, preset: str = "demo") -> None:
    """Build the demo task models (the recipe's ``preset``) into ``models`` and pack them into
    ``pack``, saying what is written; an existing pack newer than its models is used as it is."""
    from ..errors import EdgertError
    from ..pack.onnx_import import pack_onnx
    from ..pack.writer import check_output
    check_output(pack)
    if os.path.isdir(models) and os.listdir(models) and \
            not os.path.exists(os.path.join(models, "models.json")):
        raise EdgertError(f"--models {models}: a directory with other files in it; the demo "
                          "writes five ONNX files (about 230 MB) there: name a new or a demo "
                          "directory")
    if not os.path.exists(os.path.join(models, "models.json")):
        print(f"building the demo task models into {models} (five ONNX files"
              f"{', about 230 MB' if preset == 'demo' else ''})")
    paths = ensure_built(models, preset)
    if os.path.exists(pack) and os.path.getmtime(pack) >= max(map(os.path.getmtime,
                                                                  paths.values())):
        return
    print(f"{'repacking (older than its models)' if os.path.exists(pack) else 'packing'} "
          f"{models} -> {pack}")
    pack_onnx(paths["base"], {k: v for k, v in paths.items() if k != "base"}, pack,
              block_size=ViTSpec.from_name(preset).block_bytes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/out/tasks")
    ap.add_argument("--preset", default="demo", choices=["demo", "sparse", "tiny"])
    args = ap.parse_args(argv)
    paths = build(args.out, args.preset)
    with open(os.path.join(args.out, "models.json")) as f:
        report = json.load(f)
    print(f"backbone weights: {report['weight_bytes'] / 1e6:.1f} MB float32 -> {args.out}")
    for name, r in report["tasks"].items():
        print(f"  {name:8s} {r['changed_blocks']:4d}/{r['blocks']} blocks differ from base "
              f"({100 * r['changed_frac']:.1f}%)  {paths[name]}")


if __name__ == "__main__":
    main()
