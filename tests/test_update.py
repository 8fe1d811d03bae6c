"""Signed differential pack updates end to end: publish v1, device at v1, publish v2,
update, outputs equal ONNX Runtime on the v2 task files; every refusal leaves the pack as
committed and the old version serving; both stores."""
from __future__ import annotations

import msgpack
import pytest
from fleet_helpers import redis_url  # noqa: F401  (a fixture)
from task_packs import assert_matches, config
from update_helpers import Fleet, fresh_dir, upd  # noqa: F401  (fixtures)

import edgert
from edgert.pack import PackReader
from edgert.pack.manifest import Manifest
from edgert.server.packs import block_key, envelope_key
from edgert.update import keys, signed
from edgert.update.fetch import PackSource, update
from edgert.update.graft import missing_blocks
from edgert.update.signed import UpdateRefused


@pytest.fixture(params=["dir", "redis"])
def fleet(request, upd, tmp_path, fresh_dir):
    spec = f"dir:{tmp_path / 'store'}" if request.param == "dir" else \
        request.getfixturevalue("redis_url")
    f = Fleet(upd, tmp_path, spec)
    yield f
    f.stop()


def run_update(fleet, **kw):
    src = PackSource(fleet.endpoint)
    try:
        return update(str(fleet.dev), src, keys.load_public(fleet.upd.pub), **kw)
    finally:
        src.close()


def outputs(pack, upd) -> dict:
    rt = edgert.Runtime(config())
    try:
        m = rt.load(pack, name="t")
        return {t: m.run({"image": upd.x}, task=t)["logits"] for t in upd.files}
    finally:
        rt.close()


def test_round_trip_moves_only_the_changed_blocks(fleet, upd):
    with PackReader(fleet.dev) as r:
        old = r.manifest
    rep = run_update(fleet)                       # v1 everywhere: nothing to do
    assert not rep.updated and rep.blocks_downloaded == 0 and rep.version_to == 0
    fleet.publish_v2()
    with PackReader(fleet.srv_pack) as r:
        want = missing_blocks(old, r.manifest)
    rep = run_update(fleet)
    assert rep.updated and (rep.version_from, rep.version_to) == (0, 1)
    assert rep.changed_blocks == rep.blocks_downloaded == len(want) > 0
    assert rep.changed_bytes == sum(want.values())
    assert rep.bytes_downloaded == rep.changed_bytes + rep.envelope_bytes
    with PackReader(fleet.dev) as r:
        assert r.generation == 1 and r.verify() == [] and r.ignored_tail == 0
    for t, y in outputs(fleet.dev, upd).items():
        assert_matches(y, upd.ref_v2[t])           # lane is v2 now, the others v1
    again = run_update(fleet)
    assert not again.updated and again.blocks_downloaded == 0 and again.version_from == 1


def _signed_other(fleet, upd, manifest: Manifest, lineage: bytes, key_path) -> bytes:
    return signed.sign(keys.load_private(key_path), lineage, manifest).encode()


def _tamper(fleet, upd, case: str) -> None:
    """Put what a compromised store or mirror would serve under the device's lineage."""
    lin = fleet.lineage()
    key = envelope_key(lin)
    with PackReader(fleet.srv_pack) as r:
        v2 = r.manifest
    if case == "unsigned":
        env = signed.decode(fleet.store.get(key))
        raw = msgpack.packb({"lineage": env.lineage, "version": env.version,
                             "manifest": env.manifest}, use_bin_type=True)
    elif case == "wrong key":
        raw = _signed_other(fleet, upd, v2, lin, upd.other_priv)
    elif case == "altered manifest":
        env = signed.decode(fleet.store.get(key))
        m = Manifest.decode(env.manifest, data_end=signed.PORTABLE_END)
        m.config["base"] = "evil.onnx"
        raw = signed.Signed(env.lineage, env.version, signed.portable(m), env.signature).encode()
    elif case in ("older", "equal"):
        with PackReader(upd.v1) as r:
            m = r.manifest
        m.generation = 0 if case == "older" else 1
        if case == "equal":
            m.config["note"] = "same version, other content"
        raw = _signed_other(fleet, upd, m, lin, upd.priv)
    elif case == "other lineage":
        with PackReader(upd.other) as r:
            m = r.manifest
            other_lin = signed.lineage_of(r)
        m.generation = 5
        raw = _signed_other(fleet, upd, m, other_lin, upd.priv)
    elif case == "bad block":
        h = next(iter(missing_blocks(_dev_manifest(fleet), v2)))
        n = fleet.store.sizes([block_key(h)])[0]
        fleet.store.put(block_key(h), bytes(n - 1) + b"\x01")
        return
    else:
        raise AssertionError(case)
    fleet.store.put(key, raw)


def _dev_manifest(fleet) -> Manifest:
    with PackReader(fleet.dev) as r:
        return r.manifest


REFUSALS = {"unsigned": "unsigned manifest", "wrong key": "bad signature",
            "altered manifest": "bad signature", "older": "not newer", "equal": "not newer",
            "other lineage": "another lineage", "bad block": "bad block"}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_append_nothing_and_the_old_version_serves(upd, tmp_path, fresh_dir, case):
    fleet = Fleet(upd, tmp_path, f"dir:{tmp_path / 'store'}")
    rt = edgert.Runtime(config())
    try:
        m = rt.load(fleet.dev, name="t", task="lane")
        if case in ("older", "equal"):
            fleet.publish_v2()
            run_update(fleet)                      # the device is at v1
        else:
            fleet.publish_v2()
        before = fleet.dev.read_bytes()
        _tamper(fleet, upd, case)
        with pytest.raises(UpdateRefused) as e:
            run_update(fleet)
        msg = str(e.value)
        assert REFUSALS[case] in msg and "\n" not in msg, msg
        assert fleet.dev.read_bytes() == before    # nothing appended
        with PackReader(fleet.dev) as r:
            assert r.verify() == []
        want = upd.ref_v2 if case in ("older", "equal") else upd.ref
        if case not in ("older", "equal"):         # the loaded model serves the old version
            for t in ("sign", "lane"):
                assert_matches(m.run({"image": upd.x}, task=t)["logits"], want[t])
    finally:
        rt.close()
        fleet.stop()


def test_a_second_server_on_the_same_redis_serves_the_update(upd, tmp_path, fresh_dir,
                                                              redis_url):  # noqa: F811
    (tmp_path / "a").mkdir()
    a = Fleet(upd, tmp_path / "a", redis_url)
    a.publish_v2()
    a.stop()                                       # the publisher is gone
    b_root = tmp_path / "b"
    b_root.mkdir()
    b = Fleet(upd, b_root, redis_url)              # serves an empty-handed v1 directory
    try:
        b.dev.write_bytes(upd.v1.read_bytes())
        rep = run_update(b)
        assert rep.updated and rep.version_to == 1
        for t, y in outputs(b.dev, upd).items():
            assert_matches(y, upd.ref_v2[t])
    finally:
        b.stop()


@pytest.mark.parametrize("blob", [b"", b"\x00" * 10, msgpack.packb([1, 2]),
                                  msgpack.packb({"lineage": b"x" * 16, "version": -1}),
                                  msgpack.packb({"lineage": b"x" * 16, "version": True,
                                                 "manifest": b"", "signature": b""})])
def test_envelope_garbage_is_refused(blob):
    with pytest.raises(UpdateRefused):
        signed.decode(blob)


def test_a_new_signing_key_republishes_what_the_old_one_signed(upd, tmp_path, fresh_dir):
    """After a key change the store's envelopes are signed again: a device pinned to the
    new key updates; one pinned to the old key refuses."""
    from edgert.server.service import FleetServer
    fleet = Fleet(upd, tmp_path, f"dir:{tmp_path / 'store'}")
    fleet.publish_v2()
    fleet.srv.stop()
    fleet.thread.join(5)
    fleet.store.close()
    from edgert.server.backends import open_store
    fleet.store = open_store(f"dir:{tmp_path / 'store'}")
    fleet.srv = FleetServer(fleet.store, "tcp://127.0.0.1:0",
                            packs=(tmp_path / "srv", keys.load_private(upd.other_priv)))
    fleet.endpoint = fleet.srv.endpoint
    import threading
    fleet.thread = threading.Thread(target=fleet.srv.run, daemon=True)
    fleet.thread.start()
    try:
        with pytest.raises(UpdateRefused, match="bad signature"):
            run_update(fleet)                      # pinned to the old key
        src = PackSource(fleet.endpoint)
        try:
            rep = update(str(fleet.dev), src, keys.load_public(upd.other_pub))
        finally:
            src.close()
        assert rep.updated and rep.version_to == 1
    finally:
        fleet.stop()
