"""Protocol v1 of the device service: the only module that touches raw frames.

A message is a list of frames: ``[envelope, *arrays]``.

    request  {"v": 1, "id": int, "op": str, "args": map}
    reply    {"v": 1, "id": int | nil, "ok": bool, "more": bool,
              "result": any}                              when ok
              "error": {"code": str, "message": str}      when not ok
              "beat": true                                a keep-alive for a request still at work

The envelope is msgpack. An array anywhere in ``args`` or ``result`` travels as the map
``{"__nd__": k, "dtype": str, "shape": [int, ...]}`` naming raw frame ``1 + k``: C-order,
little-endian bytes, sent without copying and received as a read-only numpy view of the
frame (copied only when the frame is not aligned for the dtype). A stream is several
replies with one id and ``more: true`` (each carrying a list of pieces), then a final one
with ``more: false``.
Nothing is ever pickled; everything is checked before it is used (sizes first, then the
msgpack limits, then every field). docs/protocol.md is the same contract for people.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgpack
import numpy as np

from ..errors import (BudgetExceeded, ConfigError, EdgertError, InputMismatch, ModelClosed,
                      PackCorrupt, UnknownTask, UnsupportedModel)

PROTOCOL = 1
ND = "__nd__"

# Limits, checked before any work. A peer that breaks one gets an error reply.
MAX_ENVELOPE = 1 << 20      # bytes of msgpack; a prompt of ~1 MB of text is the largest need
MAX_ITEMS = 1 << 16         # elements of one msgpack array (token ids of a prompt)
MAX_KEYS = 256              # entries of one msgpack map (inputs, load options)
MAX_DEPTH = 8               # nesting of args; the deepest real request is 4
MAX_ARRAYS = 64             # array frames in one message
MAX_NDIM = 16
MAX_MESSAGE = 256 << 20     # bytes of one frame (ZMQ_MAXMSGSIZE); a batch of 1080p frames fits
MAX_REPLY_ENVELOPE = 64 << 20   # a client reads replies of a service it trusts: stats can be large

# Arrays: name -> numpy dtype (little-endian). bfloat16 has no numpy dtype; send uint16.
DTYPES = {name: np.dtype(name).newbyteorder("<") for name in (
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "float32", "float64")}

# Error codes. A reply's code is one of these; clients may rely on them.
CODES = ("bad_request", "version", "unknown_op", "too_large", "busy", "forbidden",
         "unknown_model", "unknown_task", "input_mismatch", "budget_exceeded", "pack_corrupt",
         "model_closed", "unsupported_model", "config", "failed", "cancelled",
         "shutting_down", "reloaded", "unregistered", "internal")


class ProtocolError(EdgertError):
    """A message that breaks the protocol, or a request the service refuses; ``code`` is
    one of CODES."""

    def __init__(self, code: str, message: str):
        assert code in CODES, code
        super().__init__(message)
        self.code, self.message = code, message


# NOTE: order matters: the first matching type names the code (subclasses first).
_EXC_CODES = ((ProtocolError, None), (UnknownTask, "unknown_task"),
              (InputMismatch, "input_mismatch"), (BudgetExceeded, "budget_exceeded"),
              (PackCorrupt, "pack_corrupt"), (ModelClosed, "model_closed"),
              (UnsupportedModel, "unsupported_model"), (ConfigError, "config"),
              (EdgertError, "failed"), (ValueError, "bad_request"))


def error_code(exc: BaseException) -> str:
    """The reply code for an exception raised while serving a request."""
    for t, code in _EXC_CODES:
        if isinstance(exc, t):
            return exc.code if code is None else code
    return "internal"


@dataclass
class Request:
    id: int
    op: str
    args: dict
    nbytes: int = 0        # bytes of all frames, for the service's queue accounting


@dataclass
class Reply:
    id: int | None
    ok: bool
    more: bool = False
    result: object = None
    code: str = ""
    message: str = ""
    beat: bool = False
    retry_after_s: float | None = None     # with "busy": when a retry may be admitted
    arrays: list = field(default_factory=list, repr=False)


# --- encoding ---------------------------------------------------------------------------------
def encode_request(rid: int, op: str, args: dict | None = None) -> list:
    """Frames of a request: the envelope, then one frame per array found in ``args``."""
    arrays: list = []
    env = {"v": PROTOCOL, "id": rid, "op": op, "args": _lift(args or {}, arrays)}
    return [msgpack.packb(env, use_bin_type=True), *arrays]


def encode_reply(rid: int | None, result=None, *, more: bool = False) -> list:
    arrays: list = []
    env = {"v": PROTOCOL, "id": rid, "ok": True, "more": more, "result": _lift(result, arrays)}
    return [msgpack.packb(env, use_bin_type=True), *arrays]


def encode_error(rid: int | None, code: str, message: str,
                 retry_after_s: float | None = None) -> list:
    assert code in CODES, code
    err = {"code": code, "message": message}
    if retry_after_s is not None:
        err["retry_after_s"] = float(retry_after_s)
    env = {"v": PROTOCOL, "id": rid, "ok": False, "more": False, "error": err}
    return [msgpack.packb(env, use_bin_type=True)]


def encode_beat(rid: int) -> list:
    return [msgpack.packb({"v": PROTOCOL, "id": rid, "ok": True, "more": True, "beat": True})]


def _lift(obj, arrays: list):
    """``obj`` with every numpy array replaced by its descriptor (appended to ``arrays``),
    numpy scalars made plain, tuples made lists and map keys made strings."""
    if isinstance(obj, np.ndarray):
        name = obj.dtype.name
        if name not in DTYPES:
            raise ProtocolError("bad_request", f"arrays of dtype {obj.dtype} cannot travel; "
                                f"allowed: {', '.join(DTYPES)}")
        if len(arrays) >= MAX_ARRAYS:
            raise ProtocolError("too_large", f"more than {MAX_ARRAYS} arrays in one message")
        a = obj.astype(DTYPES[name], order="C", copy=False)    # copies only when it must
        arrays.append(a.reshape(-1).view(np.uint8) if a.size else b"")
        return {ND: len(arrays) - 1, "dtype": name, "shape": list(a.shape)}
    if isinstance(obj, dict):
        return {str(k): _lift(v, arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_lift(v, arrays) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    return str(obj)     # stats may hold enums, paths, dataclasses: their text is enough


# --- decoding ---------------------------------------------------------------------------------
def decode_request(frames: list) -> Request:
    """Check and decode the frames of a request (zmq.Frame, bytes or buffers).
    ProtocolError names the first problem; the request id is attached when it was read."""
    env, rid = _envelope(frames, MAX_ENVELOPE)
    if "op" not in env or "args" not in env:
        raise _with_id(ProtocolError("bad_request", "a request needs 'v', 'id', 'op', 'args'"),
                       rid)
    op, args = env["op"], env["args"]
    if not isinstance(op, str) or not op:
        raise _with_id(ProtocolError("bad_request", "'op' must be a non-empty string"), rid)
    if not isinstance(args, dict):
        raise _with_id(ProtocolError("bad_request", "'args' must be a map"), rid)
    extra = set(env) - {"v", "id", "op", "args"}
    if extra:
        raise _with_id(ProtocolError("bad_request", f"unknown envelope keys: "
                                     f"{', '.join(sorted(map(str, extra)))}"), rid)
    try:
        used: set[int] = set()
        args = _lower(args, frames, used, 0)
        if len(used) != len(frames) - 1:
            raise ProtocolError("bad_request", f"{len(frames) - 1} array frames sent, "
                                f"{len(used)} named in args")
    except ProtocolError as e:
        raise _with_id(e, rid) from None
    return Request(rid, op, args, sum(_nbytes(f) for f in frames))


def decode_reply(frames: list) -> Reply:
    env, rid = _envelope(frames, MAX_REPLY_ENVELOPE)
    if not isinstance(env.get("ok"), bool) or not isinstance(env.get("more", False), bool):
        raise ProtocolError("bad_request", "a reply needs a boolean 'ok' and 'more'")
    if env.get("beat"):
        return Reply(rid, True, more=True, beat=True)
    if env["ok"]:
        return Reply(rid, True, more=env.get("more", False),
                     result=_lower(env.get("result"), frames, set(), 0))
    err = env.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("code"), str):
        raise ProtocolError("bad_request", "an error reply needs 'error': {code, message}")
    retry = err.get("retry_after_s")
    retry = float(retry) if isinstance(retry, (int, float)) and not isinstance(retry, bool) \
        and math.isfinite(retry) and retry >= 0 else None
    return Reply(rid, False, code=err["code"], message=str(err.get("message", "")),
                 retry_after_s=retry)




def _envelope(frames: list, limit: int) -> tuple[dict, int | None]:
    if not frames:
        raise ProtocolError("bad_request", "an empty message")
    buf = _buffer(frames[0])
    if len(buf) > limit:
        raise ProtocolError("too_large", f"envelope of {len(buf)} bytes; at most {limit}")
    try:
        env = msgpack.unpackb(buf, raw=False, strict_map_key=True, use_list=True,
                              max_str_len=limit, max_bin_len=limit, max_array_len=MAX_ITEMS,
                              max_map_len=MAX_KEYS, max_ext_len=0)
    except Exception as e:   # msgpack raises many types (ExtraData, FormatError, ValueError...)
        raise ProtocolError("bad_request", f"the envelope is not valid msgpack "
                            f"({type(e).__name__})") from None
    if not isinstance(env, dict):
        raise ProtocolError("bad_request", "the envelope must be a msgpack map")
    rid = env.get("id")
    rid = rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 1 << 63 \
        else None
    v = env.get("v")
    if v != PROTOCOL:
        raise _with_id(ProtocolError("version", f"protocol version {v!r}; this side speaks "
                                     f"{PROTOCOL}"), rid)
    if rid is None and env.get("id") is not None:
        raise ProtocolError("bad_request", "'id' must be an integer in [0, 2**63)")
    if rid is None and "op" in env:
        raise ProtocolError("bad_request", "a request needs an integer 'id'")
    if len(frames) - 1 > MAX_ARRAYS:        # NOTE: after the id is read, so the refusal has it
        raise _with_id(ProtocolError("too_large", f"{len(frames) - 1} array frames; at most "
                                     f"{MAX_ARRAYS}"), rid)
    return env, rid


def _lower(obj, frames: list, used: set, depth: int):
    """``obj`` with every array descriptor replaced by a view of its frame; checks types."""
    if depth > MAX_DEPTH:
        raise ProtocolError("bad_request", f"nested deeper than {MAX_DEPTH}")
    if isinstance(obj, dict):
        if ND in obj:
            return _array(obj, frames, used)
        return {k: _lower(v, frames, used, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_lower(v, frames, used, depth + 1) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str, bytes)):
        return obj
    if isinstance(obj, float):
        return obj
    raise ProtocolError("bad_request", f"values of type {type(obj).__name__} are not allowed")


def _array(desc: dict, frames: list, used: set) -> np.ndarray:
    k, dtype, shape = desc.get(ND), desc.get("dtype"), desc.get("shape")
    if set(desc) != {ND, "dtype", "shape"}:
        raise ProtocolError("bad_request", "an array is {__nd__, dtype, shape} and nothing else")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(frames) - 1:
        raise ProtocolError("bad_request", f"array frame {k!r} does not exist "
                            f"({len(frames) - 1} array frames)")
    if k in used:
        raise ProtocolError("bad_request", f"array frame {k} is named twice")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError("bad_request", f"dtype {dtype!r} is not allowed; allowed: "
                            f"{', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise ProtocolError("bad_request", f"shape must be a list of at most {MAX_NDIM} "
                            "non-negative integers")
    dt = DTYPES[dtype]
    if dt.itemsize * math.prod(d for d in shape if d) > MAX_MESSAGE:
        raise ProtocolError("bad_request", f"shape {shape} is larger than any message")
    want = dt.itemsize * math.prod(shape)       # Python ints: a huge shape cannot overflow
    buf = _buffer(frames[1 + k])
    if len(buf) != want:
        raise ProtocolError("bad_request", f"array frame {k} holds {len(buf)} bytes; "
                            f"{dtype}{shape} needs {want}")
    used.add(k)
    arr = np.frombuffer(buf.toreadonly(), dtype=dt).reshape(tuple(shape))
    if not arr.flags.aligned:
        arr = arr.copy()
        arr.flags.writeable = False
    return arr


def _buffer(frame) -> memoryview:
    buf = getattr(frame, "buffer", None)            # zmq.Frame: no copy
    return (buf if buf is not None else memoryview(frame)).cast("B")


def _nbytes(frame) -> int:
    return len(_buffer(frame))


def _with_id(e: ProtocolError, rid: int | None) -> ProtocolError:
    e.id = rid
    return e


def failure_id(e: ProtocolError) -> int | None:
    """The request id a ProtocolError from decode_request belongs to (None if unread)."""
    return getattr(e, "id", None)
