"""Low-bit expert copies in packs: the scheme's definition, round trips (pack, verify,
inspect), recorded errors, bytes, damaged sections and extents, and every wrong option."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file

from edgert import PackCorrupt
from edgert.cli import main
from edgert.experts.api import ExpertLayout
from edgert.pack import PackReader
from edgert.pack.hf_import import pack_hf
from edgert.pack.manifest import Manifest
from edgert.pack.quant import QuantOptionError, dequantize, quantize, unpack_int4
from moe_models import mixtral_config, runtime, save

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save(mixtral_config(hidden_size=64, intermediate_size=32),
                tmp_path_factory.mktemp("mix") / "ckpt")


@pytest.fixture(scope="module")
def packs(ckpt):
    out = {}
    for quant in ("int8", "int4", "mixed"):
        p = ckpt.parent / f"{quant}.edgepack"
        pack_hf(ckpt, p, progress=False, quant=quant,
                group_size=None if quant == "int8" else 32)
        out[quant] = p
    out["exact"] = ckpt.parent / "exact.edgepack"
    pack_hf(ckpt, out["exact"], progress=False)
    return out


def test_int4_scheme_round_trips_its_own_grid():
    """Values already on an int4 grid come back exactly; unpack inverts torch's packer."""
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (32, 128), generator=g, dtype=torch.int32)
    assert torch.equal(unpack_int4(torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2),
                                   32, 128), u)
    u[:, ::32], u[:, 1::32] = 0, 15               # each group spans the whole grid
    scale = torch.rand(32, 4, generator=g).half().float() + 0.1   # per row and group of 32
    lo = torch.randn(32, 4, generator=g).half().float()
    w = u.float() * scale.repeat_interleave(32, 1) + lo.repeat_interleave(32, 1)
    stored = quantize(w, "int4", 32)
    assert torch.allclose(dequantize(stored, "int4", 32, w.shape), w, atol=1e-2)  # f16 zeros
    w8 = torch.randn(16, 40, generator=g)
    d8 = dequantize(quantize(w8, "int8", 0), "int8", 0, w8.shape)
    assert float((d8 - w8).abs().max()) <= float(w8.abs().max()) / 254 * 1.001


@pytest.mark.parametrize("quant", ["int8", "int4", "mixed"])
def test_pack_verify_inspect_and_recorded_errors(packs, ckpt, quant, capsys):
    p = packs[quant]
    assert main(["verify", str(p)]) == 0
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    scheme = "int8" if quant == "int8" else "int4"
    assert f"default precision {quant}" in out and f"{scheme} (" in out and "rel L2" in out
    assert main(["inspect", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["moe"]["lowbit"]["copies"][scheme]
    tensors = load_file(str(ckpt / "model.safetensors"))
    with PackReader(p) as r:
        lay = ExpertLayout.from_reader(r, scheme)
        for (l, e), b in lay.table.items():
            ew = lay.views(np.frombuffer(bytearray(r.read_block(b)), np.uint8))
            for proj, hub in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                w = tensors[f"model.layers.{l}.block_sparse_moe.experts.{e}.{hub}.weight"]
                d = getattr(ew, proj).dequantized() - w
                rec = info["tensors"][f"{l}.{e}.{proj}"]
                assert rec["rel_l2"] == pytest.approx(float(d.norm() / w.norm()), rel=1e-5)
                assert rec["max_abs"] == pytest.approx(float(d.abs().max()), rel=1e-5)
                assert 0 < rec["rel_l2"] < (0.01 if scheme == "int8" else 0.15)


@pytest.mark.parametrize("dtype,limit", [(torch.bfloat16, 0.30), (torch.float32, 0.15)])
def test_int4_expert_bytes(tmp_path, dtype, limit):
    """The issue's target: an int4 expert (scales included) <= 0.30x of its 16-bit original,
    0.15x of a float32 one, at the default group size (64)."""
    d = save(mixtral_config(hidden_size=128, intermediate_size=64), tmp_path / "c", dtype=dtype)
    p = tmp_path / "p.edgepack"
    pack_hf(d, p, progress=False, quant="int4")
    with PackReader(p) as r:
        exact, low = ExpertLayout.from_reader(r), ExpertLayout.from_reader(r, "int4")
    assert low.group_size == 64 and low.extent_bytes <= limit * exact.extent_bytes


def test_damaged_copy_extent_is_named_by_verify(packs, tmp_path, capsys):
    p = tmp_path / "bad.edgepack"
    p.write_bytes(packs["int4"].read_bytes())
    with PackReader(p) as r:
        ent = r.blocks[ExpertLayout.from_reader(r, "int4").block(1, 2)]
    with open(p, "r+b") as f:
        f.seek(ent.offset + 5)
        b = f.read(1)
        f.seek(ent.offset + 5)
        f.write(bytes([b[0] ^ 0x10]))
    assert main(["verify", str(p)]) == 1
    assert "expert 1.2 (int4 copy)" in capsys.readouterr().err
    lm = runtime().load(p, precision="int4", expert_budget=1.0)
    with pytest.raises(PackCorrupt, match="block"):
        lm.provider.acquire(1, [2])                # the engine's read of that expert


def _mutate(doc, rng):
    doc = copy.deepcopy(doc)
    c = doc["copies"][next(iter(doc["copies"]))]
    pick = rng.integers(0, 8)
    odd = [-1, 0, 1, 16, 33, 1 << 40, 1.5, None, "int4", [], {}, [0, 0, 0], [0.0] * 6]
    if pick == 0:
        doc["precision"] = ["mixed", "int8", "exact", None, 3][rng.integers(5)]
    elif pick == 1:
        c["group_size"] = odd[rng.integers(len(odd))]
    elif pick == 2:
        c["extent_bytes"] += int(rng.choice([-1, 64, 1]))
    elif pick == 3:
        row = c["table"][rng.integers(len(c["table"]))]
        row[rng.integers(3)] = odd[rng.integers(len(odd))]
    elif pick == 4:
        del c["table"][rng.integers(len(c["table"]))]
    elif pick == 5:
        c["errors"][rng.integers(len(c["errors"]))] = odd[rng.integers(len(odd))]
    elif pick == 6:
        t = c["tensors"][list(c["tensors"])[rng.integers(len(c["tensors"]))]]
        t[["dtype", "shape", "offset"][rng.integers(3)]] = odd[rng.integers(len(odd))]
    else:
        doc["copies"] = {["int3", "int4", "int8", 0][rng.integers(4)]: c}
    return msgpack.packb(doc, use_bin_type=True)


def test_fuzz_lowbit_section(packs):
    """Manifest.decode with a mutated "lowbit" section: ValueError, or a copy whose every
    expert views and dequantizes cleanly."""
    with PackReader(packs["int4"]) as r:
        m = copy.deepcopy(r.manifest)
        end = max(b.offset + b.length for b in m.blocks)
        doc = msgpack.unpackb(r.sections["lowbit"], raw=False)
    rng = np.random.default_rng(3)
    seen = {"bad": 0, "ok": 0}
    for _ in range(400):
        m.sections = {**m.sections, "lowbit": _mutate(doc, rng)}
        try:
            got = Manifest.decode(m.encode(), data_end=end)
        except ValueError:
            seen["bad"] += 1
            continue
        seen["ok"] += 1
        for scheme in got.lowbit.copies:
            lay = ExpertLayout.from_reader(SimpleNamespace(manifest=got, path="p"), scheme)
            for b in lay.table.values():
                assert got.blocks[b].length == lay.extent_bytes
            ew = lay.views(np.zeros(lay.slot_bytes, np.uint8))
            assert ew.down.dequantized().shape == lay.ffn_hidden[::-1]
    assert seen["bad"] > 200 and seen["ok"] > 10, seen


@pytest.mark.parametrize("args,names", [
    (["--quant", "int3"], "--quant 'int3'"),
    (["--quant", "int4", "--group-size", "0"], "--group-size 0"),
    (["--quant", "int4", "--group-size", "64"], "--group-size 64 does not divide"),
    (["--quant", "int8", "--group-size", "32"], "--group-size 32"),
    (["--group-size", "32"], "--group-size needs --quant"),
])
def test_wrong_pack_options_are_one_line(ckpt, tmp_path, capsys, args, names):
    out = tmp_path / "x.edgepack"
    assert main(["pack", "hf", str(ckpt), "-o", str(out), "--quiet", *args]) != 0
    err = capsys.readouterr().err.strip()
    assert names in err and "QuantOptionError" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("pack,precision", [("int8", "mixed"), ("exact", "int4"),
                                            ("int4", "int8"), ("int4", "int2")])
def test_wrong_precision_is_refused_before_loading(packs, pack, precision):
    rt = runtime()
    with pytest.raises(QuantOptionError, match=f"precision='{precision}'") as e:
        rt.load(packs[pack], precision=precision)
    assert "\n" not in str(e.value) and rt.arena.stats()["in_use_bytes"] == 0
