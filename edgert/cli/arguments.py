"""What the command modules share: ``NAME=VALUE`` arguments and adding the subcommands of
the modules that are present. Apart from ``__init__`` because the command modules use it and
``__init__`` loads them (so neither imports the other's half)."""
from __future__ import annotations

import importlib


def register_modules(sub, modules) -> None:
    """Let each module that is present add its subcommands to ``sub``."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:   # the module exists but one of its imports is missing
                raise
            continue
        module.register(sub)


def named(items: list[str], option: str, shape: str, default_name=None) -> dict[str, str]:
    """``NAME=VALUE`` arguments of ``option`` -> {name: value}; a bare VALUE takes
    ``default_name(value)`` where one is given. One clear ValueError for each mistake."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep and default_name is not None:
            name, value = default_name(item), item
        if not sep and default_name is None or not name or not value:
            raise ValueError(f"{option} {item!r}: expected {shape}")
        if name in out:
            raise ValueError(f"{option} {item!r}: the name {name!r} is taken; give each its own name")
        out[name] = value
    return out
