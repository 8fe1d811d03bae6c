"""Fixtures of the fault suite (issue 17 item 9): tiny packs built once per session, CURVE
keys, and the shared `edgert serve` processes (harness.py has the Serve and Peer classes).

    main     tasks, lm and lm2 on the default ipc endpoint of a private XDG_RUNTIME_DIR,
             default caps; started again only when a case left it dead, busy or with a
             model unloaded
    strict   tasks and lm with small caps in the config's `service:` section,
             `--drain-timeout 1` and `--pack-dir`
    curve    tasks and lm over TCP loopback with CURVE on (bob allowed, mallory not)
"""
from __future__ import annotations

import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from edgert.control.auth import generate
from faults.harness import LM_POSITIONS, Serve, ServeFailed, short_dir, write_config
from task_packs import TinyTasks, tiny  # noqa: F401  (tiny is a fixture)


CASE_LIMIT_S = 240     # a case that hangs (a client stuck in a send) fails instead


@pytest.fixture(autouse=True)
def no_hang():
    """Turn a hang into a failure: SIGALRM raises in the test's thread, and pyzmq's
    blocking calls give way to signal handlers."""
    def hung(signum, frame):
        raise TimeoutError(f"the case ran for more than {CASE_LIMIT_S} s")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(CASE_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# --- packs, keys ----------------------------------------------------------------------------------
@dataclass
class Packs:
    tasks: TinyTasks
    lm: Path                 # a tiny Mixtral with a byte vocabulary and a 16k context


@pytest.fixture(scope="session")
def packs(tiny, tmp_path_factory) -> Packs:  # noqa: F811  (tiny is a fixture)
    from edgert.pack.hf_import import pack_hf
    from moe_models import mixtral_config, save
    d = tmp_path_factory.mktemp("fault-packs")
    ckpt = save(mixtral_config(vocab_size=256, max_position_embeddings=LM_POSITIONS),
                d / "ckpt")
    pack_hf(ckpt, d / "lm.edgepack", progress=False)
    return Packs(tiny, d / "lm.edgepack")


@dataclass
class ServiceKeys:
    server: tuple[Path, Path]          # (public .key, .key_secret)
    bob: tuple[Path, Path]             # allowed: the callers of the tests
    carol: tuple[Path, Path]           # allowed: the harness's own health and stats calls
    mallory: tuple[Path, Path]         # not allowed
    allow: Path

    def as_client(self, who: str, server_public: Path | None = None) -> tuple[Path, Path]:
        """(server public key file, ``who``'s secret file): what Client(curve=) takes."""
        return (server_public or self.server[0], getattr(self, who)[1])


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> ServiceKeys:
    d = tmp_path_factory.mktemp("fault-keys")
    own, allow = d / "own", d / "allow"
    k = {who: generate(own, who) for who in ("server", "bob", "carol", "mallory")}
    allow.mkdir()
    for who in ("bob", "carol"):
        shutil.copy(k[who][0], allow / f"{who}.key")
    return ServiceKeys(k["server"], k["bob"], k["carol"], k["mallory"], allow)


# --- the shared services --------------------------------------------------------------------------
class Shared:
    """One service for the session, started on first use and started again when a case
    left it dead, busy or with fewer models than it serves."""

    def __init__(self, make, models: int):
        self.make, self.models, self.serve = make, models, None

    def get(self) -> Serve:
        if self.serve is not None and self.serve.usable(self.models):
            return self.serve
        if self.serve is not None:
            self.serve.kill()
        self.serve = None
        self.serve = self.make()
        return self.serve

    def close(self) -> None:
        if self.serve is not None:
            self.serve.kill()


@pytest.fixture(scope="session")
def runtime_dir():
    """XDG_RUNTIME_DIR of the main service: its default endpoint lives in here."""
    d = short_dir("edgert-x")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def _main(packs, tmp_path_factory, runtime_dir):
    work = tmp_path_factory.mktemp("fault-main")
    cfg = write_config(work / "main.yaml")
    shared = Shared(lambda: Serve(work, {"tasks": packs.tasks.pack, "lm": packs.lm,
                                         "lm2": packs.lm}, cfg,
                                  env={"XDG_RUNTIME_DIR": str(runtime_dir)}), models=3)
    yield shared
    shared.close()


@pytest.fixture
def main(_main) -> Serve:
    """tasks, lm and lm2 on the default endpoint (XDG_RUNTIME_DIR = runtime_dir), default
    caps, idle."""
    return _main.get()


STRICT_LIMITS = {"max_jobs_per_client": 4, "max_jobs": 6, "max_tokens_per_client": 3000,
                 "max_tokens": 5000, "max_queued_bytes": "200 KiB", "drain_timeout_s": 30}


@pytest.fixture(scope="session")
def pack_dir(tmp_path_factory) -> Path:
    """The strict service's --pack-dir."""
    return tmp_path_factory.mktemp("fault-pack-dir")


@pytest.fixture(scope="session")
def _strict(packs, tmp_path_factory, pack_dir):
    work = tmp_path_factory.mktemp("fault-strict")
    cfg = write_config(work / "strict.yaml", service=STRICT_LIMITS)
    sock = short_dir("edgert-s")
    # NOTE: --drain-timeout 1 over the config's 30: the flag wins, and streams past it end
    shared = Shared(lambda: Serve(work, {"tasks": packs.tasks.pack, "lm": packs.lm}, cfg,
                                  bind=f"ipc://{sock}/s.sock",
                                  args=["--drain-timeout", "1", "--pack-dir", str(pack_dir)]),
                    models=2)
    yield shared
    shared.close()
    shutil.rmtree(sock, ignore_errors=True)


@pytest.fixture
def strict(_strict) -> Serve:
    """tasks and lm with STRICT_LIMITS, --drain-timeout 1, --pack-dir pack_dir; idle."""
    try:
        return _strict.get()
    except ServeFailed as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def _curve(packs, keys, tmp_path_factory):
    work = tmp_path_factory.mktemp("fault-curve")
    cfg = write_config(work / "curve.yaml")
    shared = Shared(lambda: Serve(work, {"tasks": packs.tasks.pack, "lm": packs.lm}, cfg,
                                  bind="tcp://127.0.0.1:0",
                                  args=["--curve-secret", str(keys.server[1]),
                                        "--allow-dir", str(keys.allow)],
                                  curve=keys.as_client("bob"),
                                  admin_curve=keys.as_client("carol")), models=2)
    yield shared
    shared.close()


@pytest.fixture
def curve(_curve) -> Serve:
    """tasks and lm over TCP loopback with CURVE on: bob (the tests' peers) and carol (the
    harness's health and stats: a caller of its own, since caps count per key) are
    allowed, mallory is not."""
    return _curve.get()
