"""The MoE decode step under `compile: auto|on|off`: the config key, the torch.compile
wrapper's eager fallback with a logged reason, the cache directory. The compiled CPU step
itself: tests/test_moe_decode_graph.py."""
from __future__ import annotations

import logging
import os

import pytest
import torch

pytest.importorskip("transformers")

import edgert
from edgert.config import DeviceConfig
from edgert.engines import compile as C
from edgert.errors import ConfigError
from edgert.pack.hf_import import pack_hf
from moe_models import device_config, mixtral_config, prompt, ref_greedy, reference, save

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = save(mixtral_config(), tmp_path_factory.mktemp("mixtral") / "ckpt")
    pack = d.parent / "model.edgepack"
    pack_hf(d, pack, progress=False)
    return pack, reference(d)


def _config(mode: str, scratch) -> DeviceConfig:
    from dataclasses import replace
    c = device_config()
    return replace(c, compile=mode, storage=replace(c.storage, scratch_dir=str(scratch)))


def test_config_key_takes_three_values_and_refuses_others_in_one_line():
    doc = {"name": "x", "memory": {"total": 1 << 30}}
    assert DeviceConfig.from_dict(doc).compile == "auto"
    for mode in ("auto", "on", "off"):
        assert DeviceConfig.from_dict({**doc, "compile": mode}).compile == mode
    with pytest.raises(ConfigError, match=r"^<dict>: compile: expected one of auto, on, off, "
                                          r"got 'yes'$"):
        DeviceConfig.from_dict({**doc, "compile": "yes"})
    # YAML reads a bare on / off as a boolean: the key takes it as meant
    assert DeviceConfig.from_dict({**doc, "compile": True}).compile == "on"
    assert DeviceConfig.from_dict({**doc, "compile": False}).compile == "off"
    assert not C.wanted("auto", "cpu") and C.wanted("auto", "cuda") and C.wanted("on", "cpu")
    assert not C.wanted("off", "cuda")


def _broken_compiler(fail_at: str):
    def compiler(fn, **kw):
        if fail_at == "wrap":
            raise RuntimeError("backend unavailable\nsecond line")

        def call(*args):
            raise RuntimeError("inductor: no C++ compiler")
        return call
    return compiler


@pytest.mark.parametrize("fail_at", ["wrap", "first call"])
def test_failed_compile_runs_eagerly_with_a_logged_reason(tmp_path, caplog, fail_at):
    # the torch.compile wrapper the CUDA step uses for its expert terms (on the CPU `on`
    # builds the ahead-of-time step instead: tests/test_moe_decode_graph.py)
    from edgert.engines.moe_step import expert_terms
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, generator=g)
    mats = [(torch.randn(12, 16, generator=g), torch.randn(16, 6, generator=g))
            for _ in range(2)]
    coef = torch.tensor([0.7, 0.3])
    want = expert_terms(x, mats, coef, None)
    with caplog.at_level(logging.WARNING, logger="edgert.engines.compile"):
        f = C.Compiled(expert_terms, "expert step", "cuda", _broken_compiler(fail_at))
        assert torch.equal(f(x, mats, coef, None), want)
        assert torch.equal(f(x, mats, coef, None), want)
    st = f.stats()
    assert st["compiled"] is False and st["compile_s"] is None
    reason = "backend unavailable" if fail_at == "wrap" else "no C++ compiler"
    assert reason in st["failed"] and "\n" not in st["failed"]
    msgs = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(msgs) == 1 and reason in msgs[0] and "runs eagerly" in msgs[0]


def test_the_cpu_step_sets_up_its_cache_under_the_scratch_dir(model, tmp_path, monkeypatch):
    from edgert.kinds import moe_decode

    class Broken:
        def __init__(self, *a, **kw):
            raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(moe_decode, "DecodeGraphs", Broken)
    pack, ref = model
    lm = edgert.Runtime(_config("on", tmp_path)).load(pack, expert_budget=0.5)
    p = prompt(6, seed=2)
    assert lm.generate(p, max_new_tokens=12) == ref_greedy(ref, p, 12)
    assert (tmp_path / "torch-compile").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch-compile")
    off = edgert.Runtime(_config("off", tmp_path)).load(pack, expert_budget=0.5)
    assert off.stats()["compile"] is None and off._graph is None


def test_cache_dir_is_pruned_oldest_first(tmp_path):
    d = tmp_path / "torch-compile"
    (d / "sub").mkdir(parents=True)
    for i in range(5):
        f = d / "sub" / f"f{i}"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + i, 1000 + i))
    C.use_cache_dir(d, cap=2500)
    assert sorted(p.name for p in (d / "sub").iterdir()) == ["f3", "f4"]


def test_cache_dir_is_under_the_scratch_dir_else_the_users_cache(tmp_path, monkeypatch):
    assert C.cache_dir(str(tmp_path)) == tmp_path / "torch-compile"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert C.cache_dir("") == tmp_path / "xdg" / "edgert" / "torch-compile"
