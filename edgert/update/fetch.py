"""The device side of an update (`edgert update`, docs/updates.md).

    ask the server for the newest signed envelope of the pack's lineage
    check it (signature by the pinned key, lineage, version newer)  -- signed.check
    blocks the pack lacks = target's stored blocks minus the local manifest's
    fetch those not yet staged, in batches; check each hash; stage them (fsync'd)
    graft: append the new blocks and the target manifest to the pack (one commit)
    read the pack back: its portable manifest must be the signed one

Nothing is appended until every block is staged and checked: a refusal, a kill or a
server gone leaves the pack as it was committed, serving the old version, and the next
run resumes from the staging file.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from ..control.client import Client
from ..control.protocol import MAX_ARRAYS
from ..errors import EdgertError
from ..pack.format import block_hash
from ..pack.reader import PackReader
from . import signed
from .graft import graft, missing_blocks
from .staging import Staging

BATCH_BYTES = 4 << 20      # bytes of blocks per request: a few round trips per MiB-sized task
MAX_BATCH = MAX_ARRAYS     # blocks per request: one array frame each (the server's MAX_HASHES)
TIMEOUT_S = 10.0           # a server publishing a new pack may take seconds to answer


@dataclass
class UpdateReport:
    pack: str
    version_from: int
    version_to: int
    updated: bool               # False: the server's newest is the version the pack holds
    bytes_downloaded: int = 0   # envelope + blocks fetched by this run
    blocks_downloaded: int = 0
    changed_bytes: int = 0      # stored blocks of the target the old version lacks
    changed_blocks: int = 0
    resumed_bytes: int = 0      # of changed_bytes, found in a staging file
    envelope_bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class PackSource(Client):
    """The pack ops of a fleet server (Lazy Pirate, as edgert.Client)."""

    def __init__(self, endpoint: str, timeout: float = TIMEOUT_S, curve=None, retries: int = 1):
        super().__init__(endpoint, timeout=timeout, retries=retries, curve=curve)

    def latest(self, lineage: bytes) -> bytes:
        return self._call("pack_latest", {"lineage": lineage.hex()})["envelope"]

    def packs(self) -> list[dict]:
        """What the server publishes: [{lineage, version, file}]."""
        return self._call("pack_list", {})["packs"]

    def wait_published(self, version: int, timeout: float) -> float:
        """Seconds until the server lists a pack at ``version`` or newer (a publisher
        waiting for its server to pick up an append); EdgertError after ``timeout``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if any(p["version"] >= version for p in self.packs()):
                return time.monotonic() - t0
            time.sleep(0.05)
        raise EdgertError(f"{self.endpoint} did not publish version {version} within "
                          f"{timeout} s")

    def blocks(self, hashes: list[bytes]) -> list:
        return self._call("pack_blocks", {"hashes": [h.hex() for h in hashes]})["blocks"]


def local_state(pack: str):
    """(lineage, manifest) of the committed pack."""
    with PackReader(pack, read_mode="buffered") as r:
        return signed.lineage_of(r), r.manifest


def update(pack: str, source: PackSource, public_key, *, batch_bytes: int = BATCH_BYTES,
           on_batch=None, duty: float = 1.0) -> UpdateReport:
    """Bring ``pack`` to the newest signed version ``source`` offers. UpdateRefused for an
    update that fails a check; EdgertError (ServiceUnavailable) for a server gone, after
    which a later call resumes. ``on_batch(report)`` is called after each staged batch.
    ``duty`` < 1 paces the download for a device that serves meanwhile: after a batch that
    took t seconds it waits t * (1/duty - 1)."""
    if not 0 < duty <= 1:
        raise ValueError(f"duty must be in (0, 1], got {duty!r}")
    with _update_lock(pack):
        return _update(pack, source, public_key, batch_bytes, on_batch, duty)


@contextmanager
def _update_lock(pack: str):
    """One update of a pack at a time (the runtime's updater and `edgert update`, say):
    an flock on ``PACK.lock``, released when the process ends however it ends."""
    fd = os.open(f"{pack}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise EdgertError(f"{pack}: another update of it is running") from None
        yield
    finally:
        os.close(fd)


def _update(pack, source, public_key, batch_bytes, on_batch, duty) -> UpdateReport:
    t0 = time.perf_counter()
    lineage, local = local_state(pack)
    raw = source.latest(lineage)
    env = signed.decode(raw)
    rep = UpdateReport(pack, local.generation, env.version, False, bytes_downloaded=len(raw),
                       envelope_bytes=len(raw))
    if env.version == local.generation and env.lineage == lineage \
            and env.manifest == signed.portable(local):
        signed.check(env, public_key, lineage, local.generation - 1)   # still signed by us
        rep.seconds = time.perf_counter() - t0
        return rep
    target = signed.check(env, public_key, lineage, local.generation)
    need = missing_blocks(local, target)
    rep.changed_blocks, rep.changed_bytes = len(need), sum(need.values())
    staging = Staging(pack, block_hash(env.manifest), set(need))
    try:
        rep.resumed_bytes = staging.resumed_bytes
        todo = [h for h in need if h not in staging.have]
        for batch in _batches(todo, need, batch_bytes):
            tb = time.perf_counter()
            got = source.blocks(batch)
            staging.add(_checked(batch, got, need))
            if duty < 1:
                time.sleep((time.perf_counter() - tb) * (1 / duty - 1))
            rep.blocks_downloaded += len(batch)
            rep.bytes_downloaded += sum(need[h] for h in batch)
            if on_batch is not None:
                on_batch(rep)
        graft(pack, target, staging.have)
    except BaseException:
        staging.close()
        raise
    staging.remove_all()
    with PackReader(pack, read_mode="buffered") as r:
        if r.generation != env.version or signed.portable(r.manifest) != env.manifest:
            raise EdgertError(f"{pack}: committed manifest differs from the signed one")
    rep.updated = True
    rep.seconds = time.perf_counter() - t0
    return rep


def _batches(todo: list[bytes], sizes: dict[bytes, int], batch_bytes: int):
    batch, n = [], 0
    for h in todo:
        if batch and (n + sizes[h] > batch_bytes or len(batch) >= MAX_BATCH):
            yield batch
            batch, n = [], 0
        batch.append(h)
        n += sizes[h]
    if batch:
        yield batch


def _checked(batch: list[bytes], got, sizes: dict[bytes, int]) -> dict[bytes, bytes]:
    if not isinstance(got, list) or len(got) != len(batch):
        raise signed.UpdateRefused(f"server answered {len(got) if isinstance(got, list) else 0}"
                                   f" blocks for {len(batch)} asked")
    out = {}
    for h, g in zip(batch, got):
        if g is None:
            raise EdgertError(f"server lacks block {h.hex()}; try again later")
        data = np.asarray(g, np.uint8).tobytes()
        if len(data) != sizes[h] or block_hash(data) != h:
            raise signed.UpdateRefused(f"bad block: {h.hex()} from the server does not match "
                                       "its hash")
        out[h] = data
    return out
