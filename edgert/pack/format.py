"""Pack format v1: constants, header and footer codecs, block hashing.

Layout (see docs/pack-format.md):

    header (4096 B) | block extents, each 4 KiB-aligned | manifest (msgpack) | pad | footer (64 B)

Footers always start at a 4 KiB-aligned offset, so a reader that finds a torn tail
(crash mid-append) can walk back to the newest intact footer.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3

from ..align import ALIGN, align_up  # noqa: F401  (re-exported: pack code imports them here)

MAGIC = b"EDGEPACK"
FOOTER_MAGIC = b"EDGEFOOT"
VERSION = 1
HEADER_SIZE = ALIGN
HASH_BYTES = 16
DEFAULT_BLOCK_SIZE = 64 * 1024
MAX_MANIFEST_BYTES = 1 << 30  # a manifest larger than 1 GiB is corrupt, not a pack
ZERO_OFFSET = 0               # a block entry at this offset is a zero block: no bytes stored
                              # (the header lives there, so no stored extent can start at 0)
MAX_ZERO_BLOCK = 1 << 28      # longest zero block; bounds the hashing a damaged manifest costs
_ZEROS = bytes(1 << 20)

# header: magic, version, header size, alignment, reserved, checksum of the preceding bytes
_HEADER = struct.Struct("<8sIIIQ16s")
# footer: magic, version, manifest offset, manifest length, manifest hash,
#         previous footer offset (0 = none), generation, checksum of the preceding bytes
_FOOTER_BODY = struct.Struct("<8sIQQ16sQI")
FOOTER_SIZE = 64
assert _FOOTER_BODY.size + 8 <= FOOTER_SIZE


def block_hash(data) -> bytes:
    """Content name of a block: the first 16 bytes of its blake3 digest."""
    return blake3.blake3(data).digest(length=HASH_BYTES)


def zero_hashes(lengths) -> dict[int, bytes]:
    """`block_hash` of ``n`` zero bytes for each n in ``lengths`` (each <= MAX_ZERO_BLOCK).

    One incremental pass up to the longest length, so many distinct lengths cost no more
    hashing than the longest one.
    """
    out, h, done = {}, blake3.blake3(), 0
    for n in sorted(set(lengths)):
        assert 0 <= n <= MAX_ZERO_BLOCK, n
        while done < n:
            step = min(n - done, len(_ZEROS))
            h.update(memoryview(_ZEROS)[:step])
            done += step
        out[n] = h.digest(length=HASH_BYTES)
    return out


def encode_header() -> bytes:
    body = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, ALIGN, 0, b"\0" * 16)
    digest = block_hash(body[: _HEADER.size - 16])
    body = body[: _HEADER.size - 16] + digest
    return body + b"\0" * (HEADER_SIZE - len(body))


def decode_header(raw: bytes) -> None:
    """Validate a header; raise ValueError with the reason (the reader wraps it)."""
    if len(raw) < _HEADER.size:
        raise ValueError("file shorter than the pack header")
    magic, version, hsize, align, _, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ValueError("bad magic: not an edgert pack")   # NOTE: never echo file bytes
    if block_hash(raw[: _HEADER.size - 16]) != digest:
        raise ValueError("header checksum mismatch")
    if version != VERSION:
        raise ValueError(f"pack format version {version}; this edgert reads version {VERSION}")
    if hsize != HEADER_SIZE or align != ALIGN:
        raise ValueError(f"unexpected header size {hsize} or alignment {align}")


@dataclass(frozen=True)
class Footer:
    manifest_offset: int
    manifest_length: int
    manifest_hash: bytes
    prev_footer: int
    generation: int

    def encode(self) -> bytes:
        body = _FOOTER_BODY.pack(FOOTER_MAGIC, VERSION, self.manifest_offset, self.manifest_length,
                                 self.manifest_hash, self.prev_footer, self.generation)
        body += block_hash(body)[:8]
        return body + b"\0" * (FOOTER_SIZE - len(body))

    @staticmethod
    def decode(raw: bytes) -> "Footer":
        if len(raw) < FOOTER_SIZE:
            raise ValueError("footer truncated")
        body = raw[: _FOOTER_BODY.size]
        if raw[: 8] != FOOTER_MAGIC:
            raise ValueError("no footer magic")
        if block_hash(body)[:8] != raw[_FOOTER_BODY.size: _FOOTER_BODY.size + 8]:
            raise ValueError("footer checksum mismatch")
        magic, version, off, length, mhash, prev, gen = _FOOTER_BODY.unpack(body)
        if version != VERSION:
            raise ValueError(f"footer version {version}")
        return Footer(off, length, mhash, prev, gen)
