"""`edgert serve` (the device service), `edgert client` (one op from the shell) and
`edgert keys generate` (CurveZMQ key pairs). Protocol: docs/protocol.md."""
from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputMismatch
from ..heap import cap_heap_arenas
from .arguments import named

HEAP_ARENAS = 2     # malloc arenas for `edgert serve` (MALLOC_ARENA_MAX, where set, wins)


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve packs to other processes over ZeroMQ",
                       description="Load packs into one runtime and serve them on a ZeroMQ "
                       "ROUTER socket (protocol: docs/protocol.md). Prints the endpoint when "
                       "ready; SIGINT/SIGTERM stop it cleanly.")
    s.add_argument("--pack", action="append", required=True, metavar="[NAME=]PATH",
                   help="a task or MoE pack to serve (NAME: the file's stem by default)")
    s.add_argument("--config", metavar="CFG", help="device config YAML (default: cpu-dev)")
    s.add_argument("--bind", metavar="ENDPOINT", help="ipc://PATH or tcp://HOST:PORT (default: "
                   "ipc:// under $XDG_RUNTIME_DIR/edgert); all interfaces only when named")
    s.add_argument("--curve-secret", metavar="FILE", help="the service's .key_secret file")
    s.add_argument("--allow-dir", metavar="DIR", help="public keys (*.key) of clients allowed")
    s.add_argument("--admin-dir", metavar="DIR",
                   help="public keys allowed to load, unload, reload and shut down")
    s.add_argument("--pack-dir", action="append", default=[], metavar="DIR",
                   help="a directory whose packs clients may load or reload by path "
                   "(none: the load op is refused)")
    s.add_argument("--drain-timeout", type=float, metavar="S",
                   help="seconds a reload or unload waits for in-flight requests on the old "
                   "model (default: the config's service.drain_timeout_s)")
    s.add_argument("--workers", type=int, metavar="N",
                   help="worker threads (default: the config's service.workers)")
    s.add_argument("--max-inflight", type=int, metavar="N",
                   help="requests one caller may have at work at once (more: 'busy'; "
                   "default: the config's service.max_jobs_per_client)")
    s.add_argument("--server", metavar="ENDPOINT",
                   help="the fleet server (`edgert server`; overrides the config's server:, "
                   "\"\" for none); docs/fleet.md")
    s.add_argument("--device-id", metavar="ID",
                   help="this device's name to the fleet server (default: $EDGERT_DEVICE_ID, "
                   "else the host name)")
    s.set_defaults(func=_serve)

    from ..control.client import RETRIES, TIMEOUT_S
    c = sub.add_parser("client", help="send one op to a device service",
                       description="Drive `edgert serve` from the shell: .npy files in, .npz "
                       "out, JSON for the rest.")
    c.add_argument("endpoint", metavar="ENDPOINT")
    c.add_argument("--timeout", type=float, default=TIMEOUT_S, metavar="S",
                   help=f"seconds of silence before a retry (default {TIMEOUT_S:g})")
    c.add_argument("--retries", type=int, default=RETRIES, metavar="N",
                   help=f"resends of a silent request (default {RETRIES})")
    c.add_argument("--curve", nargs=2, metavar=("SERVER_KEY", "CLIENT_SECRET"),
                   help="the service's public .key file and this client's .key_secret file")
    ops = c.add_subparsers(dest="op", required=True, metavar="OP")
    for name, what in (("hello", "versions and the models served"), ("health", "liveness"),
                       ("shutdown", "stop the service")):
        ops.add_parser(name, help=what)
    o = ops.add_parser("stats", help="the service and its runtime, or one model")
    o.add_argument("--model")
    o = ops.add_parser("switch", help="make a task active")
    o.add_argument("task")
    o.add_argument("--model")
    o = ops.add_parser("infer", help="run a task on .npy inputs")
    o.add_argument("--input", action="append", required=True, metavar="NAME=FILE.npy")
    o.add_argument("--task")
    o.add_argument("--model")
    o.add_argument("--output", metavar="OUT.npz")
    o.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="send it N times; print the round trip beside the run inside the service")
    o = ops.add_parser("generate", help="stream a continuation to stdout")
    o.add_argument("--prompt", required=True, metavar="TEXT")
    o.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    o.add_argument("--temperature", type=float, default=0.0)
    o.add_argument("--top-p", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--model")
    o = ops.add_parser("prewarm", help="fill spare blocks for likely next tasks")
    o.add_argument("tasks", nargs="+", metavar="TASK")
    o.add_argument("--model")
    o = ops.add_parser("load", help="load a pack into the service")
    o.add_argument("path")
    o.add_argument("--name")
    o.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a load option (prepack=off, expert_budget=0.5, ...)")
    o = ops.add_parser("unload", help="close a served model; its memory returns to the budget")
    o.add_argument("name")
    o = ops.add_parser("reload", help="load a pack beside a served model, then swap")
    o.add_argument("name")
    o.add_argument("--path")
    c.set_defaults(func=_client)

    k = sub.add_parser("keys", help="CurveZMQ key pairs (generate) and pack signing keys (signing)")
    ks = k.add_subparsers(dest="keys_op", required=True, metavar="OP")
    g = ks.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (0600)")
    g.add_argument("dir", metavar="DIR")
    g.add_argument("--name", default="edgert")
    g.set_defaults(func=_keys)
    from .keys import add_signing
    add_signing(ks)


# --- serve --------------------------------------------------------------------------------------
def _pack_specs(specs: list[str]) -> dict[str, str]:
    """--pack [NAME=]PATH, NAME defaulting to the file's stem."""
    return named(specs, "--pack", "[NAME=]PATH", default_name=lambda p: Path(p).stem)


def _serve(args) -> int:
    from ..control.endpoint import check_endpoint, check_plain_tcp, default_endpoint
    from ..control.notify import notify
    from ..control.service import Service
    from ..runtime import Runtime
    packs = _pack_specs(args.pack)
    if (args.curve_secret is None) != (args.allow_dir is None):
        raise ConfigError("--curve-secret and --allow-dir go together")
    if args.admin_dir and not args.curve_secret:
        raise ConfigError("--admin-dir needs --curve-secret and --allow-dir")
    for flag, v in (("--workers", args.workers), ("--max-inflight", args.max_inflight)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag} must be at least 1")
    if args.drain_timeout is not None and not 0 <= args.drain_timeout < 1e6:
        raise ConfigError("--drain-timeout must be a number of seconds >= 0")
    for d in args.pack_dir:
        if not Path(d).is_dir():
            raise ConfigError(f"--pack-dir {d}: not a directory")
    # NOTE: the endpoint is checked before any pack is loaded: a second service on a busy
    # endpoint says so at once instead of loading everything first
    bind = check_endpoint(args.bind or default_endpoint())
    check_plain_tcp(bind, args.curve_secret is not None)
    # NOTE: before any thread allocates: glibc gives each new allocating thread an arena of
    # its own (up to 8 per core), which keeps what it freed; the service's RSS climbed 26%
    # over three soak rounds from that alone (heap.py)
    cap_heap_arenas(HEAP_ARENAS)
    rt = Runtime(args.config, server=args.server, device_id=args.device_id)
    try:
        limits = rt.config.service
        if args.drain_timeout is not None:
            limits = dataclasses.replace(limits, drain_timeout_s=args.drain_timeout)
        models = {name: rt.load(path, name=name) for name, path in packs.items()}
        svc = Service(rt, bind, models=models, limits=limits, workers=args.workers,
                      max_inflight_per_client=args.max_inflight, curve_secret=args.curve_secret,
                      allow_dir=args.allow_dir, admin_dir=args.admin_dir,
                      pack_dirs=args.pack_dir)
        del models                      # the service holds them; unload must be able to free

        stopping = []

        def tell_stopping(why: str) -> None:
            if not stopping:
                stopping.append(why)
                notify(STOPPING="1", STATUS=why)

        def stop(signum, frame):
            svc.stop()
            signal.signal(signum, signal.SIG_DFL)    # a second signal ends the process at once
            tell_stopping(f"stopping on {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if svc.endpoint.startswith("tcp://") and not args.curve_secret:
            print(f"edgert serve: warning: {svc.endpoint} without CURVE: any local process may "
                  "use this service, including shutdown", file=sys.stderr)
        names = ", ".join(f"{n} ({m.kind})" for n, m in svc.table.items())
        print(f"edgert serve: ready on {svc.endpoint} serving {names}", flush=True)
        notify(READY="1", STATUS=f"ready on {svc.endpoint} serving {names}")   # Type=notify
        svc.run()
        tell_stopping("stopped")
        print("edgert serve: stopped", flush=True)
    finally:
        rt.close()
    return 0


# --- client -------------------------------------------------------------------------------------
def _client(args) -> int:
    from ..control.client import Client
    with Client(args.endpoint, timeout=args.timeout, retries=args.retries,
                curve=tuple(args.curve) if args.curve else None) as c:
        op = args.op
        if op in ("hello", "health", "shutdown"):
            _print_json(getattr(c, op)())
        elif op == "stats":
            _print_json(c.stats(args.model))
        elif op == "switch":
            t0 = time.perf_counter()
            res = c.switch(args.task, args.model)
            ms = 1e3 * (time.perf_counter() - t0)
            _print_json(res)
            print(f"round trip {ms:.2f} ms; the switch inside the service "
                  f"{1e3 * res['seconds']:.2f} ms", file=sys.stderr)
        elif op == "prewarm":
            _print_json(c.prewarm(args.tasks, args.model))
        elif op == "load":
            _print_json(c.load(args.path, args.name, **_options(args.option)))
        elif op == "unload":
            _print_json(c.unload(args.name))
        elif op == "reload":
            _print_json(c.reload(args.name, args.path))
        elif op == "infer":
            _infer(c, args)
        elif op == "generate":
            _generate(c, args)
    return 0


def _infer(c, args) -> None:
    from .tasks import _inputs
    if args.repeat < 1:
        raise InputMismatch("--repeat must be at least 1")
    inputs = _inputs(args.input)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = c.infer(inputs, task=args.task, model=args.model)
        times.append(1e3 * (time.perf_counter() - t0))
    for name, arr in out.items():
        print(f"{name}: {arr.dtype}{list(arr.shape)}  mean {arr.mean():.6g}  max {arr.max():.6g}")
    if args.repeat > 1:
        served = _served_model(c, "tasks", args.model)
        run = c.stats(served)["run_ms"]
        rt = np.percentile(times, [10, 50, 90])
        print(f"round trip over the service: median {rt[1]:.2f} ms (p10 {rt[0]:.2f}, p90 "
              f"{rt[2]:.2f}) over {args.repeat}; the run inside the service: median "
              f"{run['p50']:.2f} ms; overhead {rt[1] - run['p50']:.2f} ms")
    if args.output:
        np.savez(args.output, **out)
        print(f"wrote {args.output}")


def _generate(c, args) -> None:
    t0 = time.perf_counter()
    stamps = []
    for piece in c.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            model=args.model, stream=True):
        stamps.append(time.perf_counter())
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if len(stamps) > 1:
        lm = c.stats(_served_model(c, "moe", args.model))
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        print(f"over the service: first piece after {1e3 * (stamps[0] - t0):.1f} ms, then "
              f"{rate:.1f} pieces/s; the model inside the service decodes "
              f"{lm['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)


def _served_model(c, kind: str, name: str | None) -> str:
    if name is not None:
        return name
    return next(m["name"] for m in c.hello()["models"] if m["kind"] == kind)


def _options(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        key, sep, text = p.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {p!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(text)        # numbers and true/false; else the text itself
        except ValueError:
            out[key] = text
    return out


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=_jsonable))


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, bytes):
        return x.hex()
    return str(x)


# --- keys ---------------------------------------------------------------------------------------
def _keys(args) -> int:
    from ..control.auth import generate
    public, secret = generate(args.dir, args.name)
    print(f"wrote {public} (public: give it to the other side) and {secret} (secret, mode 0600)")
    return 0

