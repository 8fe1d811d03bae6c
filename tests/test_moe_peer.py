"""`edgert bench moe --peer llama.cpp`, edgert's side: its budgeted run inside a memory
cgroup, as llama.cpp's runs (one budget definition for both). No llama.cpp needed; skipped
where this process cannot make a memory cgroup (not root, or no memory controller)."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from moe_models import mixtral_config, prompt, save

from edgert.bench.moe_peer import MemoryCgroup, _in_cgroup, _run
from edgert.pack.hf_import import pack_hf

TOKENS = 6


@pytest.fixture(scope="module")
def edgert_args(tmp_path_factory):
    try:
        MemoryCgroup(64 << 20).close()
    except OSError as e:
        pytest.skip(f"no memory cgroup can be made here: {e}")
    d = save(mixtral_config(hidden_size=64, intermediate_size=32),
             tmp_path_factory.mktemp("mixtral") / "ckpt")
    pack = d.parent / "m.edgepack"
    pack_hf(d, pack, progress=False)
    return {"side": "edgert", "path": str(pack), "config": None, "precision": "exact",
            "budget": 0.5, "prompt": prompt(8), "tokens": TOKENS, "threads": 1,
            "decode_threads": 1}


def test_edgert_runs_inside_the_cgroup_and_decodes_as_outside(edgert_args):
    free = _run(edgert_args)
    assert "error" not in free, free
    limit = 512 << 20
    res, note = _in_cgroup(edgert_args, limit)
    assert note is None and "error" not in res, (note, res)
    assert res["tokens"] == free["tokens"] and len(res["tokens"]) == TOKENS
    # what loading and decoding added was charged to the cgroup, and stayed under its limit
    assert 0 < res["cgroup_peak"] <= limit
    assert res["limit"] == limit and res["oom_kills"] == 0


def test_a_limit_below_what_edgert_needs_kills_it(edgert_args):
    res, note = _in_cgroup(edgert_args, 2 << 20)
    assert note is None
    assert "error" in res and res["oom_kills"] >= 1, res
