"""An update killed mid-download (kill -9, a real `edgert update` process) resumes where
it stopped and never leaves a pack that fails `edgert verify`; an update while the device
service serves, then a reload that switches to it without dropping a request."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleet_helpers import wait_for
from task_packs import assert_matches, config
from update_helpers import Fleet, fresh_dir, upd  # noqa: F401  (fixtures)

import edgert
from edgert.cli import main
from edgert.control.client import Client
from edgert.control.service import Service
from edgert.pack import PackReader
from edgert.update import keys
from edgert.update.fetch import PackSource, update

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def edgert_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "edgert", *map(str, args)]


def slow_blocks(fleet, seconds: float) -> None:
    """Make the server answer each pack_blocks request ``seconds`` late."""
    inner = fleet.srv._ops["pack_blocks"]

    def slow(args):
        time.sleep(seconds)
        return inner(args)
    fleet.srv._ops["pack_blocks"] = slow


def staged_bytes(dev: Path) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(f"{dev}.update-*"))


def test_kill_9_mid_download_then_resume(upd, tmp_path, fresh_dir, capsys):
    fleet = Fleet(upd, tmp_path, f"dir:{tmp_path / 'store'}")
    try:
        fleet.publish_v2()
        slow_blocks(fleet, 0.1)
        before = fleet.dev.read_bytes()
        cmd = edgert_cmd("update", fleet.dev, "--server", fleet.endpoint, "--public-key",
                         upd.pub, "--batch-bytes", 4096, "--json")
        p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert wait_for(lambda: staged_bytes(fleet.dev) > 40000, timeout=60), \
                p.stderr.read1().decode() if p.poll() is not None else "nothing staged"
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        finally:
            p.kill()
        staged = staged_bytes(fleet.dev)
        assert fleet.dev.read_bytes() == before            # nothing appended yet
        assert main(["verify", str(fleet.dev)]) == 0        # `edgert verify`, in process
        assert capsys.readouterr().out.startswith("OK")
        with PackReader(fleet.dev) as r:
            assert r.generation == 0
        fleet.srv._ops["pack_blocks"] = fleet.shelf.ops()["pack_blocks"]
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        rep = json.loads(done.stdout)
        assert rep["updated"] and rep["version_to"] == 1
        assert 0 < rep["resumed_bytes"] < rep["changed_bytes"]
        assert rep["resumed_bytes"] >= staged - 8 - 20 * rep["changed_blocks"] - 4096
        assert rep["bytes_downloaded"] == rep["envelope_bytes"] + rep["changed_bytes"] \
            - rep["resumed_bytes"]
        assert staged_bytes(fleet.dev) == 0                # staging gone after the commit
        with PackReader(fleet.dev) as r:
            assert r.generation == 1 and r.verify() == []
        rt = edgert.Runtime(config())
        try:
            m = rt.load(fleet.dev, name="t")
            for t in upd.files:
                assert_matches(m.run({"image": upd.x}, task=t)["logits"], upd.ref_v2[t])
        finally:
            rt.close()
    finally:
        fleet.stop()


def test_torn_staging_record_is_cut_and_refetched(upd, tmp_path, fresh_dir):
    fleet = Fleet(upd, tmp_path, f"dir:{tmp_path / 'store'}")
    try:
        fleet.publish_v2()
        src = PackSource(fleet.endpoint)
        pub = keys.load_public(upd.pub)

        class Stop(Exception):
            pass

        def stop_after_3(rep):
            if rep.blocks_downloaded >= 3:
                raise Stop
        try:
            update(str(fleet.dev), src, pub, batch_bytes=4096, on_batch=stop_after_3)
        except Stop:
            pass
        (stage,) = glob.glob(f"{fleet.dev}.update-*")
        with open(stage, "r+b") as f:                       # a torn last record
            f.truncate(os.path.getsize(stage) - 100)
        rep = update(str(fleet.dev), src, pub, batch_bytes=1 << 20)
        src.close()
        assert rep.updated and 0 < rep.resumed_bytes < rep.changed_bytes
        assert rep.blocks_downloaded == rep.changed_blocks - 2    # the torn third refetched
        with PackReader(fleet.dev) as r:
            assert r.verify() == [] and r.generation == 1
    finally:
        fleet.stop()


def test_update_while_the_service_serves_then_reload(upd, tmp_path, fresh_dir):
    fleet = Fleet(upd, tmp_path, f"dir:{tmp_path / 'store'}")
    # NOTE: during the reload both versions run requests: engine room for two
    rt = edgert.Runtime(config(extra="32 MiB"))
    m = rt.load(fleet.dev, name="tasks", prepack="off")
    svc = Service(rt, "tcp://127.0.0.1:0", models={"tasks": m},
                  pack_dirs=[fleet.dev.parent]).start()
    stop, errors, served = threading.Event(), [], {"v1": 0, "v2": 0}

    def traffic():
        with Client(svc.endpoint, timeout=30) as c:
            while not stop.is_set():
                for t in ("lane", "sign"):
                    try:
                        y = c.infer({"image": upd.x}, task=t)["logits"]
                    except Exception as e:       # any failure is what the test counts
                        errors.append(repr(e))
                        continue
                    if t == "lane":
                        v1 = abs(y - upd.ref["lane"]).max() <= 1e-4
                        v2 = abs(y - upd.ref_v2["lane"]).max() <= 1e-4
                        if v1 == v2:
                            errors.append("lane output is neither v1 nor v2")
                        served["v1" if v1 else "v2"] += 1
    th = threading.Thread(target=traffic)
    th.start()
    try:
        assert wait_for(lambda: served["v1"] >= 3, timeout=30)
        fleet.publish_v2()
        src = PackSource(fleet.endpoint)
        rep = update(str(fleet.dev), src, keys.load_public(upd.pub), batch_bytes=8192)
        src.close()
        assert rep.updated
        n = served["v1"]
        assert wait_for(lambda: served["v1"] >= n + 3, timeout=30)   # still v1 after commit
        assert served["v2"] == 0
        with Client(svc.endpoint, timeout=30) as c:
            d = c.reload("tasks")
            assert d["retired"] == 0
            assert_matches(c.infer({"image": upd.x}, task="lane")["logits"], upd.ref_v2["lane"])
        assert wait_for(lambda: served["v2"] >= 3, timeout=30)
    finally:
        stop.set()
        th.join(60)
        svc.close()
        rt.close()
        fleet.stop()
    assert errors == []


def test_one_update_and_one_appender_at_a_time(upd, tmp_path, fresh_dir):
    from edgert.errors import EdgertError
    from edgert.pack import PackWriter
    from edgert.update.fetch import _update_lock
    fleet = Fleet(upd, tmp_path, f"dir:{tmp_path / 'store'}")
    try:
        fleet.publish_v2()
        src = PackSource(fleet.endpoint)
        pub = keys.load_public(upd.pub)
        with _update_lock(str(fleet.dev)):                     # another updater holds it
            with pytest.raises(EdgertError, match="another update of it is running"):
                update(str(fleet.dev), src, pub)
        w = PackWriter.append(fleet.dev)                       # another appender holds it
        try:
            with pytest.raises(EdgertError, match="another process is appending"):
                update(str(fleet.dev), src, pub)
        finally:
            w.abort()
        assert update(str(fleet.dev), src, pub).updated        # then it goes through
        src.close()
        with PackReader(fleet.dev) as r:
            assert r.verify() == [] and r.generation == 1
    finally:
        fleet.stop()
