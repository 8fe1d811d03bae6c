"""OnnxEngine: one ONNX Runtime session whose weights are bound from arena memory.

The pack stores the graph without initializer data (section ``onnx_skeleton``). The
engine turns every weight into a graph input, builds the session once, and binds each
input to an OrtValue over the arena view (IOBinding, zero copy on the CPU provider).
A task switch rewrites those bytes in place, so the session never changes.

Bound weights cost speed on the CPU provider: ORT pre-packs constant MatMul/Conv
weights at session build, and cannot for inputs. ``build_prepacked()`` makes a second
session with the current weights as constant initializers (ORT copies and pre-packs
them); the task model swaps it in once a task keeps running, and charges its memory to
the arena budget.

Working memory (activations, kernel scratch) is ORT's own, outside the arena. The engine
measures it (`measure_peak`: the process's peak resident growth over one run of zeros)
so the task model can charge it to the engine allowance, and runs with ORT's CPU memory
arena off, so what a large batch took is freed after the run; `give_back_heap()` then
returns the freed heap pages to the OS.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..errors import InputMismatch
from ..heap import give_back_heap

log = logging.getLogger(__name__)
ORT_PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "cpu": "CPUExecutionProvider"}
PLACEHOLDER = "edgert-arena"  # external-data location of initializers supplied from memory


def choose_providers(wanted) -> list[str]:
    """Config provider names (tensorrt, cuda, cpu) -> ORT providers present in this build."""
    have, out = set(ort.get_available_providers()), []
    for p in wanted:
        name = ORT_PROVIDERS[p]
        if name in have:
            out.append(name)
        else:
            log.warning("provider %s skipped: not in this onnxruntime build (%s)", p,
                        ", ".join(sorted(have)))
    if ORT_PROVIDERS["cpu"] not in out:
        out.append(ORT_PROVIDERS["cpu"])
    return out


# NOTE: how long an idle ORT worker of a spinning session spins before it sleeps. Long
# enough to catch the next op of the same run (ops follow each other within microseconds),
# far shorter than a scheduler time slice; measured on the demo ViT beside busy
# processes, 20-100 us kept the pre-packed session near one thread's latency where ORT's
# default spin doubled it (`edgert bench contention`)
SPIN_US: int | None = 50


def session_options(threads: int, spinning: bool = False) -> ort.SessionOptions:
    """ORT options for edgert's sessions.

    NOTE: idle ORT workers spin by default. The bound session (the one a switch rewrites)
    runs with spinning off: on a 2-4 core edge CPU spinning steals the core a task switch or
    the pre-packing thread needs right after a run. The pre-packed session, which serves a
    task that keeps running and is dropped before any switch, spins like a default session:
    without it, graphs of many small ops (a BERT-class encoder at 8-32 tokens) ran 1.2-1.3x
    slower than a default session here. It spins for ``SPIN_US`` only, then sleeps: a
    worker that spins for long holds a core another process needs, and waits for a core it
    does not get (`edgert bench contention`)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if spinning and SPIN_US is not None:
        opts.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
    # NOTE: ORT's CPU arena keeps every byte it grew for the largest batch it ever ran
    # (+3 GiB resident for good after 1783 images); without it tensors are malloc'd and
    # freed per run, at the same speed for the demo ViT here (6-7 ms per image either way)
    opts.enable_cpu_mem_arena = False
    return opts


@dataclass(frozen=True)
class ActivationCost:
    """Working memory of one run: ``fixed + items * per_item`` bytes."""
    fixed: int
    per_item: int

    def bytes(self, items: int) -> int:
        return self.fixed + items * self.per_item


class OnnxEngine:
    """Runs one graph with weights bound from ``weights`` (name -> arena view).

    ``weights`` must stay valid (and at the same address) for the engine's life; their
    contents may change between runs (that is a task switch).
    """

    def __init__(self, skeleton: bytes, weights: dict[str, np.ndarray], *,
                 providers=("cpu",), threads: int = 2):
        self.skeleton = onnx.ModelProto.FromString(skeleton)
        self.weights = weights
        self.threads = threads
        self.providers = choose_providers(providers)
        graph = self.skeleton.graph
        known = {vi.name for vi in graph.input}
        self.inputs = {vi.name: _spec(vi) for vi in graph.input if vi.name not in weights}
        self.outputs = [vi.name for vi in graph.output]
        outs = [_spec(vi)[1] for vi in graph.output]
        # a batch may be cut into pieces only where every input and output declares a
        # dynamic first dim, and the named ones agree (a fixed batch dim just runs)
        firsts = [sh[0] if sh else 1 for _, sh in self.inputs.values()] + \
                 [sh[0] if sh else 1 for sh in outs]
        named = {d for d in firsts if isinstance(d, str) and d != "?"}
        self.batch_axis = bool(firsts) and all(isinstance(d, str) for d in firsts) \
            and len(named) <= 1
        model = onnx.ModelProto()
        model.CopyFrom(self.skeleton)
        for name, arr in weights.items():
            if name not in known:
                model.graph.input.append(helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                            providers=self.providers)
        self.build_seconds = time.perf_counter() - t0
        self._report_fallback(self.session)
        self._binding = self.session.io_binding()
        self._weight_values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in weights.items()}
        for n, v in self._weight_values.items():   # NOTE: bound once; switches rewrite the bytes
            self._binding.bind_ortvalue_input(n, v)

    def _report_fallback(self, session: ort.InferenceSession) -> None:
        got = session.get_providers()
        lost = [p for p in self.providers if p not in got]
        if lost:
            log.warning("providers %s failed to initialise (no device or libraries); running on %s",
                        ", ".join(lost), ", ".join(got))

    @property
    def active_providers(self) -> list[str]:
        return self.session.get_providers()

    # --- inputs --------------------------------------------------------------------------
    def check_inputs(self, feeds: dict) -> dict[str, np.ndarray]:
        """Validated, C-contiguous inputs; InputMismatch names the first bad input."""
        if not isinstance(feeds, dict):
            raise InputMismatch(f"inputs must be a dict name -> array, got {type(feeds).__name__}")
        for name in feeds:
            if name not in self.inputs:
                raise InputMismatch(f"unknown input {name!r}; the graph takes "
                                    f"{', '.join(_fmt(n, s) for n, s in self.inputs.items())}")
        out = {}
        for name, (dtype, shape) in self.inputs.items():
            if name not in feeds:
                raise InputMismatch(f"missing input {_fmt(name, (dtype, shape))}")
            arr = np.asarray(feeds[name])
            if arr.dtype != dtype:
                raise InputMismatch(f"input {name!r} has dtype {arr.dtype}, expected {dtype}")
            if arr.ndim != len(shape) or any(isinstance(d, int) and d != a
                                             for d, a in zip(shape, arr.shape)):
                raise InputMismatch(f"input {name!r} has shape {tuple(arr.shape)}, expected "
                                    f"[{', '.join(str(d) for d in shape)}]")
            if arr.size == 0:
                raise InputMismatch(f"input {name!r} is empty (shape {tuple(arr.shape)}): "
                                    "a batch needs at least one item")
            out[name] = np.ascontiguousarray(arr)
        return out

    # --- running -------------------------------------------------------------------------
    def items(self, feeds: dict[str, np.ndarray]) -> int:
        """How many batch items checked ``feeds`` hold (1 without a batch axis);
        InputMismatch when the inputs disagree."""
        if not self.batch_axis:
            return 1
        sizes = {name: arr.shape[0] for name, arr in feeds.items()}
        if len(set(sizes.values())) > 1:
            raise InputMismatch("inputs disagree on the batch size (first dim): " + ", ".join(
                f"{n!r} {b}" for n, b in sizes.items()))
        return next(iter(sizes.values()))

    def shape_key(self, feeds: dict[str, np.ndarray]) -> tuple:
        """What working memory per item depends on: the shapes less the batch dim."""
        cut = 1 if self.batch_axis else 0
        return tuple(tuple(feeds[n].shape[cut:]) for n in self.inputs)

    def declared_key(self) -> tuple | None:
        """``shape_key`` of the graph's own shapes; None when a non-batch dim is dynamic."""
        cut = 1 if self.batch_axis else 0
        key = tuple(tuple(sh[cut:]) for _, sh in self.inputs.values())
        return key if all(isinstance(d, int) for sh in key for d in sh) else None

    def input_bytes(self, key: tuple) -> int:
        """Bytes of one item's inputs of the shapes in ``key`` (what sizes a probe)."""
        return sum(dt.itemsize * int(np.prod(sh)) for (dt, _), sh in zip(self.inputs.values(), key))

    def zeros(self, key: tuple, items: int) -> dict[str, np.ndarray]:
        """Inputs of ``items`` items (or the declared batch) of the shapes in ``key``."""
        out = {}
        for (name, (dt, _)), rest in zip(self.inputs.items(), key):
            out[name] = np.zeros(((items,) + rest) if self.batch_axis else rest, dt)
        return out

    def measure_peak(self, key: tuple, items: int) -> int:
        """Peak resident bytes the process grows by over one run of ``items`` zero items
        (shapes ``key``): activations, kernel scratch and outputs. NOTE: the peak is the
        process's; another thread's work at the same moment can only be added to it,
        except for memory freed meanwhile, which the caller's margin covers."""
        feeds = self.zeros(key, items)
        with _PROBE_LOCK:
            give_back_heap()
            grown = _peak_growth(lambda: self.run_checked(feeds))
            give_back_heap()
        return grown

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        """Run with the bound (arena) weights."""
        return self.run_checked(self.check_inputs(feeds))

    def run_checked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``run`` of inputs already checked by `check_inputs`."""
        for name, arr in feeds.items():
            self._binding.bind_cpu_input(name, arr)
        for name in self.outputs:
            self._binding.bind_output(name)
        self.session.run_with_iobinding(self._binding)
        return dict(zip(self.outputs, self._binding.copy_outputs_to_cpu()))

    def build_prepacked(self) -> "PrepackedSession":
        """A session with the current weights as constant initializers (ORT copies them).
        The weights must not change while this runs; the caller discards the result if
        they did."""
        return PrepackedSession(self)


class PrepackedSession:
    """A full-speed session of one task's weights, built from the skeleton and the arena."""

    def __init__(self, engine: OnnxEngine):
        model = onnx.ModelProto()
        model.CopyFrom(engine.skeleton)
        for name, arr in engine.weights.items():
            t = model.graph.initializer.add()
            t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(arr.dtype)
            t.dims.extend(arr.shape)
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value=PLACEHOLDER)
        opts = session_options(engine.threads, spinning=True)
        names = list(engine.weights)
        opts.add_external_initializers(names, [engine._weight_values[n] for n in names])
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(model.SerializeToString(), opts,
                                            providers=engine.providers)
        self.build_seconds = time.perf_counter() - t0
        self.outputs = engine.outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` already checked by the engine."""
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))


_PROBE_LOCK = threading.Lock()   # the peak counter is the process's: one probe at a time
SAMPLE_S = 0.0005                # RSS sampling period where the peak counter cannot be reset


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _peak_growth(fn) -> int:
    """Peak resident growth of this process while ``fn()`` runs: the kernel's high-water
    mark, reset first (Linux >= 4.0); else RSS sampled every ``SAMPLE_S``."""
    base = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                 # VmHWM := VmRSS
        fn()
        return max(0, _status("VmHWM") - base)
    except PermissionError:
        pass
    peak, stop = [base], threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            peak[0] = max(peak[0], _status("VmRSS"))
    t = threading.Thread(target=sample, daemon=True, name="edgert-rss-probe")
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return max(0, max(peak[0], _status("VmRSS")) - base)


def _spec(vi: onnx.ValueInfoProto) -> tuple[np.dtype, tuple]:
    t = vi.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in t.shape.dim)
    return np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)), dims


def _fmt(name: str, spec) -> str:
    dtype, shape = spec
    return f"{name!r} ({dtype}[{', '.join(str(d) for d in shape)}])"
