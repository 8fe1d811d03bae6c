"""The README's Python blocks run as written, on artefacts of the shapes tools/demo.sh makes
(the demo task models and pack; a two-step run of the MoE recipe in place of its longer one)."""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A directory laid out as after tools/demo.sh: models/out/{tasks,moe-demo}(.edgepack)."""
    from edgert.recipes import moe as recipe
    from edgert.recipes.tasks import build
    from edgert.pack.hf_import import pack_hf
    from edgert.pack.onnx_import import pack_onnx
    d = tmp_path_factory.mktemp("readme")
    out = d / "models" / "out"
    paths = build(str(out / "tasks"), "demo")
    pack_onnx(paths["base"], {k: v for k, v in paths.items() if k != "base"},
              out / "tasks.edgepack")
    recipe.train(out / "moe-demo", replace(recipe.Recipe.from_name("quick"), steps=2,
                                           corpus_limit=64 * 1024), max_minutes=5)
    pack_hf(out / "moe-demo", out / "moe-demo.edgepack", progress=False)
    (d / "device_configs").symlink_to(ROOT / "device_configs")
    return d


def test_readme_has_python_blocks():
    assert python_blocks(), "README.md has no ```python block"


def serve_commands() -> list[str]:
    """The README's `edgert serve ...` command lines (indented code in the text)."""
    return re.findall(r"^    (edgert serve .*)$", (ROOT / "README.md").read_text(), re.M)


@pytest.fixture
def service(demo_dir, tmp_path, monkeypatch):
    """The README's `edgert serve` command, run as written in the demo directory, on the
    default endpoint of a private runtime directory (as a user's session has)."""
    import shlex
    import subprocess
    import sys
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
    cmd = shlex.split(serve_commands()[0])
    proc = subprocess.Popen([sys.executable, "-m", "edgert", *cmd[1:]], cwd=demo_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for line in proc.stdout:
            if "ready on" in line:
                break
        else:
            pytest.fail("edgert serve did not become ready")
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("i", range(len(python_blocks())))
def test_readme_python_block_runs(demo_dir, i, capsys, request):
    code = python_blocks()[i]
    if "edgert.Client" in code:      # a client block needs the service the README starts
        request.getfixturevalue("service")
    cwd = os.getcwd()
    os.chdir(demo_dir)
    try:
        exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().out      # it printed what it says it prints
