"""`edgert run` (one task of a pack on .npy inputs) and `edgert demo` (a switching session)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import InputMismatch

DEMO_SEQUENCE = ["lane", "sign", "detect", "parking", "lane", "parking", "sign"]


def register(sub) -> None:
    r = sub.add_parser("run", help="run one task of an onnx-tasks pack on .npy inputs")
    r.add_argument("pack")
    r.add_argument("--task", required=True)
    r.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    r.add_argument("--output", metavar="OUT.npz", help="write the outputs here")
    r.add_argument("--config", help="device config YAML (default: cpu-dev)")
    r.set_defaults(func=_run)
    d = sub.add_parser("demo", help="build, pack and run the demo task models: per-switch cost "
                                    "beside a fresh ONNX Runtime session")
    d.add_argument("--pack", default="models/out/tasks.edgepack")
    d.add_argument("--models", default="models/out/tasks")
    d.add_argument("--config", help="device config YAML (default: cpu-dev)")
    d.set_defaults(func=_demo)


def _inputs(specs: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise InputMismatch(f"--input {s!r}: expected NAME=FILE.npy")
        try:
            out[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputMismatch(f"--input {name}: cannot read {path}: {e}") from None
    return out


def _run(args) -> int:
    from ..runtime import Runtime
    rt = Runtime(args.config)
    m = rt.load(args.pack, task=args.task, prepack="off")
    t0 = time.perf_counter()
    out = m.run(_inputs(args.input))
    ms = 1e3 * (time.perf_counter() - t0)
    for name, arr in out.items():
        print(f"{name}: {arr.dtype}{list(arr.shape)}  mean {arr.mean():.6g}  max {arr.max():.6g}")
    print(f"task {m.active}: loaded {m.stats()['bytes_read'] / 1e6:.1f} MB, ran in {ms:.1f} ms")
    if args.output:
        np.savez(args.output, **out)
        print(f"wrote {args.output}")
    m.close()
    return 0


def _ensure_pack(pack: str, models: str) -> None:
    root = Path(__file__).resolve().parents[2]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from models.tasks.build import ensure_built
    from ..pack.onnx_import import pack_onnx
    paths = ensure_built(models)
    if os.path.exists(pack) and os.path.getmtime(pack) >= max(map(os.path.getmtime,
                                                                  paths.values())):
        return
    print(f"packing {models} -> {pack}")
    pack_onnx(paths["base"], {k: v for k, v in paths.items() if k != "base"}, pack)


def _fresh_session_ms(path: str, x: np.ndarray, threads: int) -> float:
    """What users do today: a new ONNX Runtime session from the task file, then one run."""
    import onnxruntime as ort
    from ..engines.onnx_engine import session_options
    t0 = time.perf_counter()
    s = ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
    s.run(None, {s.get_inputs()[0].name: x})
    return 1e3 * (time.perf_counter() - t0)


def _demo(args) -> int:
    from ..runtime import Runtime
    _ensure_pack(args.pack, args.models)
    rt = Runtime(args.config)
    m = rt.load(args.pack, prepack="auto")
    st = m.stats()
    print(f"loaded {args.pack} on {rt.config.name}: tasks {', '.join(m.tasks)}; dense task "
          f"{m.dense_bytes / 1e6:.1f} MB in a run of {st['run_bytes'] / 1e6:.1f} MB; arena "
          f"{rt.arena.mapped / 1e6:.0f} MB shared by every model ({st['storage']['mode']} reads)")
    name, (dtype, shape) = next(iter(m.engine.inputs.items()))
    x = np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 1 for d in shape]).astype(dtype)
    fresh = {t: _fresh_session_ms(os.path.join(args.models, f"{t}.onnx"), x, rt.config.threads)
             for t in m.tasks}
    print("fresh ONNX Runtime session from the task file + first run (what users do today): "
          + ", ".join(f"{t} {v:.0f} ms" for t, v in fresh.items()))
    print(f"\n{'switch':18s} {'latency':>9s} {'moved':>9s} {'cache/storage':>14s} "
          f"{'1st run':>8s} {'fresh ORT':>10s} {'speed-up':>9s}")
    prev, ratios = m.active, []
    seq = [t for t in DEMO_SEQUENCE if t in m.tasks] or m.tasks
    for i, t in enumerate(seq):
        if i == len(seq) // 2:
            p = m.prewarm([u for u in m.tasks if u != m.active])
            print(f"-- prewarm the other tasks: {p['resident']} blocks, "
                  f"{p['bytes_read'] / 1e6:.1f} MB read into spare slots")
        r = m.switch(t)
        t0 = time.perf_counter()
        m.run({name: x})
        run_ms = 1e3 * (time.perf_counter() - t0)
        ratios.append(fresh[t] / (1e3 * r.seconds))
        print(f"{prev + ' -> ' + t:18s} {1e3 * r.seconds:7.2f} ms {r.bytes_moved / 1e6:6.2f} MB "
              f"{r.from_cache:6d}/{r.from_storage:<7d} {run_ms:5.1f} ms {fresh[t]:7.0f} ms "
              f"{ratios[-1]:8.0f}x")
        prev = t
    for _ in range(5):
        m.run({name: x})
    m.wait_prepacked(timeout=30)
    st = m.stats()
    print(f"\nmedian switch {st['switch_ms']['p50']:.2f} ms vs a fresh session "
          f"{np.median(list(fresh.values())):.0f} ms: {np.median(ratios):.0f}x faster; "
          f"{st['bytes_moved'] / 1e6:.1f} MB moved in {st['switches']} switches, "
          f"{st['bytes_read'] / 1e6:.1f} MB read from storage")
    print(f"task {m.active} kept running: pre-packed session "
          f"{'swapped in' if st['engine']['prepacked'] else 'not built'}; holds "
          f"{st['memory']['arena_bytes'] / 1e6:.1f} MB of the arena "
          f"({st['memory']['reclaimable_bytes'] / 1e6:.1f} MB of it spare blocks others may "
          f"reclaim), engine {st['memory']['engine_bytes'] / 1e6:.1f} MB (budget "
          f"{rt.config.budget.total / 1e6:.0f} MB)")
    m.close()
    return 0
