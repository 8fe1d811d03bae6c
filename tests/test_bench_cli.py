"""`edgert bench NAME`: the options are parsed in edgert/cli/bench.py and each benchmark's
module in edgert/bench/ is imported only when it runs."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from edgert.cli import build_parser

BENCH = Path(__file__).resolve().parents[1] / "edgert" / "bench"
RUNNABLE = sorted(p.stem for p in BENCH.glob("*.py") if "\ndef main(" in p.read_text())


def test_the_runnable_benchmarks_are_the_expected_ones():
    assert RUNNABLE == ["contention", "control", "fleet", "kv", "moe", "moe_step", "soak",
                        "switch", "update"]


@pytest.mark.parametrize("name", RUNNABLE)
def test_each_benchmark_parses_on_the_command_line_and_runs_its_module(name):
    cmd = name.replace("_", "-")                  # moe_step.py is `edgert bench moe-step`
    args = build_parser().parse_args(["bench", cmd, "--quick", "--json", "out.json"])
    assert (args.command, args.bench, args.quick, args.json) == ("bench", cmd, True, "out.json")
    module = args.func.args[0]
    assert module == f"edgert.bench.{name}"
    assert callable(importlib.import_module(module).main)


def test_parsing_imports_no_benchmark_and_no_torch():
    """`edgert ...` starts in well under a second: building the parser loads no benchmark,
    and `import edgert` no torch or ONNX Runtime (a model's load brings them)."""
    code = ("import sys; from edgert.cli import build_parser; "
            "build_parser().parse_args(['bench', 'moe', '--quick']); "
            "print(sorted(m for m in sys.modules if m.startswith('edgert.bench.') "
            "or m in ('torch', 'onnxruntime', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
