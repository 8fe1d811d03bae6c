"""The host and disk tiers: budgets, concurrency, restart recovery, damaged and foreign
chunk files, a crash between write and rename, LRU over files of earlier processes, what a
clean exit leaves, and reads that would be slower than recomputing."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import edgert
from edgert.config import KvCache, parse_bytes
from edgert.kv.disk import SUFFIX, DiskTier
from edgert.kv.host import HostTier
from edgert.pack.hf_import import pack_hf
from moe_models import device_config, mixtral_config, prompt, save

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    out = []
    for seed in (0, 1):                                # two models: one is foreign to the other
        d = save(mixtral_config(max_position_embeddings=2048), tmp_path_factory.mktemp("m") / "m",
                 seed=seed)
        pack_hf(d, d.parent / "m.edgepack", progress=False)
        out.append(d.parent / "m.edgepack")
    return out


def config(tmp_path, host="0", disk="16 MiB", chunk=64):
    kvc = KvCache(True, chunk, parse_bytes(host, "host"), parse_bytes(disk, "disk"),
                  str(tmp_path / "kv"))
    return replace(device_config(), kv_cache=kvc)


def load(pack, cfg, **kw):
    return edgert.Runtime(cfg).load(pack, expert_budget=1.0, **kw)


def first_tokens(lm, ids, n=4):
    return lm.generate(ids, max_new_tokens=n)


def chunk_files(lm) -> list[Path]:
    return sorted(lm.kv.disk.dir.glob("*" + SUFFIX))


def disk(lm) -> dict:
    return lm.stats()["kv"]["prefix"]["tiers"]["disk"]


# --- host tier ------------------------------------------------------------------------------
def test_host_tier_keeps_its_budget_prefix_closed_under_concurrent_use():
    page = 4096
    host = HostTier(6 * page, page)
    name = lambda i: i.to_bytes(16, "little")          # noqa: E731
    fill = lambda i: (lambda out: (out.fill(i % 251), True)[1])   # noqa: E731
    for i in range(4):                                 # one chain 0 <- 1 <- 2 <- 3
        assert host.put(name(i), name(i - 1) if i else None, fill(i))
    host.touch([name(0)])                              # the root used last: still kept longest
    for i in range(10, 13):                            # three roots: two evictions
        assert host.put(name(i), None, fill(i))
    assert host.run([name(i) for i in range(4)]) != [] and name(3) not in host
    assert host.stats()["bytes_used"] <= 6 * page
    errors, stop = [], threading.Event()

    def writer(base):
        for i in range(base, base + 300):
            host.put(name(i), name(i - 1) if i > base else None, fill(i))

    def reader():
        while not stop.is_set():
            for i in range(100, 1300):
                d = host.get(name(i))
                if d is not None and not (d == i % 251).all():
                    errors.append(i)

    ts = [threading.Thread(target=writer, args=(b,)) for b in (100, 500, 900)]
    r = threading.Thread(target=reader)
    r.start()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    r.join()
    assert not errors and host.stats()["bytes_used"] <= 6 * page


# --- disk tier ------------------------------------------------------------------------------
def test_restart_recovers_the_index_and_bad_files_are_deleted_then_recomputed(packs, tmp_path):
    pack, other_pack = packs
    cfg = config(tmp_path)
    ids = prompt(4 * 64 + 10, seed=1)                  # 4 whole chunks
    want = first_tokens(load(pack, replace(cfg, kv_cache=replace(cfg.kv_cache, prefix=False))),
                        ids)
    lm = load(pack, cfg)
    assert first_tokens(lm, ids) == want
    lm.close()                                         # every full chunk reaches the disk
    files = chunk_files(lm)
    assert len(files) == 4 and disk(load(pack, cfg))["chunks"] == 4
    # damage: a flipped page byte (found at read), a truncated file, a wrongly named file,
    # another model's chunk under this model's name, a crashed writer's temporary file
    by_order = sorted(files, key=lambda f: _first_page(f))
    flip, trunc, misnamed = by_order[0], by_order[2], by_order[3]
    b = bytearray(flip.read_bytes())
    b[len(b) - lm.kv.disk.stride + 100] ^= 0xFF        # a byte of the last page's K/V
    flip.write_bytes(bytes(b))
    os.truncate(trunc, trunc.stat().st_size - 4096)
    misnamed.rename(misnamed.with_name("00" * 16 + SUFFIX))
    foreign = load(other_pack, config(tmp_path))
    first_tokens(foreign, prompt(64, seed=2))
    foreign.close()
    stolen = chunk_files(foreign)[0]
    (flip.parent / ("11" * 16 + SUFFIX)).write_bytes(stolen.read_bytes())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (flip.parent / f".{'22' * 16}.{dead}.1.tmp").write_bytes(b"half a chunk")
    lm = load(pack, cfg)
    st = disk(lm)
    assert st["deleted_bad"] == 3 and st["deleted_tmp"] == 1 and st["chunks"] == 2
    assert first_tokens(lm, ids) == want               # chunk 0 fails its sum: recomputed
    st = disk(lm)
    assert st["deleted_bad"] == 4 and st["hit_tokens"] == 0
    lm.close()
    names = {f.name for f in flip.parent.iterdir()}
    assert not any(n.endswith(".tmp") for n in names) and "11" * 16 + SUFFIX not in names
    assert len(chunk_files(lm)) == 4                   # recomputed and written again
    again = load(pack, cfg)
    assert first_tokens(again, ids) == want and disk(again)["hit_tokens"] == 256


def _first_page(f: Path) -> int:
    """How many chunks of the chain precede chunk file `f`."""
    import msgpack
    from edgert.kv.disk import _HEAD
    raw = f.read_bytes()
    _, n, _ = _HEAD.unpack_from(raw)
    parent = f.parent / (msgpack.unpackb(raw[_HEAD.size:_HEAD.size + n])["parent"].hex() + SUFFIX)
    return 1 + _first_page(parent) if parent.exists() else 0


_CRASH = """
import os, sys
from dataclasses import replace
sys.path.insert(0, {tests!r})
import edgert
from edgert.config import KvCache
from moe_models import device_config, prompt
real = os.replace
def crash(src, dst):
    if str(dst).endswith(".kvc"):
        os._exit(3)                                    # killed between write and rename
    return real(src, dst)
os.replace = crash
cfg = replace(device_config(), kv_cache=KvCache(True, 64, 0, 16 << 20, {kv!r}))
lm = edgert.Runtime(cfg).load({pack!r}, expert_budget=1.0)
lm.generate(prompt(70, seed=3), max_new_tokens=2)
lm.close()
"""


def test_a_crash_between_write_and_rename_leaves_nothing_usable(packs, tmp_path):
    pack = packs[0]
    code = _CRASH.format(tests=str(ROOT / "tests"), kv=str(tmp_path / "kv"), pack=str(pack))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 3, p.stderr
    d = next(p for p in (tmp_path / "kv").iterdir() if p.is_dir())
    assert [f.name for f in d.iterdir() if f.name.endswith(".tmp")]
    assert not list(d.glob("*" + SUFFIX))
    lm = load(pack, config(tmp_path))
    assert disk(lm)["deleted_tmp"] == 1 and disk(lm)["chunks"] == 0
    ids = prompt(70, seed=3)
    off = load(pack, device_config(), prefix_cache=False)
    assert first_tokens(lm, ids, 2) == first_tokens(off, ids, 2)
    lm.close()
    assert len(chunk_files(lm)) == 1


def test_the_disk_budget_evicts_least_recently_used_chunks_and_old_files(packs, tmp_path):
    pack = packs[0]
    probe = load(pack, config(tmp_path, disk="64 MiB"))
    first_tokens(probe, prompt(64, seed=4), 1)
    probe.close()
    size = chunk_files(probe)[0].stat().st_size
    for f in chunk_files(probe):
        f.unlink()
    # files an earlier process left: another model's chunks, older than anything here
    old = tmp_path / "kv" / ("ab" * 16)
    old.mkdir()
    for i in range(2):
        f = old / (f"{i:032x}" + SUFFIX)
        f.write_bytes(b"x" * size)
        os.utime(f, ns=(1, 1))
    cfg = config(tmp_path, disk=str(4 * size))
    lm = load(pack, cfg)
    assert disk(lm)["others_bytes"] == 2 * size
    a, b, c = (prompt(128, seed=s) for s in (5, 6, 7))        # two chunks each
    first_tokens(lm, a, 1)
    lm.kv.drain()
    first_tokens(lm, b, 1)
    lm.kv.drain()                                      # a, b: the old files went first
    assert not list(old.iterdir()) and disk(lm)["chunks"] == 4
    first_tokens(lm, a, 1)                             # a used again: b is now the oldest
    lm.kv.drain()
    first_tokens(lm, c, 1)
    lm.kv.drain()
    st = disk(lm)
    assert st["bytes_used"] <= 4 * size and st["chunks"] == 4
    held = {f.name for f in chunk_files(lm)}
    from edgert.kv.prefix import chain_hashes
    name = lambda ids, k: chain_hashes(lm.kv.fp, ids, 16)[4 * k - 1].hex() + SUFFIX  # noqa
    assert {name(a, 1), name(a, 2), name(c, 1), name(c, 2)} == held
    lm.close()
    assert sum(f.stat().st_size for f in (tmp_path / "kv").rglob("*" + SUFFIX)) <= 4 * size


_EXIT = """
import sys
from dataclasses import replace
sys.path.insert(0, {tests!r})
import edgert
from edgert.config import KvCache
from moe_models import device_config, prompt
cfg = replace(device_config(), kv_cache=KvCache(True, 64, 1 << 20, 16 << 20, {kv!r}))
lm = edgert.Runtime(cfg).load({pack!r}, expert_budget=1.0)
print(lm.generate(prompt(200, seed=8), max_new_tokens=3))
# no close(): a clean exit must still leave every full chunk on disk
"""


def test_a_clean_exit_leaves_every_full_chunk_and_the_next_process_starts_warm(packs, tmp_path):
    pack = packs[0]
    code = _EXIT.format(tests=str(ROOT / "tests"), kv=str(tmp_path / "kv"), pack=str(pack))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True)
    lm = load(pack, config(tmp_path, host="1 MiB"))
    assert disk(lm)["chunks"] == 3                     # 200 tokens: 3 chunks of 64
    assert str(lm.generate(prompt(200, seed=8), max_new_tokens=3)) == p.stdout.strip()
    st = lm.stats()["kv"]["prefix"]
    assert st["tiers"]["disk"]["hit_tokens"] == 192 and st["computed_tokens"] == 8


def test_a_tier_read_slower_than_recomputing_is_skipped(packs, tmp_path):
    pack = packs[0]
    ids = prompt(130, seed=9)
    cfg = config(tmp_path)
    lm = load(pack, cfg)
    want = first_tokens(lm, ids)
    lm.close()
    lm = load(pack, cfg)
    costs = lm.kv.costs
    assert costs.compute_s_per_token and "disk" not in costs.read_s_per_byte  # last process's
    costs.read_s_per_byte["disk"] = 1.0                # as if the disk read 1 byte per second
    assert first_tokens(lm, ids) == want
    st = disk(lm)
    assert st["hit_tokens"] == 0 and st["skipped_tokens"] == 128
    costs.read_s_per_byte["disk"] = 1e-12              # and a fast one is taken
    lm.kv.clear(("arena",))
    assert first_tokens(lm, ids) == want and disk(lm)["hit_tokens"] == 128


def test_clear_empties_every_tier_and_stats_name_them(packs, tmp_path):
    pack = packs[0]
    lm = load(pack, config(tmp_path, host="1 MiB"))
    ids = prompt(140, seed=10)
    first_tokens(lm, ids)
    lm.kv.drain()
    st = lm.stats()["kv"]["prefix"]
    assert set(st) >= {"lookups", "hit_tokens", "computed_tokens", "tiers"}
    for tier in ("arena", "host", "disk"):
        assert set(st["tiers"][tier]) >= {"hit_tokens", "bytes_read", "bytes_written"}
    assert st["tiers"]["host"]["bytes_written"] > 0 and st["tiers"]["disk"]["bytes_written"] > 0
    lm.kv.clear()
    st = lm.stats()["kv"]
    assert st["tagged"] == 0 and st["idle"] == 0
    tiers = st["prefix"]["tiers"]
    assert tiers["host"]["pages"] == 0 and tiers["disk"]["chunks"] == 0
    assert not chunk_files(lm)
    before = st["prefix"]["hit_tokens"]
    first_tokens(lm, ids)
    assert lm.stats()["kv"]["prefix"]["hit_tokens"] == before
    with pytest.raises(ValueError):
        lm.kv.clear(("cloud",))


def test_disk_tier_alone(tmp_path):
    """The tier without a model: a chunk round trip, and a reader that asks for other
    tokens than the file holds (a hash collision) gets a miss."""
    fp = b"f" * 16
    t = DiskTier(tmp_path, fp, 1 << 20, 1000)
    pages = [np.full(1000, i, np.uint8) for i in range(3)]
    hashes = [bytes([i]) * 16 for i in range(1, 4)]
    assert t.write(hashes, fp, list(range(48)), pages)
    assert t.run(hashes) == [(hashes[-1], 0, 3)]
    outs = [np.empty(1000, np.uint8) for _ in range(2)]
    assert t.read(hashes[-1], 1, hashes[1:], list(range(16, 48)), outs)
    assert all((o == i + 1).all() for i, o in enumerate(outs))
    assert not t.read(hashes[-1], 1, hashes[1:], list(range(17, 49)), outs)   # other tokens
    assert t.stats()["chunks"] == 0                     # a file that disagrees is gone
