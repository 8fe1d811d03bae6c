"""`edgert update PACK --server ENDPOINT`: fetch and apply a signed pack update
(docs/updates.md)."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    u = sub.add_parser("update", help="bring a pack to the newest signed version a fleet "
                       "server offers (only the blocks it lacks; resumable)",
                       description="Ask the fleet server for the newest signed manifest of "
                       "PACK's lineage, check the signature against the pinned public key, "
                       "fetch only the blocks PACK lacks (checked, staged beside PACK so an "
                       "interrupted run resumes) and append them with the new manifest. A "
                       "model serving PACK keeps its version until it is reloaded.")
    u.add_argument("pack", metavar="PACK")
    u.add_argument("--server", required=True, metavar="ENDPOINT",
                   help="the fleet server (`edgert server --packs DIR --signing-key FILE`)")
    u.add_argument("--public-key", metavar="FILE", help="the fleet's signing.pub (default: "
                   "updates.public_key of the device config)")
    u.add_argument("--config", metavar="CONFIG", help="device config naming updates.public_key")
    u.add_argument("--batch-bytes", type=int, default=None, metavar="N",
                   help="bytes of blocks per request (default 4 MiB)")
    u.add_argument("--curve", nargs=2, metavar=("SERVER_KEY", "CLIENT_SECRET"),
                   help="CurveZMQ: the server's public key and this device's secret key")
    u.add_argument("--json", action="store_true", help="print the report as JSON")
    u.set_defaults(func=_update)


def _update(args) -> int:
    from ..control.endpoint import check_endpoint
    from ..errors import ConfigError
    from ..update import fetch, keys
    from ..update.signed import UpdateRefused
    from .pack import _open_error
    bad = _open_error(args.pack)
    if bad:
        raise ValueError(bad)
    key_path = args.public_key
    if key_path is None:
        from ..config import DeviceConfig
        key_path = DeviceConfig.load(args.config).updates.public_key if args.config else ""
        if not key_path:
            raise ConfigError("no public key pinned: pass --public-key FILE or a --config "
                              "with updates.public_key")
    public = keys.load_public(key_path)
    batch = fetch.BATCH_BYTES if args.batch_bytes is None else args.batch_bytes
    if batch <= 0:
        raise ValueError("--batch-bytes must be positive")
    check_endpoint(args.server)
    src = fetch.PackSource(args.server, curve=tuple(args.curve) if args.curve else None)
    try:
        rep = fetch.update(args.pack, src, public, batch_bytes=batch)
    except UpdateRefused as e:
        print(f"edgert update: refused: {e}; {args.pack} is unchanged", file=sys.stderr)
        return 3
    finally:
        src.close()
    if args.json:
        print(json.dumps(rep.as_dict(), indent=1))
    elif not rep.updated:
        print(f"{args.pack}: up to date at version {rep.version_from}")
    else:
        print(f"{args.pack}: version {rep.version_from} -> {rep.version_to}: "
              f"{rep.bytes_downloaded} bytes downloaded ({rep.blocks_downloaded} blocks; "
              f"blocks that differ: {rep.changed_bytes} bytes"
              + (f", {rep.resumed_bytes} of them from an interrupted run" if rep.resumed_bytes
                 else "") + f") in {rep.seconds:.2f} s")
    return 0
