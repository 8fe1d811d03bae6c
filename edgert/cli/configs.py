"""`edgert configs`: the device configs that ship with edgert, by name."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("configs", help="list the shipped device configs (--config NAME)",
                       description="List the device configs that ship with edgert; any "
                       "command's --config takes one of these names or a YAML path.")
    p.set_defaults(func=_configs)


def _configs(args) -> int:
    from ..config import CONFIG_DIR, DEFAULT_CONFIG, DeviceConfig, shipped
    print(f"device configs in {CONFIG_DIR} (default: {DEFAULT_CONFIG.name.removesuffix('.yaml')}):")
    for name in shipped():
        c = DeviceConfig.load(name)
        b = c.budget
        print(f"  {name:24s} {c.device:4s} {c.dtype:9s} total {b.total / 2**30:5.1f} GiB, arena "
              f"{b.arena / 2**30:5.1f} GiB, threads {c.threads:2d} (decode {c.decode_threads}), "
              f"providers {', '.join(c.providers)}")
    return 0
