"""DeviceConfig: one YAML file per device class (device_configs/), loaded and validated by
one schema (``ConfigDoc``, msgspec): unknown keys, wrong types, values out of bounds, NaN and
infinities are refused with one line that names the key."""
from __future__ import annotations

import math
import os
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml

from .errors import ConfigError

# The shipped device configs are package data (edgert/device_configs/, in a checkout a link to
# the top-level device_configs/), read through importlib.resources: the same lookup in a
# checkout, an editable install, a wheel, `pip install --target DIR` and a zip.
CONFIG_DIR = resources.files("edgert") / "device_configs"
DEFAULT_CONFIG = CONFIG_DIR / "cpu-dev.yaml"
PROVIDERS = ("tensorrt", "cuda", "cpu")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
READ_MODES = ("direct", "buffered")
COMPILE_MODES = ("auto", "on", "off")   # torch.compile of the MoE step (engines/compile.py)
_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_bytes(value, key: str) -> int:
    """'1.5 GiB', '512MiB', 4096 -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", str(value))
        if not m:
            raise ConfigError(f"{key}: cannot read {value!r} as a size (e.g. '512 MiB')")
        n = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if n < 0:
        raise ConfigError(f"{key}: size must not be negative, got {value!r}")
    return n


@dataclass(frozen=True)
class Budget:
    """Bytes the runtime may hold: ``total``, of which ``engine`` is set aside for memory
    engines allocate themselves and the rest is the arena every model shares.
    ``experts`` (the default expert cache of one MoE model) and ``kv`` (KV pages of all
    models together) are caps inside the arena, not reservations."""
    total: int
    engine: int
    experts: int
    kv: int
    prefault: bool = False  # touch every arena page at start: no page faults on the hot path

    @property
    def arena(self) -> int:
        return self.total - self.engine


@dataclass(frozen=True)
class Storage:
    read_mode: str = "direct"     # O_DIRECT where the filesystem allows, else buffered
    scratch_dir: str = ""         # where packs and disk tiers live ("" = current directory)


@dataclass(frozen=True)
class KvCache:
    """The prefix cache (docs/internals.md, "KV cache"): reuse computed prefixes
    (``prefix``); ``chunk_tokens`` is the prefill chunk and the disk tier's chunk size (a
    multiple of 16 tokens); ``host`` and ``disk`` are the budgets in bytes of the host
    memory tier and the disk tier (0 = off; both are outside the arena); ``dir`` is where
    the disk tier lives ("" = the user's cache directory, ~/.cache/edgert/kv). A config
    without the section reuses prefixes in the arena only."""
    prefix: bool = True
    chunk_tokens: int = 256
    host: int = 0
    disk: int = 0
    dir: str = ""


@dataclass(frozen=True)
class Perf:
    """Vendor figures of a device for the expert-cache projection (edgert/projection/costmodel.py):
    sustained storage reads (bytes/s) and the latency of one read (s), memory bandwidth
    (bytes/s, what a resident expert costs to stream), dense compute (FLOP/s) and a fixed
    cost per layer (s: kernel launches, synchronisation). A config without the section has
    no projection (``None``)."""
    storage_read_Bps: float
    storage_latency_s: float
    memory_Bps: float
    compute_flops: float
    layer_overhead_s: float = 0.0


@dataclass(frozen=True)
class ServiceLimits:
    """What `edgert serve` admits (docs/protocol.md, "Limits"). A caller is a CURVE public
    key where CURVE is on, else one socket. Jobs are requests queued or at work; tokens are
    the ``max_new_tokens`` of a caller's admitted generations. Past a cap a request gets
    ``busy`` before any work. ``max_batch``: items of one task request the frame limit is
    sized for (frames larger than the served models can take are refused by libzmq).
    ``drain_timeout_s``: how long a reload or unload lets in-flight requests finish on the
    old model before ending them with ``reloaded``. Defaults are sized for an 8 GB Orin Nano:
    16k tokens is minutes of decoding there, 256 MiB of queued input a few hundred frames."""
    workers: int = 4
    max_jobs_per_client: int = 16
    max_jobs: int = 64
    max_tokens_per_client: int = 4096
    max_tokens: int = 16384
    max_queued_bytes: int = 256 << 20
    max_batch: int = 64
    drain_timeout_s: float = 30.0


@dataclass(frozen=True)
class Updates:
    """Signed pack updates (docs/updates.md): ``public_key`` is the PEM file of the fleet's
    signing key that every manifest is checked against ("" = none pinned); ``check_s`` > 0
    (with a ``server:``) makes the runtime check that often for newer versions of the
    packs it has loaded and apply them in the background (0 = only `edgert update`)."""
    public_key: str = ""
    check_s: float = 0.0


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    budget: Budget
    storage: Storage = field(default_factory=Storage)
    providers: tuple[str, ...] = ("cpu",)
    device: str = "cpu"
    threads: int = 2              # cores edgert may use (engines' compute threads at most)
    decode_threads: int = 1       # torch threads of a small step (engines/threads.py)
    dtype: str = "float32"
    compile: str = "auto"         # torch.compile of the MoE decode step: auto | on | off
    server: str = ""
    kv_cache: KvCache = field(default_factory=KvCache)
    perf: Perf | None = None      # figures for the projection (`perf:`)
    service: ServiceLimits = field(default_factory=ServiceLimits)
    updates: Updates = field(default_factory=Updates)
    source: str = ""              # file it was read from

    @staticmethod
    def load(path=None) -> "DeviceConfig":
        """From a YAML file, a shipped config's name (``jetson-orin-nano-8gb``), or None
        (the embedded default, cpu-dev)."""
        src = DEFAULT_CONFIG if path is None else Path(path)
        if path is not None and not src.exists() and src.suffix == "" and \
                os.sep not in str(path):
            src = CONFIG_DIR / f"{path}.yaml"
            if not src.is_file():
                raise ConfigError(f"no device config {path!r}: not a file, and not one of the "
                                  f"shipped configs ({', '.join(shipped()) or 'none found'})")
        try:
            text = src.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read device config {src}: {e.strerror}") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{src}: not valid YAML: {e}") from None
        return DeviceConfig.from_dict(doc, source=str(src))

    @staticmethod
    def from_dict(doc, source: str = "<dict>") -> "DeviceConfig":
        try:
            return _build(doc, source)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


# ---- the file's schema: every key, its type and bounds, stated once --------------------
# The YAML document is decoded into these Structs by msgspec (unknown keys refused); the
# relations between keys (an engine allowance below the total, ...) are checked after, and
# the result is turned into the dataclasses above, which the rest of edgert reads.

PosInt = Annotated[int, msgspec.Meta(ge=1)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
Size = int | str     # bytes, or text such as "512 MiB" (parse_bytes)


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class MemoryDoc(_Section):
    total: Size
    engine: Size = 0
    experts: Size = 0
    kv: Size = 0
    prefault: bool = Budget.prefault


class StorageDoc(_Section):
    read_mode: Literal[READ_MODES] = Storage.read_mode
    scratch_dir: str | None = Storage.scratch_dir


class KvCacheDoc(_Section):
    prefix: bool = KvCache.prefix
    chunk_tokens: Annotated[int, msgspec.Meta(ge=16, multiple_of=16)] = KvCache.chunk_tokens
    host: Size = KvCache.host
    disk: Size = KvCache.disk
    dir: str | None = KvCache.dir


class PerfDoc(_Section):
    storage_read_gbps: PosFloat
    storage_latency_us: NonNegFloat
    memory_gbps: PosFloat
    compute_tflops: PosFloat
    layer_overhead_us: NonNegFloat = 0.0


class ServiceDoc(_Section):
    workers: PosInt = ServiceLimits.workers
    max_jobs_per_client: PosInt = ServiceLimits.max_jobs_per_client
    max_jobs: PosInt = ServiceLimits.max_jobs
    max_tokens_per_client: PosInt = ServiceLimits.max_tokens_per_client
    max_tokens: PosInt = ServiceLimits.max_tokens
    max_queued_bytes: Size = ServiceLimits.max_queued_bytes
    max_batch: PosInt = ServiceLimits.max_batch
    drain_timeout_s: Annotated[float, msgspec.Meta(ge=0, lt=1e6)] = ServiceLimits.drain_timeout_s


class UpdatesDoc(_Section):
    public_key: str | None = ""             # PEM file of the fleet's signing key; "" = none
    check_s: Annotated[float, msgspec.Meta(ge=0, lt=1e7)] = 0.0   # 0 = only `edgert update`


class ConfigDoc(_Section):
    """One device config file (device_configs/*.yaml); docs/internals.md, "Device config"."""
    name: str
    memory: MemoryDoc
    storage: StorageDoc | None = None
    providers: Annotated[tuple[Literal[PROVIDERS], ...], msgspec.Meta(min_length=1)] = ("cpu",)
    device: Literal[DEVICES] = "cpu"
    threads: PosInt | None = None           # None: every core (os.cpu_count())
    decode_threads: PosInt = 1
    dtype: Literal[DTYPES] = "float32"
    compile: Literal[COMPILE_MODES] = "auto"
    server: str | None = ""
    kv_cache: KvCacheDoc | None = None
    perf: PerfDoc | None = None
    service: ServiceDoc | None = None
    updates: UpdatesDoc | None = None


def _path(where: str, key) -> str:
    return f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key


def _refuse_non_finite(node, where: str = "") -> None:
    """No key of a config takes NaN or an infinity (YAML .nan, .inf): refuse them by key."""
    if isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{where or 'config'}: {node} is not a finite number")
    items = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        _refuse_non_finite(v, _path(where, k))


def _value_at(doc, path: str):
    for part in re.findall(r"[^.\[\]]+", path):
        try:
            doc = doc[int(part)] if isinstance(doc, list) else doc[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return doc


_CHOICES = {"providers": PROVIDERS, "device": DEVICES, "dtype": DTYPES,
            "compile": COMPILE_MODES, "storage.read_mode": READ_MODES}


def _sections() -> dict[str, type]:
    """Key path -> the Struct of that section, read off ConfigDoc (so a new one is not
    forgotten)."""
    out: dict[str, type] = {"": ConfigDoc}
    for f in msgspec.structs.fields(ConfigDoc):
        for t in typing.get_args(f.type) or (f.type,):
            if isinstance(t, type) and issubclass(t, msgspec.Struct):
                out[f.name] = t
    return out


_SECTIONS = _sections()


def _message(e: msgspec.ValidationError, doc) -> str:
    """msgspec's "Expected `int` >= 1 - at `$.threads`" as one line that leads with the key:
    "threads: expected int >= 1, got 0"."""
    text, _, at = str(e).partition(" - at `")
    where = at.rstrip("`").removeprefix("$").lstrip(".")
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", text):
        known = ", ".join(f.name for f in msgspec.structs.fields(_SECTIONS.get(where, ConfigDoc)))
        return f"unknown key {_path(where, m[1])} (known: {known})"
    if m := re.fullmatch(r"Object missing required field `(.+)`", text):
        return f"missing key {_path(where, m[1])}"
    if text.startswith("Invalid enum value"):      # a Literal: say which values it takes
        key = re.sub(r"\[\d+\]$", "", where)          # providers[1] -> providers
        text = f"expected one of {', '.join(_CHOICES[key])}"
    text = re.sub(r"\barray\b", "a list", re.sub(r"\bobject\b", "a mapping",
                                                  text.replace("`", "")))
    text = text[0].lower() + text[1:]
    if "got" not in text:
        text += f", got {_value_at(doc, where)!r}"
    return f"{where or 'config'}: {text}"


def _size(value, key: str, positive: bool = False) -> int:
    n = parse_bytes(value, key)
    if positive and n <= 0:
        raise ConfigError(f"{key}: must be positive, got {value!r}")
    return n


def _build(doc, source: str) -> DeviceConfig:
    if isinstance(doc, dict) and isinstance(doc.get("memory"), dict) and \
            "weights" in doc["memory"]:
        raise ConfigError("memory.weights is no longer used: every model shares the arena "
                          "(memory.total - memory.engine); remove the key (docs/internals.md)")
    _refuse_non_finite(doc)
    if isinstance(doc, dict) and isinstance(doc.get("compile"), bool):
        # NOTE: YAML 1.1 reads a bare `compile: on` / `off` as a boolean
        doc = {**doc, "compile": "on" if doc["compile"] else "off"}
    try:
        d = msgspec.convert(doc, ConfigDoc)
    except msgspec.ValidationError as e:
        raise ConfigError(_message(e, doc)) from None
    return DeviceConfig(name=d.name, budget=_budget(d.memory),
                        storage=Storage(*_fields(d.storage or StorageDoc())),
                        providers=d.providers, device=d.device,
                        threads=d.threads or os.cpu_count() or 1,
                        decode_threads=d.decode_threads, dtype=d.dtype, compile=d.compile,
                        server=d.server or "",
                        kv_cache=_kv_cache(d.kv_cache), perf=_perf(d.perf),
                        service=_service(d.service), updates=_updates(d.updates, source),
                        source=source)


def _fields(section) -> tuple:
    """A section's values in order, a null string as empty."""
    return tuple("" if v is None else v for v in msgspec.structs.astuple(section))


def _budget(m: MemoryDoc) -> Budget:
    total = _size(m.total, "memory.total", positive=True)
    engine, experts, kv = (_size(getattr(m, k), f"memory.{k}") for k in ("engine", "experts", "kv"))
    if engine >= total:
        raise ConfigError(f"memory.engine = {engine} bytes leaves no arena in "
                          f"memory.total = {total} bytes")
    for key, n in (("experts", experts), ("kv", kv)):
        if n > total - engine:
            raise ConfigError(f"memory.{key} = {n} bytes exceeds the arena (memory.total "
                              f"- memory.engine = {total - engine} bytes)")
    return Budget(total, engine, experts, kv, prefault=m.prefault)


def _updates(u: UpdatesDoc | None, source: str) -> Updates:
    u = u or UpdatesDoc()
    key = os.path.expanduser(u.public_key or "")
    if key and not os.path.isabs(key) and source and not source.startswith("<"):
        key = os.path.join(os.path.dirname(os.path.abspath(source)), key)   # beside the config
    if key and not os.path.isfile(key):
        raise ConfigError(f"updates.public_key {key}: no such file")
    if u.check_s and not key:
        raise ConfigError("updates.check_s needs updates.public_key (the key every update "
                          "is checked against)")
    return Updates(key, float(u.check_s))


def _kv_cache(k: KvCacheDoc | None) -> KvCache:
    k = k or KvCacheDoc()
    return KvCache(k.prefix, k.chunk_tokens, _size(k.host, "kv_cache.host"),
                   _size(k.disk, "kv_cache.disk"), os.path.expanduser(k.dir or ""))


# the file's units -> Perf's (SI)
_PERF_SCALE = {"storage_read_gbps": 1e9, "storage_latency_us": 1e-6, "memory_gbps": 1e9,
               "compute_tflops": 1e12, "layer_overhead_us": 1e-6}


def _perf(p: PerfDoc | None) -> Perf | None:
    if p is None:
        return None
    return Perf(*(getattr(p, k) * scale for k, scale in _PERF_SCALE.items()))


def _service(s: ServiceDoc | None) -> ServiceLimits:
    s = s or ServiceDoc()
    lim = ServiceLimits(**{**msgspec.structs.asdict(s), "max_queued_bytes": _size(
        s.max_queued_bytes, "service.max_queued_bytes", positive=True)})
    for per, whole in (("max_jobs_per_client", "max_jobs"),
                       ("max_tokens_per_client", "max_tokens")):
        if getattr(lim, per) > getattr(lim, whole):
            raise ConfigError(f"service.{per} ({getattr(lim, per)}) exceeds service.{whole} "
                              f"({getattr(lim, whole)})")
    return lim


def shipped() -> list[str]:
    """Names of the device configs that ship with edgert."""
    return sorted(e.name.removesuffix(".yaml") for e in CONFIG_DIR.iterdir()
                  if e.name.endswith(".yaml"))


def resolve(cfg=None) -> DeviceConfig:
    """A DeviceConfig from a DeviceConfig, a path, a shipped config's name, or None (the
    embedded default)."""
    if isinstance(cfg, DeviceConfig):
        return cfg
    return DeviceConfig.load(cfg)


__all__ = [
    "DEFAULT_CONFIG",
    "Budget",
    "ConfigDoc",
    "DeviceConfig",
    "KvCache",
    "Perf",
    "ServiceLimits",
    "Storage",
    "parse_bytes",
    "resolve",
]
