"""`edgert pack hf`: layout, shards, dtypes, typed errors, tokenizer, corrupted experts."""
from __future__ import annotations

import json
import os

import msgpack
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from safetensors import safe_open

from edgert.errors import PackCorrupt, UnsupportedModel
from edgert.experts.api import ExpertLayout, ResidentExperts
from edgert.pack import PackReader
from edgert.pack.hf_import import CheckpointIncomplete, pack_hf
from moe_models import (HAS_CACHE, OnDemandExperts, mixtral_config, prompt, qwen_config,
                        ref_logits, reference, runtime, save)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save(mixtral_config(), tmp_path_factory.mktemp("mx") / "ckpt")


@pytest.fixture(scope="module")
def mixtral_pack(mixtral_dir):
    out = mixtral_dir.parent / "mx.edgepack"
    pack_hf(mixtral_dir, out, progress=False)
    return out


def test_layout_follows_the_contract(mixtral_dir, mixtral_pack):
    r = PackReader(mixtral_pack)
    assert r.kind == "moe" and r.verify() == []
    assert r.config["architectures"] == ["MixtralForCausalLM"]
    sec = msgpack.unpackb(r.sections["experts"])
    assert (sec["num_layers"], sec["num_experts"], sec["top_k"]) == (2, 4, 2)
    assert sec["tensors"]["gate"]["shape"] == [48, 32]
    assert sec["tensors"]["down"]["shape"] == [32, 48]
    assert len(sec["table"]) == 8
    f = safe_open(str(mixtral_dir / "model.safetensors"), "np")
    for layer, expert, block in sec["table"]:
        p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        want = b"".join(f.get_tensor(p + w + ".weight").tobytes() for w in ("w1", "w3", "w2"))
        assert r.read_block(block) == want
        assert r.blocks[block].offset % 4096 == 0
    model = r.task("model")
    assert not any(".experts." in n for n in model)
    for name in model:
        np.testing.assert_array_equal(r.read_tensor("model", name), f.get_tensor(name))
    assert set(model) == {k for k in f.keys() if ".experts." not in k}


def test_sharded_checkpoint_packs_like_one_file(tmp_path, mixtral_pack):
    d = save(mixtral_config(), tmp_path / "sharded", max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").exists()
    out = tmp_path / "sharded.edgepack"
    pack_hf(d, out, progress=False)
    p = prompt(20)
    a = runtime().load(out, expert_budget=1.0).logits(p)
    b = runtime().load(mixtral_pack, expert_budget=1.0).logits(p)
    assert np.array_equal(a, b)


def test_missing_shard_and_tensor_are_named(tmp_path):
    d = save(mixtral_config(), tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    gone = d / shards[-1]
    data = gone.read_bytes()
    gone.unlink()
    out = tmp_path / "x.edgepack"
    with pytest.raises(CheckpointIncomplete, match=shards[-1]) as e:
        pack_hf(d, out, progress=False)
    assert isinstance(e.value, PackCorrupt)
    assert not out.exists() and not os.path.exists(str(out) + ".tmp")
    gone.write_bytes(data)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    del index["weight_map"][name]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointIncomplete, match=name.replace(".", r"\.")):
        pack_hf(d, out, progress=False)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointIncomplete, match="config.json"):
        pack_hf(d, out, progress=False)


def test_unsupported_architecture(tmp_path, mixtral_dir):
    d = tmp_path / "llama"
    d.mkdir()
    cfg = json.loads((mixtral_dir / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel) as e:
        pack_hf(d, tmp_path / "x.edgepack", progress=False)
    msg = str(e.value)
    for arch in ("LlamaForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM"):
        assert arch in msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_half_precision_checkpoints(tmp_path, family, dtype):
    config = mixtral_config() if family == "mixtral" else qwen_config()
    d = save(config, tmp_path / "ckpt", dtype=dtype)
    out = tmp_path / "half.edgepack"
    pack_hf(d, out, progress=False)
    r = PackReader(out)
    name = str(dtype).removeprefix("torch.")
    assert ExpertLayout.from_reader(r).tensors["up"]["dtype"] == name
    assert {s.dtype for s in r.task("model").values()} == {name}
    lm = runtime().load(out, expert_budget=1.0)  # computes in the config's float32
    p = prompt(24)
    np.testing.assert_allclose(lm.logits(p), ref_logits(reference(d), p), atol=1e-4, rtol=0)


def _word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, **{chr(ord("a") + i): 1 + i for i in range(26)}, " ": 27}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(path))


def test_tokenizer_section_and_cli(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from edgert.cli import main
    d = save(mixtral_config(), tmp_path / "ckpt")
    _word_tokenizer(d / "tokenizer.json")
    out = tmp_path / "tok.edgepack"
    assert main(["pack", "hf", str(d), "-o", str(out), "--quiet"]) == 0
    assert PackReader(out).sections["tokenizer"] == (d / "tokenizer.json").read_bytes()
    lm = runtime().load(out, expert_budget=1.0)
    assert lm.tokenizer.kind == "tokenizers"
    want = lm.generate("hello world", max_new_tokens=12)
    assert want and set(want) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert "".join(lm.generate("hello world", max_new_tokens=12, stream=True)) == want
    capsys.readouterr()
    cfg = tmp_path / "dev.yaml"
    cfg.write_text("name: t\nthreads: 1\nmemory: {total: 64 MiB, engine: 44 MiB, experts: 8 MiB, "
                   "kv: 4 MiB}\nstorage: {read_mode: buffered}\n")
    assert main(["generate", str(out), "--prompt", "hello world", "--max-new-tokens", "12",
                 "--config", str(cfg)]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_byte_level_fallback(tmp_path):
    d = save(mixtral_config(vocab_size=258), tmp_path / "ckpt")
    out = tmp_path / "bytes.edgepack"
    pack_hf(d, out, progress=False)
    lm = runtime().load(out, expert_budget=1.0)
    assert lm.tokenizer.kind == "bytes" and lm.tokenizer.encode("hé") == [104, 195, 169]
    ids = lm.generate(list("hi".encode()), max_new_tokens=16)
    text = lm.generate("hi", max_new_tokens=16)
    assert text == bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _corrupt_expert(pack, layer, expert) -> int:
    r = PackReader(pack)
    block = ExpertLayout.from_reader(r).block(layer, expert)
    off = r.blocks[block].offset
    r.close()
    with open(pack, "r+b") as f:
        f.seek(off + 100)
        b = f.read(1)
        f.seek(off + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    return block


def _tokens_by_expert(ref, layer, expert):
    """Single-token prompts whose routing at `layer` does / does not pick `expert`."""
    uses, avoids = [], []
    for t in range(ref.config.vocab_size):
        with torch.no_grad():
            logits = ref(torch.tensor([[t]]), output_router_logits=True).router_logits[layer][0]
        chosen = torch.topk(logits, ref.config.num_experts_per_tok).indices.tolist()
        (uses if expert in chosen else avoids).append(t)
    return uses, avoids


def test_corrupted_expert_raises_and_model_stays_usable(tmp_path, mixtral_dir):
    out = tmp_path / "bad.edgepack"
    pack_hf(mixtral_dir, out, progress=False)
    block = _corrupt_expert(out, 1, 2)
    with pytest.raises(PackCorrupt, match=f"block {block}"):
        ResidentExperts(PackReader(out))
    ref = reference(mixtral_dir)
    uses, avoids = _tokens_by_expert(ref, 1, 2)
    assert uses and avoids
    providers = [lambda rt: rt.load(out, provider=OnDemandExperts(PackReader(out)))]
    if HAS_CACHE:
        providers.append(lambda rt: rt.load(out, expert_budget=0.5))
    for make in providers:
        lm = make(runtime())
        for _ in range(2):  # the failure leaves nothing pinned or allocated behind
            with pytest.raises(PackCorrupt):
                lm.logits([uses[0]])
            assert lm.stats()["kv"]["in_use"] == 0
            np.testing.assert_allclose(lm.logits([avoids[0]]), ref_logits(ref, [avoids[0]]),
                                       atol=1e-4, rtol=0)
        lm.close()
