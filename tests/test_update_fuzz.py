"""The update parsers fuzzed: a signed envelope with any byte changed is refused with
UpdateRefused (never another exception, never accepted); a staging file of any bytes
yields only blocks whose hash matches."""
from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from update_helpers import upd  # noqa: F401  (a fixture)

import pytest

from edgert.pack import PackReader
from edgert.pack.format import block_hash
from edgert.update import keys, signed
from edgert.update.staging import MAGIC, Staging

_ENV = {}


def envelope(upd):
    if not _ENV:
        with PackReader(upd.v1) as r:
            m, lin = r.manifest, signed.lineage_of(r)
        m.generation = 1
        _ENV.update(raw=signed.sign(keys.load_private(upd.priv), lin, m).encode(), lin=lin,
                    pub=keys.load_public(upd.pub))
    return _ENV


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_changed_byte_is_refused(upd, data):
    e = envelope(upd)
    raw = bytearray(e["raw"])
    assert signed.check(signed.decode(bytes(raw)), e["pub"], e["lin"], 0) is not None
    for i in data.draw(st.sets(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
        raw[i] ^= data.draw(st.integers(1, 255))
    if len(raw) > 10 and data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    with pytest.raises(signed.UpdateRefused):
        signed.check(signed.decode(bytes(raw)), e["pub"], e["lin"], 0)


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=2000), good=st.lists(st.binary(min_size=1, max_size=64),
                                                    max_size=4))
def test_staging_of_any_bytes_keeps_only_verified_blocks(tmp_path_factory, blob, good):
    d = tmp_path_factory.mktemp("stage")
    pack = str(d / "p.edgepack")
    target = b"T" * 16
    s = Staging(pack, target, {block_hash(g) for g in good})
    s.add({block_hash(g): g for g in good})
    s.close()
    with open(s.path, "ab") as f:                    # garbage after the good records
        f.write(blob)
    s = Staging(pack, target, {block_hash(g) for g in good} | {b"x" * 16})
    assert s.have == {block_hash(g): g for g in good}
    s.close()
    with open(s.path, "wb") as f:                    # garbage instead of the file
        f.write(MAGIC[:4] + blob if blob[:1] == b"\0" else blob)
    s = Staging(pack, target, {block_hash(g) for g in good})
    assert all(block_hash(v) == h for h, v in s.have.items())
    s.remove_all()
    assert not os.path.exists(s.path)
