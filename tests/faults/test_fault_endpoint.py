"""Where a service listens and what it loads (issue 17 items 8 and 9): a second `edgert
serve` on an endpoint in use is refused in one line and the first goes on answering; a
busy TCP port is one line, not an internal error; `load` takes packs only from --pack-dir
and its errors never echo a file's bytes; a wrong `service:` value is one line naming it."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys

import pytest

from edgert.control.client import Client, RemoteError
from faults.harness import ROOT, WAIT, write_config


def serve_once(args: list[str], env: dict | None = None) -> tuple[int, str, str]:
    """Run `edgert serve` that is expected to refuse to start: (exit status, stdout,
    stderr). One that starts instead is stopped, and that is a failure."""
    proc = subprocess.Popen([sys.executable, "-m", "edgert", "serve", *args], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        line = proc.stdout.readline()        # "ready on ..." or nothing (it exited)
        if "ready on" in line:
            proc.terminate()
            out, err = proc.communicate(timeout=WAIT)
            pytest.fail(f"a second service started: {line.strip()}")
        out, err = proc.communicate(timeout=WAIT)
        return proc.returncode, line + out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_a_second_serve_on_the_default_endpoint_is_refused_and_the_first_answers(
        main, packs, runtime_dir, tmp_path):
    cfg = write_config(tmp_path / "second.yaml")
    rc, out, err = serve_once(["--pack", f"tasks={packs.tasks.pack}", "--config", str(cfg)],
                              env={"XDG_RUNTIME_DIR": str(runtime_dir)})
    assert rc != 0 and "ready on" not in out
    path = main.endpoint.removeprefix("ipc://")
    assert path in one_line(err)
    with Client(main.endpoint, timeout=5, retries=0) as fresh:     # a new connection
        assert fresh.health()["status"] == "ok"


def test_a_busy_tcp_port_is_one_line_not_an_internal_error(packs, tmp_path):
    cfg = write_config(tmp_path / "tcp.yaml")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, out, err = serve_once(["--pack", f"tasks={packs.tasks.pack}", "--config",
                                   str(cfg), "--bind", f"tcp://127.0.0.1:{port}"])
    line = one_line(err)
    assert rc != 0 and str(port) in line and "internal" not in line, (rc, line)


@pytest.mark.parametrize("key,value", [("max_jobs", 0), ("drain_timeout_s", "soon")])
def test_a_wrong_service_value_is_one_line_naming_the_key(tmp_path, packs, key, value):
    cfg = write_config(tmp_path / "bad.yaml", service={key: value})
    rc, _, err = serve_once(["--pack", f"tasks={packs.tasks.pack}", "--config", str(cfg),
                             "--bind", f"ipc://{tmp_path}/never.sock"])
    assert rc != 0 and f"service.{key}" in one_line(err)


SECRET = secrets.token_hex(4)      # 8 bytes, repeated: any 8 bytes of the file are a rotation


def secret_file(path) -> str:
    path.write_text(SECRET * 16)
    return str(path)


def echoes(message: str) -> bool:
    """Whether ``message`` holds 8 or more consecutive bytes of a secret_file."""
    return any((SECRET * 2)[i:i + 8] in message for i in range(8))


def test_load_errors_never_echo_the_file(main, tmp_path):
    with pytest.raises(RemoteError) as e:
        main.admin.load(secret_file(tmp_path / "notes.edgepack"))
    assert not echoes(str(e.value)) and e.value.code != "internal", str(e.value)


def test_load_and_reload_take_packs_only_from_the_pack_dirs(strict, pack_dir, packs,
                                                            tmp_path):
    outside = secret_file(tmp_path / "outside.edgepack")
    bad_inside = secret_file(pack_dir / "bad.edgepack")
    good = pack_dir / "tasks2.edgepack"
    shutil.copy(packs.tasks.pack, good)
    peer = strict.peer()
    try:
        for path in (outside, f"{pack_dir}/../{tmp_path.name}/outside.edgepack",
                     str(packs.lm)):
            rep = peer.call("load", {"path": path})
            assert not rep.ok and rep.code == "forbidden", (path, rep)
            assert not echoes(rep.message), rep.message
        rep = peer.call("load", {"path": bad_inside})
        assert not rep.ok and rep.code not in ("internal", "forbidden"), rep
        assert not echoes(rep.message), rep.message
        rep = peer.call("reload", {"name": "lm", "path": outside})
        assert not rep.ok and rep.code == "forbidden", rep
        assert peer.call("generate", {"prompt": [1, 2], "max_new_tokens": 4,
                                      "model": "lm"}).ok     # the old model still serves
        rep = peer.call("load", {"path": str(good), "name": "t2"})
        assert rep.ok and rep.result["name"] == "t2", rep
        assert peer.call("unload", {"name": "t2"}).ok
    finally:
        peer.close()
