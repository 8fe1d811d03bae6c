"""Why each generate call stopped, per call (issue 17, item 5): Generation, GenerateResult."""
from __future__ import annotations

import pytest

from edgert.cli import main
from edgert.kinds.generation import GenerateResult
from moe_models import mixtral_config, prompt, runtime, save

pytest.importorskip("transformers")

# one KV page = 2 layers * K,V * 2 kv heads * 16 tokens * 8 dims * 4 B + the prefix tail:
# an 8 KiB slot; 24 KiB = 3 pages = 48 tokens
TIGHT_KV = "24 KiB"


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """A Mixtral pack with a byte vocabulary (text prompts work), and the same weights with
    EOS set to the third token the first one generates greedily from `prompt(5)`."""
    from edgert.pack.hf_import import pack_hf
    d = tmp_path_factory.mktemp("gen")
    pack_hf(save(mixtral_config(vocab_size=256), d / "m"), d / "m.edgepack", progress=False)
    with runtime().load(d / "m.edgepack", expert_budget=1.0) as lm:
        greedy = lm.generate(prompt(5), max_new_tokens=8)
    at = next(i for i in range(2, 8) if greedy[i] not in greedy[:i])
    pack_hf(save(mixtral_config(vocab_size=256, eos_token_id=greedy[at]), d / "eos"),
            d / "eos.edgepack", progress=False)
    return {"plain": d / "m.edgepack", "eos": d / "eos.edgepack", "greedy": greedy, "at": at}


def test_interleaved_streams_report_their_own_reasons(packs):
    lm = runtime(kv=TIGHT_KV).load(packs["plain"], expert_budget=1.0)
    assert lm.pages.capacity == 3
    # short: 2 + 15 - 1 tokens fed, one page; long: 20 + 20 would need 3 pages, 2 are left
    short = lm.generate(prompt(2, seed=3), max_new_tokens=15, stream=True)
    long = lm.generate(prompt(20, seed=4), max_new_tokens=20, stream=True)
    made = {"short": [], "long": []}
    live = {"short": short, "long": long}
    while live:                                   # token by token, short first each round
        for name, g in list(live.items()):
            try:
                made[name].append(next(g))
            except StopIteration:
                del live[name]
    assert (short.stop_reason, short.tokens, len(made["short"])) == ("length", 15, 15)
    assert long.stop_reason == "kv_budget" and 0 < long.tokens == len(made["long"]) < 20
    assert lm.pages.num_in_use == 0
    lm.close()


def test_eos_stops_and_is_reported(packs):
    with runtime().load(packs["eos"], expert_budget=1.0) as lm:
        res = lm.generate(prompt(5), max_new_tokens=8, details=True)
    at = packs["at"]
    assert res == GenerateResult(packs["greedy"][:at + 1], "eos", at + 1)


def test_closing_early_is_cancelled_and_gives_pages_back(packs):
    with runtime().load(packs["plain"], expert_budget=1.0) as lm:
        g = lm.generate(prompt(5), max_new_tokens=10, stream=True)
        assert g.stop_reason is None and g.tokens == 0
        assert [next(g), next(g)] == packs["greedy"][:2]
        assert g.stop_reason is None and g.tokens == 2 and lm.pages.num_in_use > 0
        g.close()
        assert g.stop_reason == "cancelled" and g.tokens == 2 and lm.pages.num_in_use == 0
        g.close()                                              # idempotent
        assert g.stop_reason == "cancelled"
        with lm.generate("ab", max_new_tokens=10, stream=True) as text:
            first = next(text)
        assert isinstance(first, str) and text.stop_reason == "cancelled"
        assert lm.pages.num_in_use == 0
        # run to its end, then closed (as the device service does): still its real reason
        done = lm.generate(prompt(5), max_new_tokens=3, stream=True)
        assert list(done) == packs["greedy"][:3]
        done.close()
        assert done.stop_reason == "length"


def test_details_keeps_the_output_type(packs):
    with runtime().load(packs["plain"], expert_budget=1.0) as lm:
        res = lm.generate(prompt(5), max_new_tokens=4, details=True)
        assert res == GenerateResult(packs["greedy"][:4], "length", 4)
        assert lm.generate(prompt(5), max_new_tokens=4) == packs["greedy"][:4]
        text = lm.generate("ab", max_new_tokens=4, details=True)
        assert text.output == lm.generate("ab", max_new_tokens=4) and isinstance(text.output, str)
        assert (text.stop_reason, text.tokens) == ("length", 4)
        # temperatures under the floor are greedy, end to end (issue 17: no NaN)
        assert lm.generate(prompt(5), max_new_tokens=4, temperature=1e-300) == \
            packs["greedy"][:4]


def test_generate_result_takes_only_known_reasons():
    assert GenerateResult([1], "reloaded", 1).stop_reason == "reloaded"  # the service's own
    with pytest.raises(ValueError, match="stop_reason 'done'"):
        GenerateResult([1], "done", 1)


def test_cli_says_it_stopped_early_on_the_kv_budget(packs, tmp_path, capsys):
    cfg = tmp_path / "tight.yaml"
    cfg.write_text(f"""name: tight
threads: 1
memory: {{total: 64 MiB, engine: 24 MiB, experts: 8 MiB, kv: {TIGHT_KV}}}
storage: {{read_mode: buffered}}
""")
    rc = main(["generate", str(packs["plain"]), "--prompt", "x" * 40, "--max-new-tokens", "20",
               "--config", str(cfg)])
    out, err = capsys.readouterr()
    assert rc == 0 and out.endswith("\n")
    assert "stopped early after" in err and "of 20 tokens: no KV memory" in err
