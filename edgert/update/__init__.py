"""Signed differential pack updates (docs/updates.md).

keys.py     Ed25519 signing keys (the server signs, devices pin the public key)
signed.py   lineage ids, the position-free manifest, the signed envelope and its checks
staging.py  the resumable download: verified blocks, durable, beside the pack
graft.py    commit a target manifest onto a local pack (append-only)
fetch.py    the device side: ask, check, fetch what is missing, commit
"""
from .signed import UpdateRefused

__all__ = ["UpdateRefused"]
