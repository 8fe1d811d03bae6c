"""`torch.compile` of the MoE decode step's pure pieces, chosen by the device config's
``compile: auto | on | off``, with a clean fallback to eager.

- ``off``: eager. ``on``: compiled (inductor; on CUDA ``mode="reduce-overhead"``, CUDA
  graphs). ``auto``: compiled on CUDA, eager on the CPU. NOTE: on this project's CPU dev
  machine (2 shared cores, g++) a fresh process took 160 s (cold cache) and 54 s (warm) to
  compile one small function, and the compiled expert step decoded no faster than eager
  (`edgert bench moe-step`, docs/benchmarks.md): dynamo's per-call guards on the step's many
  weight tensors cost about what the fused kernels save at this size. ``on`` is there to
  measure it, and for CUDA, where each op is also a kernel launch.
- Compilation happens at the first call; its time is measured and reported apart
  (`Compiled.compile_s`), never counted as decode time by callers that read it.
- Any failure (no C++ compiler, an unsupported op, a backend error) logs one line with the
  reason and the function runs eagerly from then on, with the same results.
- Compiled artefacts go to ``<scratch_dir>/torch-compile`` (inductor's cache directory;
  `cache_dir`), so a restarted process reuses them; the directory is pruned to `CACHE_CAP` bytes, oldest
  files first, each time a model sets it up.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from edgert.config import COMPILE_MODES as MODES

log = logging.getLogger(__name__)
CACHE_CAP = 512 << 20          # bytes of compiled artefacts kept under the scratch dir


def wanted(mode: str, device: str) -> bool:
    """Whether `mode` compiles on `device` ("cpu" | "cuda")."""
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r}: one of {', '.join(MODES)}")
    return mode == "on" or (mode == "auto" and device == "cuda")


def cache_dir(scratch_dir: str) -> Path:
    """<scratch_dir>/torch-compile; without a scratch dir the user's cache directory
    ($XDG_CACHE_HOME or ~/.cache)/edgert/torch-compile, as the KV disk tier does."""
    if scratch_dir:
        return Path(scratch_dir).expanduser() / "torch-compile"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgert" / \
        "torch-compile"


def use_cache_dir(path: Path, cap: int = CACHE_CAP) -> None:
    """Point inductor's on-disk cache (FX graphs, kernels) at `path`, pruned to `cap` bytes.
    NOTE: inductor reads the variable for the whole process; the last model set up wins,
    which is the same directory for every model of one runtime."""
    path.mkdir(parents=True, exist_ok=True)
    prune(path, cap)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)


def prune(path: Path, cap: int) -> int:
    """Delete the oldest files under `path` until it holds at most `cap` bytes; bytes left."""
    files = []
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
        except OSError:
            continue
    total = sum(s for _, s, _ in files)
    for _, size, p in sorted(files, key=lambda f: f[0]):
        if total <= cap:
            break
        try:
            p.unlink()
            total -= size
        except OSError:
            continue
    return total


class Compiled:
    """`fn` compiled on first call, or eager after a failure (logged once with its reason).

    `compile_s`: seconds the first (compiling) call took, None before it; `failed`: the
    reason compilation was given up, else None."""

    def __init__(self, fn, name: str, device: str = "cpu", compiler=None):
        import torch
        self.fn, self.name = fn, name
        self.compile_s: float | None = None
        self.failed: str | None = None
        mode = "reduce-overhead" if device == "cuda" else None
        try:
            self._compiled = (compiler or torch.compile)(fn, mode=mode, dynamic=False)
        except Exception as e:  # noqa: BLE001 -- any failure to compile means eager
            self._give_up(e)

    def _give_up(self, e: BaseException) -> None:
        self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self._compiled = None
        log.warning("torch.compile of %s failed (%s); it runs eagerly", self.name, self.failed)

    def __call__(self, *args):
        f = self._compiled
        if f is None:
            return self.fn(*args)
        t0 = time.perf_counter()
        try:
            out = f(*args)
        except Exception as e:  # noqa: BLE001 -- compilation runs at a call (first, new shape)
            self._give_up(e)    # and its errors surface there; the math is pure, so rerun it
            return self.fn(*args)
        if self.compile_s is None:
            self.compile_s = time.perf_counter() - t0
            log.info("torch.compile of %s: %.1f s (first call)", self.name, self.compile_s)
        return out

    def stats(self) -> dict:
        return {"compiled": self._compiled is not None and self.compile_s is not None,
                "compile_s": self.compile_s, "failed": self.failed}


def for_model(fn, name: str, config, device: str):
    """`fn` as the device config asks: itself (eager), or a `Compiled` using the config's
    scratch dir for its cache."""
    if not wanted(config.compile, device):
        return fn
    use_cache_dir(cache_dir(config.storage.scratch_dir))
    return Compiled(fn, name, device)
