"""Every ordinary mistake ends in one clear line on stderr and a non-zero exit: no traceback,
and nothing written where the user did not ask."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from edgert.cli import main
from edgert.pack.hf_import import pack_hf
from task_packs import tiny  # noqa: F401  (tiny is a fixture)


@pytest.fixture(scope="module")
def lm_pack(tmp_path_factory):
    """A two-step run of the MoE recipe: a checkpoint with a tokenizer, and its pack."""
    from dataclasses import replace

    from edgert.recipes import moe as recipe
    d = tmp_path_factory.mktemp("moe") / "ckpt"
    recipe.train(d, replace(recipe.Recipe.from_name("quick"), steps=2, corpus_limit=64 * 1024),
                 max_minutes=5)
    pack = d.parent / "moe.edgepack"
    pack_hf(d, pack, progress=False)
    return pack, d


def one_line(capsys, argv, needle: str) -> None:
    """`edgert argv` fails with exit 1/2 and one stderr line containing ``needle``."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:          # argparse's own refusals exit 2 with usage + one line
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc in (1, 2), (rc, err)
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert needle in last, last
    assert "internal error" not in last, last


def test_generate_mistakes(capsys, tiny, lm_pack):
    pack = lm_pack[0]
    one_line(capsys, ["generate", tiny.pack, "--prompt", "hi"], "is a task pack")
    for bad in ("0", "-1", "1.5", "2", "lots"):
        one_line(capsys, ["generate", pack, "--prompt", "hi", "--expert-budget", bad],
                 "--expert-budget")
    one_line(capsys, ["generate", pack, "--prompt", ""], "empty prompt")
    one_line(capsys, ["generate", pack, "--prompt", "hi", "--temperature", "nan"], "temperature")
    one_line(capsys, ["generate", pack, "--prompt", "hi", "--top-p", "0"], "top_p")
    one_line(capsys, ["generate", pack, "--prompt", "hi", "--max-new-tokens", "0"],
             "max_new_tokens")
    one_line(capsys, ["generate", pack, "--prompt", "hi", "--max-new-tokens", "100000"],
             "max_position_embeddings")
    one_line(capsys, ["generate", pack, "--prompt", "hi", "--config", "no-such-device"],
             "no device config 'no-such-device'")


def test_run_mistakes(capsys, tiny, lm_pack, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, tiny.x)
    empty = tmp_path / "empty.npy"
    np.save(empty, tiny.x[:0])
    one_line(capsys, ["run", lm_pack[0], "--task", "a", "--input", f"image={x}"],
             "is an MoE pack")
    one_line(capsys, ["run", tmp_path, "--task", "a", "--input", f"image={x}"],
             "is a directory")
    one_line(capsys, ["run", tmp_path / "missing.edgepack", "--task", "a"], "cannot open pack")
    one_line(capsys, ["run", tiny.pack, "--task", "nope", "--input", f"image={x}"],
             "unknown task 'nope'")
    one_line(capsys, ["run", tiny.pack, "--task", tiny.names[0], "--input", f"image={empty}"],
             "is empty")
    one_line(capsys, ["run", tiny.pack, "--task", tiny.names[0], "--input", f"img={x}"],
             "unknown input 'img'")


def test_pack_mistakes_write_nothing(capsys, tiny, lm_pack, tmp_path):
    files = {n: str(p) for n, p in tiny.files.items()}
    base = next(iter(files.values()))
    task = [f"{n}={p}" for n, p in files.items()][:1]
    onnx = ["pack", "onnx", "--base", base, "--task", *task]
    for size in ("1000", "0"):
        one_line(capsys, [*onnx, "-o", tmp_path / "a.edgepack", "--block-size", size],
                 "block_size")
    one_line(capsys, [*onnx, "-o", tmp_path], "is a directory")
    one_line(capsys, [*onnx, "-o", tmp_path / "nodir" / "a.edgepack"], "does not exist")
    one_line(capsys, [*onnx, "-o", tmp_path / "a.edgepack", "--align-tol", "-1"], "align_tol")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("not json")
    one_line(capsys, ["pack", "hf", ckpt, "-o", tmp_path / "m.edgepack"], "not valid JSON")
    (ckpt / "config.json").write_text((lm_pack[1] / "config.json").read_text())
    (ckpt / "model.safetensors").write_bytes((lm_pack[1] / "model.safetensors").read_bytes()[:99])
    one_line(capsys, ["pack", "hf", ckpt, "-o", tmp_path / "m.edgepack"], "safetensors")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["ckpt", "empty.npy", "x.npy"] or left == ["ckpt"], left  # no pack, no .tmp


def test_verify_and_inspect_of_what_is_not_a_pack(capsys, tmp_path):
    for cmd in ("verify", "inspect"):
        one_line(capsys, [cmd, tmp_path], "is a directory")
        one_line(capsys, [cmd, tmp_path / "missing.edgepack"], "no such file")


def test_inspect_shows_inputs_and_experts(capsys, tiny, lm_pack):
    assert main(["inspect", str(tiny.pack)]) == 0
    out = capsys.readouterr().out
    assert "input image: float32[" in out and "output " in out
    assert main(["inspect", str(lm_pack[0])]) == 0
    out = capsys.readouterr().out
    assert "MixtralForCausalLM" in out and "experts:" in out and "top-2" in out


def test_configs_by_name(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "jetson-orin-nano-8gb" in out and "cpu-dev" in out


def test_bench_moe_mistakes_before_any_work(capsys, tmp_path):
    """Wrong bench arguments are named before the model is trained or anything measured:
    --model points where no model is, so reaching the work would fail differently."""
    nowhere = ["--model", tmp_path / "no-model-here"]
    one_line(capsys, ["bench", "moe", *nowhere, "--only", "25% lru,fastest"],
             "unknown contenders ['fastest']")
    one_line(capsys, ["bench", "moe", *nowhere, "--reproject", tmp_path / "run.json"],
             "no such file")
    (tmp_path / "run.json").write_text("not json")
    one_line(capsys, ["bench", "moe", *nowhere, "--reproject", tmp_path / "run.json"],
             "not JSON")
    (tmp_path / "run.json").write_text('{"table": {}}')
    one_line(capsys, ["bench", "moe", *nowhere, "--reproject", tmp_path / "run.json"],
             "no limits, edgert")
    assert not (tmp_path / "no-model-here").exists()
