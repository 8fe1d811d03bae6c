"""edgert installed from its wheel, outside the checkout: into a fresh virtual environment
and with `pip install --target DIR`, run from a directory that is not the checkout.

Nothing is downloaded: the wheel is built without isolation and installed without its
dependencies, which the fresh environment reuses from the one running the tests."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, cwd, env=None, timeout=300) -> str:
    # NOTE: the checkout is never on the path: cwd is elsewhere and PYTHONPATH is replaced
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | (env or {})
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("wheels")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", d, ROOT], cwd=d)
    return next(d.glob("edgert-*.whl"))


def test_the_wheel_carries_configs_and_recipes(wheel):
    import zipfile
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "edgert/device_configs/cpu-dev.yaml" in names
    assert {f"edgert/recipes/{m}.py" for m in ("tasks", "trained", "bert", "moe")} <= names
    assert not any(n.startswith("models/") for n in names)


def test_fresh_venv_outside_the_checkout(wheel, tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    vpy = venv / "bin" / "python"
    vsite = Path(_run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      cwd=work).strip())
    # the dependencies (torch, onnxruntime, ...) from the running environment; a .pth line
    # adds the directory only, so the editable install of the checkout there stays off
    (vsite / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", vpy, "install", "-q", "--no-deps", wheel],
         cwd=work)
    # the probe also imports what `bench switch` builds its BERT and trained task sets with
    probe = ("import importlib.util, edgert; "
             "assert edgert.__file__.startswith(%r), edgert.__file__; "
             "assert importlib.util.find_spec('models') is None; "
             "import edgert.recipes.bert, edgert.recipes.trained, edgert.bench.switch; "
             "print(edgert.Runtime('cpu-dev').config.name)" % str(vsite))
    assert _run([vpy, "-c", probe], cwd=work).split() == ["cpu-dev"]
    out = _run([venv / "bin" / "edgert", "demo", "--quick"], cwd=work)
    assert "switches" in out and (work / "models/out/tasks-tiny.edgepack").exists()
    assert "one-time start-up, left out of the ratios" in out   # measured apart
    # what `bench kv` and `bench moe` run to train their models (here two steps)
    _run([vpy, "-m", "edgert.recipes.moe", "--quick", "--shape", "fine", "--steps", "2",
          "--out", work / "moe"], cwd=work)
    assert (work / "moe" / "config.json").exists()


def test_pip_install_target(wheel, tmp_path):
    target, work = tmp_path / "app", tmp_path / "work"
    work.mkdir()
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
          wheel], cwd=work)
    probe = ("import edgert; assert edgert.__file__.startswith(%r), edgert.__file__; "
             "print(edgert.Runtime('cpu-dev').config.name, edgert.Runtime().config.name, "
             "edgert.Runtime('jetson-orin-nano-8gb').config.name)" % str(target))
    env = {"PYTHONPATH": str(target)}
    assert _run([sys.executable, "-c", probe], cwd=work, env=env).split() == \
        ["cpu-dev", "cpu-dev", "jetson-orin-nano-8gb"]


def test_shallow_target_and_zip(wheel, tmp_path):
    """The package two directories below / (like /app/edgert) and inside a zip file: the
    config lookup guesses no install prefix."""
    import zipfile
    app = tmp_path / "a"
    zipfile.ZipFile(wheel).extractall(app)
    zipped = tmp_path / "edgert.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for f in (app / "edgert").rglob("*"):
            if "__pycache__" not in f.parts:
                z.write(f, f.relative_to(app))
    probe = "import edgert.config as c; print(c.resolve('jetson-orin-nx-16gb').name, c.shipped()[0])"
    for path in (app, zipped):
        out = _run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(path)})
        assert out.split() == ["jetson-orin-nx-16gb", "cpu-dev"]
