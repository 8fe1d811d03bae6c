"""The update commands from the command line: keys, `pack ... --append`, `edgert update`
(human and JSON output), `edgert server --packs`, the ``updates:`` config key; and every
mistake is one line."""
from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
from task_packs import assert_matches, config
from test_cli_mistakes import one_line
from update_helpers import Fleet, fresh_dir, upd  # noqa: F401  (fixtures)

import edgert
from edgert.cli import main
from edgert.config import DeviceConfig
from edgert.errors import ConfigError
from edgert.pack import PackReader
from edgert.update import keys, signed


def test_keys_signing_writes_a_private_key_only_its_owner_reads(tmp_path, capsys):
    assert main(["keys", "signing", str(tmp_path / "k")]) == 0
    assert "signing.pub" in capsys.readouterr().out
    priv = tmp_path / "k" / "signing.key"
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY")
    one_line(capsys, ["keys", "signing", tmp_path / "k"], "exists; remove it first")


def test_pack_onnx_append_then_update_from_the_command_line(upd, tmp_path, capsys, fresh_dir):
    fleet = Fleet(upd, tmp_path, f"dir:{tmp_path / 'store'}")
    try:
        size = fleet.srv_pack.stat().st_size
        assert main(["pack", "onnx", "--append", str(fleet.srv_pack), "--task",
                     f"lane={upd.lane_v2}"]) == 0
        out = capsys.readouterr().out
        assert "version 1" in out and "new blocks" in out
        fleet.shelf.refresh(force=True)
        with PackReader(fleet.srv_pack) as r:
            assert r.generation == 1 and r.verify() == []
            assert fleet.srv_pack.read_bytes()[:size] == upd.v1.read_bytes()   # append only
        argv = ["update", str(fleet.dev), "--server", fleet.endpoint, "--public-key",
                str(upd.pub)]
        assert main(argv) == 0
        line = capsys.readouterr().out.strip()
        assert "version 0 -> 1" in line and "bytes downloaded" in line, line
        assert main(argv + ["--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["updated"] is False and rep["version_from"] == 1
        for k in ("bytes_downloaded", "blocks_downloaded", "changed_bytes", "version_to"):
            assert k in rep
        cfg = tmp_path / "device.yaml"                     # the key pinned in the config
        shutil.copy(upd.pub, tmp_path / "fleet.pub")
        cfg.write_text("name: d\nmemory: {total: 64 MiB}\nupdates: {public_key: fleet.pub}\n")
        assert main(argv[:4] + ["--config", str(cfg)]) == 0
        assert "up to date at version 1" in capsys.readouterr().out
        fleet.store.put(f"pk:{fleet.lineage().hex()}", signed.sign(
            keys.load_private(upd.other_priv), fleet.lineage(), _v(fleet.srv_pack, 2)).encode())
        assert main(argv) == 3                             # refused: one line, exit 3
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "refused: bad signature" in err and "unchanged" in err
    finally:
        fleet.stop()


def _v(pack, generation: int):
    with PackReader(pack) as r:
        m = r.manifest
    m.generation = generation
    return m


def test_update_and_server_mistakes_are_one_line(upd, tmp_path, capsys):
    dev = tmp_path / "dev.edgepack"
    shutil.copy(upd.v1, dev)
    one_line(capsys, ["update", dev, "--server", "tcp://127.0.0.1:9"], "no public key pinned")
    one_line(capsys, ["update", tmp_path / "nope.edgepack", "--server", "tcp://127.0.0.1:9",
                      "--public-key", upd.pub], "no such file")
    one_line(capsys, ["update", dev, "--server", "tcp://127.0.0.1:9", "--public-key",
                      upd.priv], "not a PEM public key")
    one_line(capsys, ["update", dev, "--server", "nowhere", "--public-key", upd.pub],
             "endpoint 'nowhere'")
    one_line(capsys, ["update", dev, "--server", "tcp://127.0.0.1:9", "--public-key",
                      upd.pub, "--batch-bytes", "0"], "--batch-bytes")
    one_line(capsys, ["server", "--packs", tmp_path], "--packs and --signing-key go together")
    one_line(capsys, ["server", "--packs", tmp_path / "none", "--signing-key", upd.priv,
                      "--store", f"dir:{tmp_path / 's'}"], "not a directory")
    one_line(capsys, ["server", "--packs", tmp_path, "--signing-key", upd.pub,
                      "--store", f"dir:{tmp_path / 's'}"], "not a PEM private key")
    one_line(capsys, ["pack", "onnx", "--append", dev, "--base", upd.files["lane"], "--task",
                      f"lane={upd.lane_v2}"], "--base does not go with --append")
    one_line(capsys, ["pack", "onnx", "--task", f"lane={upd.lane_v2}"], "--base BASE.onnx")
    one_line(capsys, ["pack", "onnx", "--append", tmp_path / "x.edgepack", "--task",
                      f"lane={upd.lane_v2}"], "no such file")
    assert dev.read_bytes() == upd.v1.read_bytes()


def test_append_refuses_another_graph(upd, tmp_path, capsys):
    import onnx
    dev = tmp_path / "dev.edgepack"
    shutil.copy(upd.v1, dev)
    m = onnx.load(upd.lane_v2)
    m.graph.node[0].name = "renamed"
    onnx.save(m, tmp_path / "odd.onnx")
    one_line(capsys, ["pack", "onnx", "--append", dev, "--task", f"lane={tmp_path / 'odd.onnx'}"],
             "differs from the base node")
    assert dev.read_bytes() == upd.v1.read_bytes()


def test_updates_config_key(tmp_path, upd):
    base = {"name": "d", "memory": {"total": "64 MiB"}}
    assert DeviceConfig.from_dict(base).updates.public_key == ""
    got = DeviceConfig.from_dict({**base, "updates": {"public_key": str(upd.pub)}})
    assert got.updates.public_key == str(upd.pub)
    for bad, why in (({"public_key": 3}, "updates.public_key: expected str"),
                     ({"pubkey": "x"}, r"unknown key updates.pubkey \(known: public_key, check_s\)"),
                     ({"public_key": str(tmp_path / "none.pub")}, "no such file"),
                     ("yes", "expected a mapping")):
        with pytest.raises(ConfigError, match=why) as e:
            DeviceConfig.from_dict({**base, "updates": bad})
        assert "\n" not in str(e.value)


def test_pack_hf_append_adds_only_the_retrained_blocks(tmp_path, capsys):
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file, save_file

    from moe_models import mixtral_config, save
    d1 = save(mixtral_config(), tmp_path / "v1")
    d2 = tmp_path / "v2"
    shutil.copytree(d1, d2)
    (st,) = d2.glob("*.safetensors")
    w = load_file(st)
    name = next(k for k in w if "layers.1." in k and "experts" in k)
    w[name] = (w[name] + 0.5).astype(w[name].dtype)       # one retrained expert tensor
    save_file(w, st, metadata={"format": "pt"})
    pack = tmp_path / "lm.edgepack"
    assert main(["pack", "hf", str(d1), "-o", str(pack), "--quiet"]) == 0
    size = pack.stat().st_size
    assert main(["pack", "hf", str(d2), "--append", str(pack), "--quiet"]) == 0
    assert "version 1" in capsys.readouterr().out
    fresh = tmp_path / "fresh.edgepack"
    assert main(["pack", "hf", str(d2), "-o", str(fresh), "--quiet"]) == 0
    with PackReader(pack) as r, PackReader(fresh) as f:
        assert r.generation == 1 and r.verify() == []
        m = f.manifest
        m.generation = 1
        assert signed.portable(r.manifest) == signed.portable(m)    # the v2 model exactly
        grown = pack.stat().st_size - size
        expert = f.manifest.experts.extent_bytes
        assert grown < size / 4 and grown >= expert          # one expert extent, and a manifest
    assert not list(tmp_path.glob("*.hf-tmp"))
    one_line(capsys, ["pack", "hf", str(d2), "-o", str(fresh), "--append", str(pack)],
             "one of -o")


def test_append_keeps_a_loaded_model_on_its_version(upd, tmp_path):
    dev = tmp_path / "dev.edgepack"
    shutil.copy(upd.v1, dev)
    rt = edgert.Runtime(config())
    try:
        m = rt.load(dev, name="t", task="sign")
        assert main(["pack", "onnx", "--append", str(dev), "--task",
                     f"lane={upd.lane_v2}"]) == 0
        for t in ("lane", "sign", "detect"):                # storage reads of the old version
            assert_matches(m.run({"image": upd.x}, task=t)["logits"], upd.ref[t])
        m2 = rt.load(dev, name="t2")
        assert_matches(m2.run({"image": upd.x}, task="lane")["logits"], upd.ref_v2["lane"])
        assert np.array_equal(m2.run({"image": upd.x}, task="sign")["logits"],
                              m.run({"image": upd.x}, task="sign")["logits"])
    finally:
        rt.close()


def test_update_through_curve(upd, tmp_path, capsys):
    """A server behind CURVE serves updates only to devices whose key it allows."""
    import threading

    from edgert.control.auth import generate
    from edgert.server.service import FleetServer
    from edgert.server.backends import open_store
    srv_pub, srv_sec = generate(tmp_path / "curve", "server")
    dev_pub, dev_sec = generate(tmp_path / "curve", "car")
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(dev_pub, allow / "car.key")
    (tmp_path / "srv").mkdir()
    shutil.copy(upd.v1, tmp_path / "srv" / "tasks.edgepack")
    from edgert.update.append import append_onnx
    append_onnx(tmp_path / "srv" / "tasks.edgepack", {"lane": upd.lane_v2})
    dev = tmp_path / "dev.edgepack"
    shutil.copy(upd.v1, dev)
    store = open_store(f"dir:{tmp_path / 'store'}")
    srv = FleetServer(store, "tcp://127.0.0.1:0", curve_secret=str(srv_sec),
                      allow_dir=str(allow), packs=(tmp_path / "srv",
                                                   keys.load_private(upd.priv)))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    try:
        argv = ["update", str(dev), "--server", srv.endpoint, "--public-key", str(upd.pub)]
        assert main(argv + ["--curve", str(srv_pub), str(dev_sec)]) == 0
        assert "version 0 -> 1" in capsys.readouterr().out
        other_pub, other_sec = generate(tmp_path / "curve", "stranger")
        one_line(capsys, argv + ["--curve", str(srv_pub), str(other_sec)], "pack_latest")
    finally:
        srv.stop()
        th.join(5)
        store.close()
