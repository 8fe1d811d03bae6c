"""`edgert generate` with the prefix cache: reuse across processes (the disk tier),
--cache-salt, --no-prefix-cache, and the figures --stats prints."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from edgert.cli import main
from edgert.pack.hf_import import pack_hf
from moe_models import mixtral_config, save

PROMPT = "the same long system prompt, then a question? " * 2      # 92 bytes: 5 pages


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ckpt = save(mixtral_config(vocab_size=256), d / "m")        # a byte vocabulary: text works
    pack = d / "m.edgepack"
    pack_hf(ckpt, pack, progress=False)
    cfg = d / "cfg.yaml"
    cfg.write_text(
        "name: test-kv\nthreads: 1\nmemory: {total: 64 MiB, engine: 40 MiB, experts: 8 MiB, "
        f"kv: 4 MiB}}\nstorage: {{read_mode: buffered}}\nkv_cache: {{chunk_tokens: 32, "
        f"host: 1 MiB, disk: 8 MiB, dir: {d / 'kv'}}}\n")
    return pack, cfg


def generate(setup, capsys, *extra):
    pack, cfg = setup
    rc = main(["generate", str(pack), "--prompt", PROMPT, "--max-new-tokens", "6",
               "--config", str(cfg), "--stats", *extra])
    out, err = capsys.readouterr()
    assert rc == 0
    return out, err


def test_generate_reuses_prefixes_across_runs_and_salts_keep_them_apart(setup, capsys):
    out, err = generate(setup, capsys, "--cache-salt", "a")
    assert "0 tokens reused, 92 computed" in err
    again, err = generate(setup, capsys, "--cache-salt", "a")   # a new runtime: the disk tier
    assert again == out
    # the first run also cached its generated tokens: 97 tokens = 3 chunks of 2 pages, of
    # which the prompt's 5 full pages are read (the last chunk in part)
    assert "80 tokens reused, 12 computed" in err and "disk 80 hit" in err
    _, err = generate(setup, capsys, "--cache-salt", "b")
    assert "0 tokens reused" in err
    plain, err = generate(setup, capsys, "--no-prefix-cache")
    assert plain == out and "prefix cache: off" in err
