"""`edgert pack onnx --quant int8|qdq|int4`: ONNX Runtime's own quantizer on the base and
every task, with one set of options, before the quantized files are packed like float ones.

- ``int8``: dynamic quantization (``quantize_dynamic``): int8 weights, one scale and zero
  point per weight tensor computed from that tensor alone; activations are quantized at run
  time (MatMulInteger / ConvInteger), so no calibration.
- ``qdq``: static QDQ (``quantize_static``, QuantizeLinear/DequantizeLinear pairs): int8
  weights with per-tensor scales from the tensor itself, activations uint8 with scales from
  each task's ``--calib`` inputs (min/max). Activation scales are per task by necessity: a
  task's activations are its own. Biases stay float (``QuantizeBias: False``): ORT would
  quantize a bias with the input scale times the weight scale, so an unchanged bias would
  change with every task's calibration and stop being a shared block.
- ``int4``: weight-only 4-bit blocks (``MatMulNBitsQuantizer``, symmetric, ``group_size``
  inputs per scale, from the tensor itself) for every MatMul with a constant weight.

Quantization is lossy and opt-in: each task's output error against its float model is
measured and kept in the pack (config ``quant``). Tensors equal across tasks must stay shared
blocks after quantization; ``sharing`` checks it tensor by tensor and the pack records any
tensor for which it does not hold.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .format import block_hash
from .quant import QuantOptionError

log = logging.getLogger(__name__)

ONNX_QUANT = ("int8", "qdq", "int4")
DEFAULT_NBITS_GROUP = 32     # MatMulNBits' usual block; 4.5 bits per weight with fp32 scales


@dataclass
class OnnxQuant:
    mode: str
    group_size: int | None = None                       # int4 only
    calib: dict[str, str] = field(default_factory=dict)  # task -> FILE.npz (qdq: required)

    @property
    def group(self) -> int:
        return self.group_size or DEFAULT_NBITS_GROUP


def check_options(quant: OnnxQuant | None, tasks, *, align_tol: float = 0.0,
                  prune=None) -> None:
    """One line for a quantization option that cannot apply, before any model is read."""
    if quant is None:
        return
    if quant.mode not in ONNX_QUANT:
        raise QuantOptionError(f"--quant {quant.mode!r}: choose one of {', '.join(ONNX_QUANT)} "
                               f"(ONNX Runtime's dynamic int8, static QDQ int8, MatMulNBits "
                               f"4-bit)")
    g = quant.group_size
    if g is not None:
        if quant.mode != "int4":
            raise QuantOptionError(f"--group-size {g}: only --quant int4 has groups (int8 and "
                                   f"qdq use one scale per weight tensor)")
        if isinstance(g, bool) or not isinstance(g, int) or g < 16 or g & (g - 1):
            raise QuantOptionError(f"--group-size {g!r}: MatMulNBits takes a power of two "
                                   f">= 16 (e.g. 32, 64, 128)")
    if align_tol:
        raise QuantOptionError("--quant with --align-tol: alignment compares float blocks; "
                               "pack the quantized files without it")
    if prune is not None:
        raise QuantOptionError("--quant with --prune-blocks: prune the float models first, "
                               "then quantize (two packs)")
    unknown = sorted(set(quant.calib) - set(tasks))
    if unknown:
        raise QuantOptionError(f"--calib {unknown[0]}=...: no task {unknown[0]!r} "
                               f"(tasks: {', '.join(tasks)})")
    if quant.mode == "qdq":
        missing = [t for t in tasks if t not in quant.calib]
        if missing:
            raise QuantOptionError(f"--quant qdq needs calibration inputs for every task: add "
                                   f"--calib {missing[0]}=FILE.npz (arrays named by model input)")
    elif quant.calib:
        raise QuantOptionError(f"--calib with --quant {quant.mode}: only qdq calibrates "
                               f"(int8 and int4 take scales from the weights alone)")
    if quant.mode == "int4":
        _nbits_quantizer()                # a missing dependency is a one-liner now


def _nbits_quantizer():
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:
        raise QuantOptionError(f"--quant int4 needs ONNX Runtime's MatMulNBits quantizer, "
                               f"which failed to import ({e}); pip install onnx-ir") from None
    return MatMulNBitsQuantizer


class _Feeds:
    """ORT's CalibrationDataReader protocol over one dict of arrays (the whole batch once)."""

    def __init__(self, feeds: dict[str, np.ndarray]):
        self._left = [feeds]

    def get_next(self):
        return self._left.pop() if self._left else None

    def rewind(self):    # newer ORT calibrators may ask; one pass is all there is
        pass


def quantize_file(src, dst, quant: OnnxQuant, feeds: dict[str, np.ndarray] | None) -> None:
    """``src`` quantized by ONNX Runtime into ``dst``."""
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    if quant.mode == "int8":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    elif quant.mode == "qdq":
        quantize_static(str(src), str(dst), _Feeds(feeds), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=False, extra_options={"QuantizeBias": False})
    else:
        q = _nbits_quantizer()(onnx.load(str(src)), block_size=quant.group, is_symmetric=True)
        q.process()
        onnx.save(q.model.model, str(dst))


def quantize_files(base_path, tasks: dict[str, str | Path], quant: OnnxQuant, workdir,
                   ) -> tuple[Path, dict[str, Path], dict]:
    """The base and every task quantized into ``workdir`` with the same options:
    (base file, {task: file}, the record kept in the pack's config)."""
    import onnxruntime

    from .prune import load_calib
    from .reference import load_model
    workdir = Path(workdir)
    base_model = load_model(base_path)
    feeds = {t: load_calib(t, quant.calib[t], base_model) for t in quant.calib}
    out_base = workdir / "base.onnx"
    # NOTE: the base has no task of its own to calibrate with (qdq): it gets the first
    # task's inputs; its activation scales serve only as the reference the others share with
    quantize_file(base_path, out_base, quant, next(iter(feeds.values()), None))
    out_tasks, files = {}, {}
    for name, path in tasks.items():
        dst = workdir / f"task-{len(out_tasks)}.onnx"
        if Path(path).resolve() == Path(base_path).resolve():
            dst = out_base
        else:
            quantize_file(path, dst, quant, feeds.get(name))
        out_tasks[name], files[name] = dst, path
    shared = sharing({"<base>": base_path, **files}, {"<base>": out_base, **out_tasks})
    record = {"mode": quant.mode, "tool": f"onnxruntime {onnxruntime.__version__}",
              "group_size": quant.group if quant.mode == "int4" else None,
              "mismatched": shared["mismatched"],
              "tasks": {t: {"error": output_error(files[t], out_tasks[t], feeds.get(t)),
                            **shared["tasks"][t]} for t in tasks}}
    if shared["mismatched"]:
        log.warning("quantized tensors differ across tasks although their float sources are "
                    "equal: %s", ", ".join(shared["mismatched"]))
    return out_base, out_tasks, record


def source_of(qname: str, float_names) -> str | None:
    """The float initializer a quantized one came from, by ORT's naming (``W_quantized``,
    ``W_scale``, ``W_zero_point``, ``W_Q4``, ``W_scales``, ...), or None (an activation's
    quantization parameter)."""
    if qname in float_names:
        return qname
    best = None
    for f in float_names:
        if qname.startswith(f + "_") and (best is None or len(f) > len(best)):
            best = f
    return best


def _hashes(path) -> dict[str, bytes]:
    m = onnx.load(str(path))
    return {t.name: block_hash(np.ascontiguousarray(numpy_helper.to_array(t)).tobytes())
            + str(t.data_type).encode() + str(list(t.dims)).encode()
            for t in m.graph.initializer}


def sharing(floats: dict[str, object], quants: dict[str, object]) -> dict:
    """Per task, how many float and quantized initializers equal the base's, how many
    activation parameters (no float source) differ from the base's, and every quantized
    tensor whose float source is equal across models while it is not (``mismatched``)."""
    fh = {k: _hashes(p) for k, p in floats.items()}
    qh = {k: _hashes(p) for k, p in quants.items()}
    base = "<base>"
    seen: dict[tuple[str, bytes], bytes] = {}        # (qname, float source hash) -> q hash
    mismatched: set[str] = set()
    for k in quants:
        for q, h in qh[k].items():
            src = source_of(q, fh[k])
            if src is None:
                continue
            got = seen.setdefault((q, fh[k][src]), h)
            if got != h:
                mismatched.add(q)
    tasks = {}
    for k in quants:
        if k == base:
            continue
        acts = [q for q in qh[k] if source_of(q, fh[k]) is None]
        tasks[k] = {"float_equal_to_base": sum(fh[k][n] == fh[base].get(n) for n in fh[k]),
                    "float_tensors": len(fh[k]),
                    "quant_equal_to_base": sum(qh[k][n] == qh[base].get(n) for n in qh[k]),
                    "quant_tensors": len(qh[k]),
                    "activation_params_own": sum(qh[k][q] != qh[base].get(q) for q in acts)}
    return {"tasks": tasks, "mismatched": sorted(mismatched)}


def output_error(float_path, quant_path, feeds: dict[str, np.ndarray] | None) -> dict:
    """Relative L2 and max abs difference of the quantized model's outputs from the float
    model's, on ``feeds`` (the task's calibration inputs) or 3 random inputs."""
    import onnxruntime as ort

    from .reference import random_inputs
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sf = ort.InferenceSession(str(float_path), opts, providers=["CPUExecutionProvider"])
    sq = ort.InferenceSession(str(quant_path), opts, providers=["CPUExecutionProvider"])
    if feeds is None:
        rng = np.random.default_rng(0)
        model = onnx.load(str(float_path), load_external_data=False)
        runs = [random_inputs(model, rng) for _ in range(3)]
    else:
        runs = [feeds]
    num = den = worst = 0.0
    for f in runs:
        for a, b in zip(sf.run(None, f), sq.run(None, f)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            num += float(np.sum((a - b) ** 2))
            den += float(np.sum(a ** 2))
            if a.size:
                worst = max(worst, float(np.max(np.abs(a - b))))
    return {"rel_l2": (num / den) ** 0.5 if den else 0.0, "max_abs": worst,
            "inputs": "calibration" if feeds is not None else "3 random"}


def describe(record: dict) -> list[str]:
    """Lines for `edgert pack onnx` and `edgert inspect`."""
    extra = f", group {record['group_size']}" if record.get("group_size") else ""
    out = [f"quantized by {record['tool']}: {record['mode']}{extra}"]
    for t, r in record["tasks"].items():
        e = r["error"]
        out.append(f"  {t}: output rel. L2 error {e['rel_l2']:.4f}, max abs {e['max_abs']:.4g} "
                   f"({e['inputs']} inputs); tensors equal to the base: float "
                   f"{r['float_equal_to_base']}/{r['float_tensors']}, quantized "
                   f"{r['quant_equal_to_base']}/{r['quant_tensors']}"
                   + (f", own activation scales {r['activation_params_own']}"
                      if r["activation_params_own"] else ""))
    if record["mismatched"]:
        out.append(f"  NOT shared although their float sources are equal: "
                   f"{', '.join(record['mismatched'])}")
    return out

