"""`edgert server`: the fleet server (edgert/server/, docs/fleet.md)."""
from __future__ import annotations

import signal
import sys

from ..errors import ConfigError


def register(sub) -> None:
    s = sub.add_parser("server", help="the fleet server: device registry, prewarm hints "
                       "(docs/fleet.md)")
    s.add_argument("--bind", metavar="ENDPOINT", default="tcp://127.0.0.1:7780",
                   help="tcp://HOST:PORT or ipc://PATH (default: tcp://127.0.0.1:7780; plain "
                   "TCP on loopback only, other hosts need CURVE)")
    s.add_argument("--store", metavar="SPEC", default="dir:edgert-server",
                   help="dir:PATH (embedded, one process; default dir:edgert-server) or "
                   "redis://HOST:PORT/DB (shared by several server processes)")
    s.add_argument("--curve-secret", metavar="FILE", help="the server's .key_secret file")
    s.add_argument("--allow-dir", metavar="DIR", help="public keys (*.key) of the devices "
                   "allowed in")
    s.add_argument("--heartbeat", metavar="SECONDS", type=float, default=1.0,
                   help="how often devices beat; silent for 3 of them, a device is forgotten")
    s.add_argument("--packs", metavar="DIR", help="serve signed updates of the packs in DIR "
                   "(docs/updates.md); needs --signing-key")
    s.add_argument("--signing-key", metavar="FILE", help="the signing.key of `edgert keys "
                   "signing`")
    s.set_defaults(func=_server)


def _server(args) -> int:
    from ..control.endpoint import check_endpoint, check_plain_tcp
    from ..server.backends import open_store
    from ..server.service import FleetServer
    if (args.curve_secret is None) != (args.allow_dir is None):
        raise ConfigError("--curve-secret and --allow-dir go together")
    if not 0.01 <= args.heartbeat <= 60:
        raise ConfigError("--heartbeat must be between 0.01 and 60 seconds")
    check_plain_tcp(check_endpoint(args.bind), args.curve_secret is not None)
    packs = None
    if (args.packs is None) != (args.signing_key is None):
        raise ConfigError("--packs and --signing-key go together")
    if args.packs is not None:
        import os
        from ..update.keys import load_private
        if not os.path.isdir(args.packs):
            raise ConfigError(f"--packs {args.packs}: not a directory")
        packs = (args.packs, load_private(args.signing_key))
    store = open_store(args.store)
    try:
        srv = FleetServer(store, args.bind, curve_secret=args.curve_secret,
                          allow_dir=args.allow_dir, heartbeat_s=args.heartbeat, packs=packs)

        def stop(signum, frame):
            srv.stop()
            signal.signal(signum, signal.SIG_DFL)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        print(f"edgert server: ready on {srv.endpoint} (store {store.spec})", flush=True)
        srv.run()
        print("edgert server: stopped", flush=True, file=sys.stdout)
    finally:
        store.close()
    return 0
