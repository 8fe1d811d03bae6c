"""The benchmarks behind `edgert bench NAME` (BENCHMARKS.md, docs/benchmarks.md): each module
measures edgert against named baselines, prints a table, writes JSON and plots. The command
line lives in edgert/cli/bench.py."""
