"""After a plain (non-editable) install, the shipped device configs are found by name."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_configs_by_name_after_a_non_editable_install(tmp_path):
    wheels, prefix = tmp_path / "wheels", tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(wheels.glob("edgert-*.whl"))
    # NOTE: --ignore-installed, or pip would uninstall the editable install running the tests
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--ignore-installed", "--prefix", str(prefix), str(wheel)],
                   check=True, capture_output=True)
    site = next(prefix.glob("lib/python*/site-packages"))
    probe = ("import edgert, edgert.config as c; "
             "assert c.CONFIG_DIR.is_relative_to(%r), c.CONFIG_DIR; "
             "print(edgert.Runtime('jetson-orin-nano-8gb').config.name, edgert.Runtime().config.name)"
             % str(prefix))
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["jetson-orin-nano-8gb", "cpu-dev"]
