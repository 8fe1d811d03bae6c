"""The runtime's background updater (``updates.check_s``): a newer signed version of a
loaded pack is applied while the model serves its old version; a refusal is counted and
changes nothing; with no server the runtime serves on."""
from __future__ import annotations

from dataclasses import replace

import pytest
from fleet_helpers import wait_for
from task_packs import assert_matches, config
from update_helpers import Fleet, fresh_dir, upd  # noqa: F401  (fixtures)

import edgert
from edgert.config import DeviceConfig, Updates
from edgert.errors import ConfigError
from edgert.pack import PackReader
from edgert.server.packs import envelope_key
from edgert.update import keys, signed


def auto_config(pub, check_s=0.1) -> DeviceConfig:
    return replace(config(), updates=Updates(str(pub), check_s))


def test_background_update_then_load_the_new_version(upd, tmp_path, fresh_dir):
    fleet = Fleet(upd, tmp_path, f"dir:{tmp_path / 'store'}")
    rt = edgert.Runtime(auto_config(upd.pub), server=fleet.endpoint, device_id="car")
    try:
        m = rt.load(fleet.dev, name="t", task="lane")
        assert wait_for(lambda: rt.stats()["updates"]["checks"] >= 1, timeout=10)
        assert rt.stats()["updates"]["updates"] == 0          # v1 everywhere
        fleet.publish_v2()
        rt.updater.check_now()
        assert wait_for(lambda: rt.stats()["updates"]["updates"] == 1, timeout=20)
        st = rt.stats()["updates"]["packs"][str(fleet.dev)]
        assert st["version"] == 1 and st["changed_bytes"] > 0
        with PackReader(fleet.dev) as r:
            assert r.generation == 1 and r.verify() == []
        for t in ("lane", "sign"):                             # still the old version
            assert_matches(m.run({"image": upd.x}, task=t)["logits"], upd.ref[t])
        m2 = rt.load(fleet.dev, name="t2")
        assert_matches(m2.run({"image": upd.x}, task="lane")["logits"], upd.ref_v2["lane"])
    finally:
        rt.close()
        fleet.stop()


def test_background_refusal_changes_nothing(upd, tmp_path, fresh_dir):
    fleet = Fleet(upd, tmp_path, f"dir:{tmp_path / 'store'}")
    fleet.publish_v2()
    with PackReader(fleet.srv_pack) as r:
        m = r.manifest
    fleet.store.put(envelope_key(fleet.lineage()), signed.sign(
        keys.load_private(upd.other_priv), fleet.lineage(), m).encode())
    before = fleet.dev.read_bytes()
    rt = edgert.Runtime(auto_config(upd.pub), server=fleet.endpoint, device_id="car")
    try:
        model = rt.load(fleet.dev, name="t")
        assert wait_for(lambda: rt.stats()["updates"]["refused"] >= 1, timeout=10)
        assert "bad signature" in rt.stats()["updates"]["packs"][str(fleet.dev)]["refused"]
        assert fleet.dev.read_bytes() == before
        assert_matches(model.run({"image": upd.x}, task="lane")["logits"], upd.ref["lane"])
    finally:
        rt.close()
        fleet.stop()


def test_no_server_costs_nothing(upd, tmp_path):
    dev = tmp_path / "dev.edgepack"
    dev.write_bytes(upd.v1.read_bytes())
    rt = edgert.Runtime(auto_config(upd.pub), server="tcp://127.0.0.1:9", device_id="car")
    try:
        m = rt.load(dev, name="t")
        assert wait_for(lambda: rt.stats()["updates"]["errors"] >= 1, timeout=20)
        assert_matches(m.run({"image": upd.x}, task="sign")["logits"], upd.ref["sign"])
    finally:
        rt.close()


def test_check_s_config(upd):
    base = {"name": "d", "memory": {"total": "64 MiB"}}
    got = DeviceConfig.from_dict({**base, "updates": {"public_key": str(upd.pub),
                                                      "check_s": 3600}})
    assert got.updates.check_s == 3600.0
    for bad, why in (({"check_s": 10}, "needs updates.public_key"),
                     ({"public_key": str(upd.pub), "check_s": -1},
                      "updates.check_s: expected float >= 0"),
                     ({"public_key": str(upd.pub), "check_s": "often"},
                      "updates.check_s: expected float")):
        with pytest.raises(ConfigError, match=why):
            DeviceConfig.from_dict({**base, "updates": bad})
