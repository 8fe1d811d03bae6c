"""One budget per KV directory, whichever processes and models write to it (edgert/kv/chunkdir.py
and the disk tier's use of it): real processes writing at once, a new model counting other
models' files, recency across models, clean misses for chunks evicted elsewhere, and
writers killed while holding the lock or a reservation."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgert.kv.chunkdir import LOCK_NAME
from edgert.kv.disk import SUFFIX, DiskTier

ROOT = Path(__file__).resolve().parent.parent
PAGE = 16 << 10                     # 16 KiB pages, 4 to a chunk: 68 KiB files
CHUNK = 4096 + 4 * PAGE


def dir_bytes(root: Path) -> int:
    """Every chunk and temporary file under root."""
    total = 0
    for f in root.rglob("*"):
        if f.is_file() and (f.name.endswith(SUFFIX) or f.name.endswith(".tmp")):
            try:
                total += f.stat().st_size
            except FileNotFoundError:
                pass
    return total


def locked_dir_bytes(root: Path) -> int:
    """dir_bytes while holding the directory's lock: no file is half accounted."""
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return dir_bytes(root)
    finally:
        os.close(fd)


def names(fp: bytes, i: int) -> list[bytes]:
    """Page names of chunk i of model fp (the same in every process of that model)."""
    return [fp[:8] + i.to_bytes(4, "little") + j.to_bytes(4, "little") for j in range(4)]


def pages(i: int) -> list[np.ndarray]:
    return [np.full(PAGE, (i * 4 + j) % 251, np.uint8) for j in range(4)]


_WRITER = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_kv_chunkdir import names, pages, PAGE
from edgert.kv.disk import DiskTier
fp = bytes([{model}]) * 16
t = DiskTier({root!r}, fp, {budget}, PAGE)
hits = misses = 0
for i in range({chunks}):
    assert t.write(names(fp, i), fp, range(64), pages(i))
    k = i // 2                      # an earlier chunk: here, or evicted by anyone
    run = t.run(names(fp, k))
    outs = [np.empty(PAGE, np.uint8) for _ in range(4)]
    if run and t.read(names(fp, k)[-1], 0, names(fp, k), range(64), outs):
        assert all((o == p).all() for o, p in zip(outs, pages(k))), "wrong bytes"
        hits += 1
    else:
        misses += 1
print(json.dumps({{**t.stats(), "hits": hits, "misses": misses}}))
"""


@pytest.mark.parametrize("models", [(1, 2), (1, 1, 2, 3)], ids=["2 processes", "4 processes"])
def test_processes_writing_at_once_keep_the_directory_within_its_budget(tmp_path, models):
    """Each process's budget alone would let N processes fill N budgets; the directory must
    stay within one at every instant (sampled under its lock) and at the end. Two of the
    four processes share a model (and so chunk names)."""
    root, budget = tmp_path / "kv", 15 * CHUNK
    root.mkdir()
    procs = [subprocess.Popen(
        [sys.executable, "-c", _WRITER.format(tests=str(ROOT / "tests"), model=m,
                                              root=str(root), budget=budget, chunks=30)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in models]
    peak = 0
    while any(p.poll() is None for p in procs):
        peak = max(peak, locked_dir_bytes(root))
        time.sleep(0.002)
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    peak = max(peak, dir_bytes(root))
    stats = [json.loads(o) for o, _ in outs]
    assert sum(s["writes"] for s in stats) >= 30 * len(set(models))
    assert sum(s["evictions"] for s in stats) > 0
    assert peak <= 1.05 * budget, f"{peak / budget:.2f}x the budget"
    assert sum(s["hits"] for s in stats) > 0      # reads still verified and used


def test_a_new_model_counts_other_models_files_and_evicts_least_recently_used(tmp_path):
    """Before, a model whose own subdirectory did not exist yet ignored every other model's
    files, so its first writes went over the budget."""
    budget = 6 * CHUNK
    a_fp, b_fp = b"a" * 16, b"b" * 16
    a = DiskTier(tmp_path, a_fp, budget, PAGE)
    for i in range(6):
        assert a.write(names(a_fp, i), a_fp, range(64), pages(i))
    a.touch([names(a_fp, 0)[-1]])                   # a0 used last: kept longest
    b = DiskTier(tmp_path, b_fp, budget, PAGE)      # b's directory does not exist yet
    assert b.stats()["others_bytes"] == 6 * CHUNK
    for i in range(3):
        assert b.write(names(b_fp, i), b_fp, range(64), pages(i))
        assert dir_bytes(tmp_path) <= budget
    left = {f.name for f in a.dir.glob("*" + SUFFIX)}
    assert left == {names(a_fp, i)[-1].hex() + SUFFIX for i in (0, 4, 5)}
    # a still indexes a1: reading it is a clean miss, not a damaged file
    outs = [np.empty(PAGE, np.uint8) for _ in range(4)]
    assert a.run(names(a_fp, 1)) and not a.read(names(a_fp, 1)[-1], 0, names(a_fp, 1),
                                                range(64), outs)
    assert a.stats()["deleted_bad"] == 0 and not a.run(names(a_fp, 1))
    assert a.write(names(a_fp, 6), a_fp, range(64), pages(6))      # a's next write counts b
    assert a.stats()["chunks"] == 3 and dir_bytes(tmp_path) <= budget


_KILLED = """
import fcntl, os, sys
sys.path.insert(0, {tests!r})
from test_kv_chunkdir import names, pages, PAGE
from edgert.kv.disk import DiskTier
real = {real}
def killed(*a):
    r = real(*a)
    os.kill(os.getpid(), 9)
    return r
{patch} = killed
fp = b"k" * 16
DiskTier({root!r}, fp, 1 << 30, PAGE).write(names(fp, 0), fp, range(64), pages(0))
"""


def _killed_writer(root: Path, patch: str) -> int:
    real = {"os.fsync": "os.fsync", "fcntl.flock": "fcntl.flock"}[patch]
    code = _KILLED.format(tests=str(ROOT / "tests"), root=str(root), real=real, patch=patch)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True).returncode


def test_a_writer_killed_mid_write_or_holding_the_lock_neither_blocks_nor_leaks_budget(tmp_path):
    budget = 4 * CHUNK
    fp = b"t" * 16
    t = DiskTier(tmp_path, fp, budget, PAGE)
    for i in range(3):
        assert t.write(names(fp, i), fp, range(64), pages(i))
    # kill -9 after the chunk's bytes are written, before the rename: a whole chunk's worth
    # of temporary file is left that no live process will rename
    assert _killed_writer(tmp_path, "os.fsync") == -9
    assert [f.name for f in tmp_path.rglob("*.tmp")]
    assert t.write(names(fp, 3), fp, range(64), pages(3))   # reclaimed by this running tier
    assert not list(tmp_path.rglob("*.tmp")) and t.stats()["deleted_tmp"] == 1
    assert dir_bytes(tmp_path) <= budget and t.stats()["chunks"] == 4
    # kill -9 while holding the directory's lock: the kernel releases it
    assert _killed_writer(tmp_path, "fcntl.flock") == -9
    done = threading.Event()
    w = threading.Thread(target=lambda: (t.write(names(fp, 4), fp, range(64), pages(4)),
                                         done.set()), daemon=True)
    w.start()
    w.join(timeout=30)
    assert done.is_set(), "the lock of a killed process is still held"
    assert dir_bytes(tmp_path) <= budget


def test_a_dead_writers_temporary_file_with_this_processs_pid_is_reclaimed(tmp_path):
    """A restarted service in a container often gets its predecessor's pid: a temporary
    file named with our pid that this process is not writing is a dead writer's, and its
    reservation must not hold the budget forever."""
    budget = 4 * CHUNK
    fp = b"p" * 16
    t = DiskTier(tmp_path, fp, budget, PAGE)
    assert t.write(names(fp, 0), fp, range(64), pages(0))
    stale = t.dir / f".{'33' * 16}.{os.getpid()}.1.tmp"
    stale.write_bytes(b"\0" * 3 * CHUNK)
    assert t.write(names(fp, 1), fp, range(64), pages(1))
    assert not stale.exists() and t.stats()["deleted_tmp"] == 1
    assert t.stats()["chunks"] == 2 and dir_bytes(tmp_path) <= budget
