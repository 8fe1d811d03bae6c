"""Protocol v1 (edgert/control/protocol.py): frames in and out, limits, and fuzzing of the
decoder: whatever the bytes, it answers a Request or a ProtocolError, nothing else."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgert
from edgert.control import protocol as P
from edgert.control.client import RemoteError, remote_error
from edgert.errors import BudgetExceeded, InputMismatch, ModelClosed, PackCorrupt, UnknownTask


def env(**kw) -> bytes:
    doc = {"v": 1, "id": 7, "op": "health", "args": {}}
    doc.update(kw)
    return msgpack.packb({k: v for k, v in doc.items() if v is not ...})


def refused(frames, code="bad_request") -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as e:
        P.decode_request(frames)
    assert e.value.code == code, e.value
    return e.value


@pytest.mark.parametrize("dtype", list(P.DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4)])
def test_arrays_round_trip_every_dtype(dtype, shape):
    rng = np.random.default_rng(0)
    a = np.asarray(rng.standard_normal(shape) * 10).astype(dtype)
    frames = P.encode_request(1, "infer", {"inputs": {"x": a}, "task": "t"})
    assert len(frames) == 2
    req = P.decode_request(frames)
    got = req.args["inputs"]["x"]
    assert got.dtype == a.dtype and got.shape == a.shape
    np.testing.assert_array_equal(got, a)
    assert not got.flags.writeable
    assert req.id == 1 and req.op == "infer" and req.args["task"] == "t"


def test_received_arrays_are_views_of_the_frame_and_big_endian_is_converted():
    a = np.arange(4096, dtype=np.float32)
    frames = P.encode_request(2, "infer", {"inputs": {"x": a}})
    buf = bytearray(frames[1])
    got = P.decode_request([frames[0], buf]).args["inputs"]["x"]
    buf[0:4] = np.float32(5.0).tobytes()             # the array sees the frame's bytes
    assert got[0] == 5.0
    be = np.arange(5, dtype=">i4")
    out = P.decode_request(P.encode_request(3, "x", {"a": be})).args["a"]
    np.testing.assert_array_equal(out, be)
    assert out.dtype == np.dtype("<i4")


def test_unaligned_frames_are_copied_aligned():
    a = np.arange(3, dtype=np.float64)
    frames = P.encode_request(1, "infer", {"a": a})
    raw = bytearray(b"\0" + bytes(frames[1]))
    got = P.decode_request([frames[0], memoryview(raw)[1:]]).args["a"]
    assert got.flags.aligned and not got.flags.writeable
    np.testing.assert_array_equal(got, a)


def test_replies_round_trip_results_streams_errors_and_beats():
    out = {"logits": np.ones((2, 5), np.float32), "n": np.int64(3), "t": (1, 2)}
    rep = P.decode_reply(P.encode_reply(9, out, more=True))
    assert rep.ok and rep.more and rep.id == 9 and rep.result["n"] == 3
    assert rep.result["t"] == [1, 2]
    np.testing.assert_array_equal(rep.result["logits"], out["logits"])
    err = P.decode_reply(P.encode_error(4, "unknown_task", "no task 'x'"))
    assert not err.ok and err.code == "unknown_task" and err.message == "no task 'x'"
    beat = P.decode_reply(P.encode_beat(5))
    assert beat.beat and beat.more and beat.id == 5


@pytest.mark.parametrize("frames, code", [
    ([], "bad_request"),
    ([b""], "bad_request"),
    ([b"\xc1"], "bad_request"),                                  # never-used msgpack byte
    ([msgpack.packb([1, 2])], "bad_request"),                    # not a map
    ([env(v=2)], "version"),
    ([env(v=...)], "version"),
    ([env(id="x")], "bad_request"),
    ([env(id=-1)], "bad_request"),
    ([env(id=True)], "bad_request"),
    ([env(op=3)], "bad_request"),
    ([env(op="")], "bad_request"),
    ([env(args=[1])], "bad_request"),
    ([env(args=...)], "bad_request"),
    ([env(extra=1)], "bad_request"),
    ([env() + b"\x00"], "bad_request"),                          # trailing bytes
    ([env()[:-1]], "bad_request"),                               # truncated
    ([env(args={"a": msgpack.ExtType(5, b"xx")})], "bad_request"),
    ([env(args={"a": {"__nd__": 0, "dtype": "float32", "shape": [2]}})], "bad_request"),
    ([env(args={"a": {"__nd__": 0, "dtype": "object", "shape": [1]}}), b"12345678"],
     "bad_request"),
    ([env(args={"a": {"__nd__": 0, "dtype": "float32", "shape": [1 << 60, 1 << 60]}}),
      b"1234"], "bad_request"),                                  # huge declared size
    ([env(args={"a": {"__nd__": 0, "dtype": "bool", "shape": [0, 1 << 40, 1 << 40]}}),
      b""], "bad_request"),                                      # empty, but not for numpy
    ([env(args={"a": {"__nd__": 0, "dtype": "float32", "shape": [3]}}), b"12345678"],
     "bad_request"),                                             # truncated array
    ([env(args={"a": {"__nd__": 0, "dtype": "float32", "shape": [-1]}}), b""], "bad_request"),
    ([env(args={"a": {"__nd__": 0, "dtype": "uint8", "shape": [1], "x": 1}}), b"1"],
     "bad_request"),
    ([env(args={"a": {"__nd__": 0, "dtype": "uint8", "shape": [1]},
                "b": {"__nd__": 0, "dtype": "uint8", "shape": [1]}}), b"1"], "bad_request"),
    ([env(), b"unreferenced"], "bad_request"),
    ([env()] + [b""] * (P.MAX_ARRAYS + 1), "too_large"),
    ([b"\x00" * (P.MAX_ENVELOPE + 1)], "too_large"),
])
def test_malformed_requests_are_refused_with_a_code(frames, code):
    refused(frames, code)


def test_msgpack_limits_and_depth():
    refused([msgpack.packb({"v": 1, "id": 1, "op": "x", "args": {"a": [0] * (P.MAX_ITEMS + 1)}})])
    refused([msgpack.packb({"v": 1, "id": 1, "op": "x",
                            "args": {str(i): i for i in range(P.MAX_KEYS + 1)}})])
    deep: object = 1
    for _ in range(P.MAX_DEPTH + 2):
        deep = [deep]
    refused([msgpack.packb({"v": 1, "id": 1, "op": "x", "args": {"a": deep}})])
    # a declared 4 GiB string in a tiny envelope: msgpack refuses it without allocating
    refused([b"\x84\xa1v\x01\xa2id\x01\xa2op\xdb\xff\xff\xff\xff"])


def test_the_request_id_is_kept_when_it_was_read():
    e = refused([env(id=41, v=3)], "version")
    assert P.failure_id(e) == 41
    e = refused([env(id=42, args={"a": {"__nd__": 5, "dtype": "int8", "shape": []}})])
    assert P.failure_id(e) == 42
    assert P.failure_id(refused([b"junk"])) is None


def test_encoding_refuses_arrays_that_cannot_travel():
    with pytest.raises(P.ProtocolError):
        P.encode_request(1, "x", {"a": np.array(["s"], dtype=object)})
    with pytest.raises(P.ProtocolError):
        P.encode_request(1, "x", {"a": np.zeros(2, np.complex64)})


def test_error_codes_follow_edgert_types_and_come_back_as_them():
    cases = [(UnknownTask("x", ["a"]), "unknown_task", UnknownTask),
             (InputMismatch("bad"), "input_mismatch", InputMismatch),
             (BudgetExceeded("w", 2, 1), "budget_exceeded", BudgetExceeded),
             (PackCorrupt("bad"), "pack_corrupt", PackCorrupt),
             (ModelClosed("closed"), "model_closed", ModelClosed),
             (edgert.EdgertError("no"), "failed", RemoteError),
             (ValueError("v"), "bad_request", ValueError),
             (KeyError("k"), "internal", RemoteError),
             (P.ProtocolError("busy", "later"), "busy", RemoteError)]
    for exc, code, local in cases:
        assert P.error_code(exc) == code
        back = remote_error(code, str(exc), 3)
        assert isinstance(back, RemoteError) and isinstance(back, local)
        assert isinstance(back, edgert.EdgertError) and back.code == code and back.id == 3
        assert str(exc) in str(back)


# --- fuzzing: the decoder answers a Request or a ProtocolError, nothing else ------------------
def _decode_or_refuse(frames) -> None:
    try:
        P.decode_request(frames)
    except P.ProtocolError as e:
        assert e.code in P.CODES


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_fuzz_random_bytes(frames):
    _decode_or_refuse(frames)


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "id", "op", "args", "x"]), values, max_size=5),
       st.lists(st.binary(max_size=32), max_size=3))
def test_fuzz_envelopes_of_wrong_types(doc, extra):
    _decode_or_refuse([msgpack.packb(doc), *extra])


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(list(P.DTYPES) + ["object", "float128", 3, None]),
       st.lists(st.integers(-2, 1 << 62), max_size=5) | values,
       st.integers(-1, 3), st.integers(0, 64), st.integers(0, 2))
def test_fuzz_array_descriptors(dtype, shape, k, nbytes, nframes):
    doc = {"v": 1, "id": 1, "op": "infer",
           "args": {"inputs": {"x": {"__nd__": k, "dtype": dtype, "shape": shape}}}}
    _decode_or_refuse([msgpack.packb(doc)] + [b"\x01" * nbytes] * nframes)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_fuzz_truncated_and_corrupted_valid_requests(cut, junk):
    frames = P.encode_request(5, "infer", {"inputs": {"x": np.ones((2, 3), np.float32)},
                                          "task": "lane"})
    head = bytes(frames[0])
    _decode_or_refuse([head[:cut], frames[1]])
    pos = cut % len(head)
    _decode_or_refuse([head[:pos] + junk + head[pos + len(junk):], frames[1]])
    _decode_or_refuse([head, bytes(frames[1])[:cut % 24]])
