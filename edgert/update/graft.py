"""Commit a target manifest onto a local pack: the one append that makes an update real.

Block indices, tasks, sections and config come from the target unchanged; each stored
block's offset is the local one: a block the pack already holds (same hash and length)
is reused where it lies, a new one is appended. The result's portable form equals the
target's, which the caller checked (a signature) or built (``pack ... --append``).
The pack's own append path writes blocks and manifest, fsyncs, then the footer: a crash
before the footer leaves the previous version the newest intact one.
"""
from __future__ import annotations

import os
from dataclasses import replace

from ..errors import EdgertError
from ..pack.format import block_hash
from ..pack.manifest import Manifest
from ..pack.writer import PackWriter
from .signed import portable


def missing_blocks(local: Manifest, target: Manifest) -> dict[bytes, int]:
    """hash -> length of the target's stored blocks the local manifest lacks."""
    have = {(b.hash, b.length) for b in local.blocks if not b.zero}
    return {b.hash: b.length for b in target.blocks
            if not b.zero and (b.hash, b.length) not in have}


def graft(path, target: Manifest, source) -> Manifest:
    """Append ``target`` to the pack at ``path``; ``source[hash]`` gives the bytes of each
    block the pack lacks (checked here against the hash again). The committed manifest."""
    new: dict[bytes, bytes] = {}
    w = PackWriter.append(path)
    committed_end = os.path.getsize(w.path)
    try:
        for b in target.blocks:      # every byte checked before the first one is written
            if not b.zero and b.hash not in new and w.find(b.hash, b.length) is None:
                data = source[b.hash]
                if len(data) != b.length or block_hash(data) != b.hash:
                    raise EdgertError(f"block {b.hash.hex()} does not match its hash")
                new[b.hash] = data
        entries = [b if b.zero else w.find(b.hash, b.length) or w.store_raw(new[b.hash])
                   for b in target.blocks]
        local = replace(target, blocks=entries)
        if portable(local) != portable(target):
            raise EdgertError("grafted manifest differs from its target")  # a bug, not input
        w.replace_manifest(local)
        w.close()
    except BaseException:
        w.abort()
        os.truncate(w.path, committed_end)   # NOTE: no torn tail for `edgert verify` to see
        raise
    return local
