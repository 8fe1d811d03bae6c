"""`edgert run` (one task of a pack on .npy inputs) and `edgert demo` (a switching session)."""
from __future__ import annotations

import os
import time

import numpy as np

from ..errors import InputMismatch
from .arguments import named

DEMO_SEQUENCE = ["lane", "sign", "detect", "parking", "lane", "parking", "sign"]


def register(sub) -> None:
    r = sub.add_parser("run", help="run one task of an onnx-tasks pack on .npy inputs",
                       description="Load PACK, switch to TASK and run it once on .npy inputs "
                       "(`edgert inspect PACK` lists the inputs).")
    r.add_argument("pack", help="an onnx-tasks .edgepack file")
    r.add_argument("--task", required=True, help="the task to run")
    r.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="one per graph input, e.g. image=x.npy")
    r.add_argument("--output", metavar="OUT.npz", help="write the outputs here")
    r.add_argument("--config", help="device config: a shipped name or a YAML path "
                   "(default: cpu-dev; `edgert configs` lists them)")
    r.set_defaults(func=_run)
    d = sub.add_parser("demo", help="build, pack and run the demo task models: per-switch cost "
                                    "beside a fresh ONNX Runtime session")
    d.add_argument("--pack", help="the pack to use, built from --models if missing or older "
                   "(default: models/out/tasks.edgepack under the current directory)")
    d.add_argument("--models", help="where the demo task models are, built there if missing "
                   "(default: models/out/tasks under the current directory)")
    d.add_argument("--config", help="device config: a shipped name or a YAML path "
                   "(default: cpu-dev)")
    d.add_argument("--quick", action="store_true",
                   help="the tiny variant of the demo models (seconds; default paths "
                        "models/out/tasks-tiny[.edgepack]): checks an install, not a figure")
    d.set_defaults(func=_demo)


def _inputs(specs: list[str]) -> dict[str, np.ndarray]:
    out = {}
    try:
        paths = named(specs, "--input", "NAME=FILE.npy")
    except ValueError as e:
        raise InputMismatch(str(e)) from None
    for name, path in paths.items():
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputMismatch(f"--input {name}: cannot read {path}: {e}") from None
        if not isinstance(arr, np.ndarray):          # an .npz archive: several arrays
            keys = ", ".join(arr.files)
            arr.close()
            raise InputMismatch(f"--input {name}: {path} is an .npz archive (arrays {keys}); "
                                f"give one .npy file per input (numpy.save)")
        out[name] = arr
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
    print(f"task {m.active}: loaded {_mib(m.stats()['load']['bytes_read'])}, ran in {ms:.1f} ms")
    if args.output:
        np.savez(args.output, **out)
        print(f"wrote {args.output}")
    m.close()
    return 0


def _fresh_session_ms(path: str, x: np.ndarray, threads: int) -> float:
    """What users do today: a new ONNX Runtime session from the task file, then one run."""
    import onnxruntime as ort
    from ..engines.onnx_engine import session_options
    t0 = time.perf_counter()
    s = ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
    s.run(None, {s.get_inputs()[0].name: x})
    return 1e3 * (time.perf_counter() - t0)


def _demo(args) -> int:
    from ..recipes.tasks import ensure_task_pack
    from ..runtime import Runtime
    tag = "-tiny" if args.quick else ""
    if args.pack is None:
        args.pack = f"models/out/tasks{tag}.edgepack"
        os.makedirs("models/out", exist_ok=True)
    args.models = args.models or f"models/out/tasks{tag}"
    ensure_task_pack(args.pack, args.models, "tiny" if args.quick else "demo")
    rt = Runtime(args.config)
    m = rt.load(args.pack, prepack="auto")
    st = m.stats()
    print(f"loaded {args.pack} on {rt.config.name} in {1e3 * st['load']['seconds']:.0f} ms "
          f"(the first task, {m.active}, read in full: {_mib(st['load']['bytes_read'])}); tasks "
          f"{', '.join(m.tasks)}; dense task {_mib(m.dense_bytes)}; arena "
          f"{_mib(rt.arena.mapped)} shared by every model ({st['storage']['mode']} reads)")
    name, (dtype, shape) = next(iter(m.engine.inputs.items()))
    x = np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 1 for d in shape]).astype(dtype)
    # NOTE: the first session of a process also pays ONNX Runtime's one-time start-up
    # (environment, thread pools, kernel registry); measured apart, so the first switch's
    # ratio compares like with like
    startup = _fresh_session_ms(os.path.join(args.models, f"{m.tasks[0]}.onnx"), x,
                                rt.config.threads)
    fresh = {t: _fresh_session_ms(os.path.join(args.models, f"{t}.onnx"), x, rt.config.threads)
             for t in m.tasks}
    print("what users do today, a fresh ONNX Runtime session from the task file + its first "
          "run: " + ", ".join(f"{t} {v:.0f} ms" for t, v in fresh.items()) +
          f" (the process's first session took {startup:.0f} ms: it also pays ONNX Runtime's "
          "one-time start-up, left out of the ratios)")
    print("\ncolumns: switch = edgert's switch alone; moved = bytes written into the task's "
          "weights; from spare/pack = blocks copied from spare memory / read from the pack; "
          "1st run = the first inference after it; edgert = switch + 1st run; fresh = a new "
          "session + its first run; ratio = fresh / edgert (like with like)")
    print(f"\n{'switch':18s} {'switch':>9s} {'moved':>10s} {'from spare/pack':>16s} "
          f"{'1st run':>8s} {'edgert':>9s} {'fresh':>8s} {'ratio':>6s}")
    prev, ratios = m.active, []
    seq = [t for t in DEMO_SEQUENCE if t in m.tasks] or m.tasks
    seq = seq[1:] if seq[0] == m.active else seq
    for i, t in enumerate(seq):
        if i == len(seq) // 2:
            p = m.prewarm([u for u in m.tasks if u != m.active])
            print(f"-- prewarm the other tasks: {p['resident']} of the blocks they need are now "
                  f"in spare memory ({_mib(p['bytes_read'])} read from the pack for it)")
        r = m.switch(t)
        t0 = time.perf_counter()
        m.run({name: x})
        run_ms = 1e3 * (time.perf_counter() - t0)
        ours = 1e3 * r.seconds + run_ms
        ratios.append(fresh[t] / ours)
        print(f"{prev + ' -> ' + t:18s} {1e3 * r.seconds:6.2f} ms {_mib(r.bytes_moved):>10s} "
              f"{r.from_cache:7d}/{r.from_storage:<8d} {run_ms:5.1f} ms {ours:6.1f} ms "
              f"{fresh[t]:5.0f} ms {ratios[-1]:5.1f}x")
        prev = t
    for _ in range(5):
        m.run({name: x})
    m.wait_prepacked(timeout=30)
    st = m.stats()
    print(f"\n{st['switches']} switches (the load is not one): median switch "
          f"{st['switch_ms']['p50']:.2f} ms; switch + first run vs a fresh session + first run: "
          f"median {np.median(ratios):.1f}x; {_mib(st['bytes_moved'])} moved, "
          f"{_mib(st['bytes_read'])} read from the pack")
    print(f"task {m.active} kept running ({PREPACK_NOTE}): pre-packed session "
          f"{'swapped in' if st['engine']['prepacked'] else 'not built'}; the model holds "
          f"{_mib(st['memory']['arena_bytes'])} of the arena ({_mib(st['memory']['reclaimable_bytes'])}"
          f" of it spare blocks that another model's load may reclaim), engine memory "
          f"{_mib(st['memory']['engine_bytes'])} (budget {_mib(rt.config.budget.total)})")
    m.close()
    return 0


PREPACK_NOTE = ("after 3 runs of one task, ONNX Runtime builds a session with that task's "
                "weights pre-packed, in the background, and edgert swaps it in")


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"
