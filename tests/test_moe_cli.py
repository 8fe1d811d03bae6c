"""`edgert pack hf` then `edgert generate` end to end, through the command line's main()."""
from __future__ import annotations

from dataclasses import replace

import pytest

import edgert
from edgert.projection.costmodel import default_policy
from edgert.cli import main

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    from edgert.recipes import moe as recipe
    d = tmp_path_factory.mktemp("moe") / "ckpt"
    recipe.train(d, replace(recipe.Recipe.from_name("quick"), steps=2, corpus_limit=64 * 1024),
                 max_minutes=5)
    out = d.parent / "m.edgepack"
    assert main(["pack", "hf", str(d), "-o", str(out)]) == 0
    return out


def test_generate_streams_the_greedy_continuation_and_summarises(pack, capsys):
    prompt = "def main(args):"
    rc = main(["generate", str(pack), "--prompt", prompt, "--max-new-tokens", "12",
               "--expert-budget", "0.5", "--stats"])
    out, err = capsys.readouterr()
    assert rc == 0
    with edgert.Runtime().load(pack, expert_budget=0.5) as lm:
        want = lm.generate(prompt, max_new_tokens=12)
    assert out == want + "\n"
    # no --policy: the cost model of the default config (cpu-dev) picks it
    want_policy = default_policy(lm.rt.config, lm.layout, 0.5)
    assert "exact hit rate" in err and f"policy {want_policy}" in err
    slots = len(lm.layout.table) // 2
    assert f"expert cache: {slots} slots" in err


def test_generate_reports_a_budget_that_does_not_fit(pack, capsys):
    rc = main(["generate", str(pack), "--prompt", "x", "--expert-budget", "4KiB"])
    assert rc == 2
    assert "BudgetExceeded" in capsys.readouterr().err


def test_generate_at_each_precision(pack, tmp_path, capsys):
    """A pack with int4 copies: --precision exact streams what the plain pack does; mixed
    streams what rt.load(precision="mixed") makes and says how much ran at int4."""
    d = pack.parent / "ckpt"
    low = tmp_path / "mixed.edgepack"
    assert main(["pack", "hf", str(d), "-o", str(low), "--quant", "mixed", "--group-size", "32",
                 "--quiet"]) == 0
    capsys.readouterr()
    prompt = "def main(args):"
    outs = {}
    for p in ("exact", "mixed", "int4"):
        assert main(["generate", str(low), "--prompt", prompt, "--max-new-tokens", "8",
                     "--expert-budget", "0.5", "--precision", p, "--stats"]) == 0
        outs[p], err = capsys.readouterr()
        if p == "mixed":
            assert "mixed precision (alpha 1.0)" in err and "% of expert computations at int4" in err
    with edgert.Runtime().load(pack, expert_budget=0.5) as lm:
        assert outs["exact"] == lm.generate(prompt, max_new_tokens=8) + "\n"
    with edgert.Runtime().load(low, expert_budget=0.5, precision="mixed") as lm:
        assert outs["mixed"] == lm.generate(prompt, max_new_tokens=8) + "\n"
    with edgert.Runtime().load(low, expert_budget=0.5) as lm:   # the pack's default: mixed
        assert lm.precision == "mixed"
