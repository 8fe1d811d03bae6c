"""The demo MoE recipe: deterministic corpus split, byte tokenizer, a loadable HF checkpoint."""
import json

import pytest

from edgert.recipes import moe as recipe


def test_corpus_split_is_deterministic_and_disjoint():
    files = recipe.stdlib_files()
    assert files == sorted(files)
    held = {rel for rel, _ in files if recipe.is_heldout(rel)}
    assert held and len(held) < len(files)
    t1, h1, info = recipe.build_corpus(64 * 1024)
    t2, h2, _ = recipe.build_corpus(64 * 1024)
    assert (t1, h1) == (t2, h2)
    for rel in held:
        assert b"# file: " + rel.encode() + b"\n" not in t1     # held-out files never trained on


def test_byte_tokenizer_ids_are_bytes(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    assert recipe.save_tokenizer(tmp_path)
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "x = {'é': 1}\n\t# ☃"
    assert tok.encode(text).ids == list(text.encode())
    assert tok.decode(list(text.encode())) == text


def test_quick_recipe_saves_a_mixtral_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from dataclasses import replace
    r = replace(recipe.Recipe.from_name("quick"), steps=2, corpus_limit=64 * 1024)
    summary = recipe.train(tmp_path, r, max_minutes=5)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["vocab_size"] == 256
    assert cfg["num_local_experts"] == r.experts and cfg["num_experts_per_tok"] == r.top_k
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "heldout.txt").stat().st_size > 0
    assert summary["steps_done"] == 2
