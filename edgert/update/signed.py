"""What the server signs and what a device checks before it takes one byte of an update.

- **Lineage id**: the content hash of a pack's first manifest (generation 0), found by
  walking the footer chain back. A pack and every pack appended from it share it; a pack
  built separately, even of the same models, does not (its first manifest's offsets or
  tasks differ), so an update for one family can never be applied to another.
- **Version**: the manifest's generation. It only grows (each append adds one).
- **Portable manifest**: the manifest with every stored block's offset replaced by
  ``HEADER_SIZE`` (zero blocks keep offset 0). Offsets are local to a file; everything a
  model reads (hashes, lengths, block indices, tasks, sections, config) is kept, so a
  device that grafts the blocks at its own offsets holds exactly the signed content.
- **Envelope** (msgpack): ``{lineage, version, manifest, signature}``; the Ed25519
  signature covers ``DOMAIN | lineage | version (u64 le) | manifest`` (TUF's lessons:
  signed metadata, versions that never go back, no mixing of one family's manifest
  into another's).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, replace

import msgpack

from ..errors import EdgertError
from ..pack.format import FOOTER_SIZE, HASH_BYTES, HEADER_SIZE, Footer
from ..pack.manifest import Manifest
from . import keys

DOMAIN = b"edgert-pack-update/1\0"
MAX_ENVELOPE = 64 << 20          # bytes of a signed envelope (the manifest limit is 1 GiB; an
                                 # update that large is damage, not a model)
SIGNATURE_BYTES = 64
PORTABLE_END = 1 << 62           # data end when validating a portable manifest


class UpdateRefused(EdgertError):
    """An update the device will not apply: unsigned, wrongly signed, not newer, another
    lineage, or a block whose hash does not match. Nothing was appended."""


def lineage_of(reader) -> bytes:
    """The lineage id of an open PackReader: its generation-0 manifest hash."""
    footer, pos = reader.footer, reader.footer_offset
    with open(reader.path, "rb") as f:
        for _ in range(1 << 20):            # a chain longer than this is damage
            if footer.prev_footer == 0:
                return footer.manifest_hash
            pos = footer.prev_footer
            if pos >= reader.footer_offset:
                break
            try:
                footer = Footer.decode(os.pread(f.fileno(), FOOTER_SIZE, pos))
            except ValueError:
                break
    raise EdgertError(f"{reader.path}: footer chain broken at offset {pos}; cannot tell the "
                      "pack's lineage")


def portable(manifest: Manifest) -> bytes:
    """The manifest's bytes with file offsets taken out (see the module docstring)."""
    blocks = [b if b.zero else replace(b, offset=HEADER_SIZE) for b in manifest.blocks]
    return replace(manifest, blocks=blocks).encode()


@dataclass(frozen=True)
class Signed:
    lineage: bytes
    version: int
    manifest: bytes          # portable manifest bytes
    signature: bytes

    def encode(self) -> bytes:
        return msgpack.packb({"lineage": self.lineage, "version": self.version,
                              "manifest": self.manifest, "signature": self.signature},
                             use_bin_type=True)


def _message(lineage: bytes, version: int, manifest: bytes) -> bytes:
    return DOMAIN + lineage + struct.pack("<Q", version) + manifest   # u64: room to grow


def sign(key, lineage: bytes, manifest: Manifest) -> Signed:
    raw = portable(manifest)
    return Signed(lineage, manifest.generation, raw,
                  key.sign(_message(lineage, manifest.generation, raw)))


def decode(raw) -> Signed:
    """Parse an envelope (UpdateRefused naming the field that is wrong); no trust yet."""
    if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) > MAX_ENVELOPE:
        raise UpdateRefused(f"manifest envelope is not bytes of at most {MAX_ENVELOPE}")
    try:
        doc = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True,
                              max_bin_len=MAX_ENVELOPE)
    except Exception as e:   # msgpack raises several unrelated types for bad bytes
        raise UpdateRefused(f"manifest envelope is not valid msgpack ({type(e).__name__})") \
            from None
    if not isinstance(doc, dict):
        raise UpdateRefused("manifest envelope is not a map")
    lineage, version = doc.get("lineage"), doc.get("version")
    manifest, sig = doc.get("manifest"), doc.get("signature")
    if not isinstance(lineage, bytes) or len(lineage) != HASH_BYTES:
        raise UpdateRefused(f"manifest envelope: lineage is not {HASH_BYTES} bytes")
    if type(version) is not int or not 0 <= version < 1 << 32:   # the footer's u32
        raise UpdateRefused("manifest envelope: version is not a non-negative integer")
    if not isinstance(manifest, bytes):
        raise UpdateRefused("manifest envelope: manifest is not bytes")
    if not isinstance(sig, bytes):
        raise UpdateRefused("unsigned manifest: the envelope has no signature")
    return Signed(lineage, version, manifest, sig)


def signed_by(env: Signed, public_key) -> bool:
    return len(env.signature) == SIGNATURE_BYTES and keys.verify(
        public_key, env.signature, _message(env.lineage, env.version, env.manifest))


def check(env: Signed, public_key, lineage: bytes, local_version: int) -> Manifest:
    """The target manifest, once the envelope is signed by ``public_key``, of ``lineage``,
    and newer than ``local_version``; else UpdateRefused naming the first check that
    failed. The order matters: nothing unsigned is parsed beyond the envelope."""
    if not env.signature:
        raise UpdateRefused("unsigned manifest: the envelope has no signature")
    if not signed_by(env, public_key):
        raise UpdateRefused("bad signature: the manifest is not signed by the pinned key")
    if env.lineage != lineage:
        raise UpdateRefused(f"another lineage: the manifest is for {env.lineage.hex()}, this "
                            f"pack is {lineage.hex()}")
    if env.version <= local_version:
        raise UpdateRefused(f"not newer: version {env.version} offered, the pack is at "
                            f"version {local_version}")
    try:
        m = Manifest.decode(env.manifest, data_end=PORTABLE_END)
    except ValueError as e:        # signed but malformed: the signer's bug, still refused
        raise UpdateRefused(f"signed manifest is malformed: {e}") from None
    if m.generation != env.version:
        raise UpdateRefused(f"signed manifest says generation {m.generation}, its envelope "
                            f"version {env.version}")
    if any(not b.zero and b.offset != HEADER_SIZE for b in m.blocks):
        raise UpdateRefused("signed manifest is not in portable form")
    return m
