"""`edgert keys signing DIR`: the fleet's Ed25519 signing key pair (docs/updates.md)."""
from __future__ import annotations


def add_signing(keys_subparsers) -> None:
    g = keys_subparsers.add_parser("signing", help="write signing.key (private, 0600) and "
                                   "signing.pub for signed pack updates")
    g.add_argument("dir", metavar="DIR")
    g.set_defaults(func=_signing)


def _signing(args) -> int:
    from ..update.keys import generate
    priv, pub = generate(args.dir)
    print(f"wrote {priv} (private, mode 0600: for `edgert server --signing-key`) and {pub} "
          "(public: pin it on devices, updates.public_key)")
    return 0
