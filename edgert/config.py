"""DeviceConfig: one YAML file per device class (device_configs/), loaded and validated."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .errors import ConfigError

# The shipped device configs are package data (edgert/device_configs/, in a checkout a link to
# the top-level device_configs/), read through importlib.resources: the same lookup in a
# checkout, an editable install, a wheel, `pip install --target DIR` and a zip.
CONFIG_DIR = resources.files("edgert") / "device_configs"
DEFAULT_CONFIG = CONFIG_DIR / "cpu-dev.yaml"
PROVIDERS = ("tensorrt", "cuda", "cpu")
DTYPES = ("float32", "float16", "bfloat16")
READ_MODES = ("direct", "buffered")
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
    """Vendor figures of a device for the expert-cache projection (edgert/experts/costmodel.py):
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


def _check_keys(doc, allowed: set[str], where: str) -> dict:
    if not isinstance(doc, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(doc).__name__}")
    for k in doc:
        if k not in allowed:
            raise ConfigError(f"unknown key {where + '.' if where else ''}{k} "
                              f"(known: {', '.join(sorted(allowed))})")
    return doc


def _build(doc, source: str) -> DeviceConfig:
    top = {"name", "memory", "storage", "providers", "device", "threads", "decode_threads",
           "dtype", "server", "kv_cache", "perf", "service", "updates"}
    doc = _check_keys(doc, top, "")
    for key in ("name", "memory"):
        if key not in doc:
            raise ConfigError(f"missing key {key}")
    if isinstance(doc["memory"], dict) and "weights" in doc["memory"]:
        raise ConfigError("memory.weights is no longer used: every model shares the arena "
                          "(memory.total - memory.engine); remove the key (docs/internals.md)")
    mem = _check_keys(doc["memory"], {"total", "engine", "experts", "kv", "prefault"}, "memory")
    if "total" not in mem:
        raise ConfigError("missing key memory.total")
    total = parse_bytes(mem["total"], "memory.total")
    parts = {k: parse_bytes(mem.get(k, 0), f"memory.{k}") for k in ("engine", "experts", "kv")}
    if total <= 0:
        raise ConfigError(f"memory.total must be positive, got {mem['total']!r}")
    if parts["engine"] >= total:
        raise ConfigError(f"memory.engine = {parts['engine']} bytes leaves no arena in "
                          f"memory.total = {total} bytes")
    for k in ("experts", "kv"):
        if parts[k] > total - parts["engine"]:
            raise ConfigError(f"memory.{k} = {parts[k]} bytes exceeds the arena (memory.total "
                              f"- memory.engine = {total - parts['engine']} bytes)")
    prefault = mem.get("prefault", False)
    if not isinstance(prefault, bool):
        raise ConfigError(f"memory.prefault must be true or false, got {prefault!r}")
    st = _check_keys(doc.get("storage", {}) or {}, {"read_mode", "scratch_dir"}, "storage")
    read_mode = st.get("read_mode", "direct")
    if read_mode not in READ_MODES:
        raise ConfigError(f"storage.read_mode must be one of {READ_MODES}, got {read_mode!r}")
    providers = doc.get("providers", ["cpu"])
    if not isinstance(providers, list) or not providers or \
            any(p not in PROVIDERS for p in providers):
        raise ConfigError(f"providers must be a non-empty list of {PROVIDERS}, got {providers!r}")
    device = doc.get("device", "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    threads = doc.get("threads", os.cpu_count() or 1)
    decode_threads = doc.get("decode_threads", 1)
    for key, v in (("threads", threads), ("decode_threads", decode_threads)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    dtype = doc.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    name, server = doc["name"], doc.get("server", "") or ""
    if not isinstance(name, str) or not isinstance(server, str):
        raise ConfigError("name and server must be strings")
    return DeviceConfig(name=name, budget=Budget(total, **parts, prefault=prefault),
                        storage=Storage(read_mode, str(st.get("scratch_dir", "") or "")),
                        providers=tuple(providers), device=device, threads=threads,
                        decode_threads=decode_threads,
                        dtype=dtype, server=server, kv_cache=_kv_cache(doc), perf=_perf(doc),
                        service=_service(doc), updates=_updates(doc, source), source=source)


def _updates(doc, source: str) -> Updates:
    sec = _check_keys(doc.get("updates", {}) or {}, {"public_key", "check_s"}, "updates")
    check = sec.get("check_s", 0)
    if isinstance(check, bool) or not isinstance(check, (int, float)) or not 0 <= check < 1e7:
        raise ConfigError(f"updates.check_s must be seconds >= 0 (0 = never), got {check!r}")
    key = sec.get("public_key", "") or ""
    if not isinstance(key, str):
        raise ConfigError(f"updates.public_key must be a path, got {key!r}")
    key = os.path.expanduser(key)
    if key and not os.path.isabs(key) and source and not source.startswith("<"):
        key = os.path.join(os.path.dirname(os.path.abspath(source)), key)   # beside the config
    if key and not os.path.isfile(key):
        raise ConfigError(f"updates.public_key {key}: no such file")
    if check and not key:
        raise ConfigError("updates.check_s needs updates.public_key (the key every update "
                          "is checked against)")
    return Updates(key, float(check))


_PERF_KEYS = {"storage_read_gbps": ("storage_read_Bps", 1e9),
              "storage_latency_us": ("storage_latency_s", 1e-6),
              "memory_gbps": ("memory_Bps", 1e9), "compute_tflops": ("compute_flops", 1e12),
              "layer_overhead_us": ("layer_overhead_s", 1e-6)}


def _perf(doc) -> Perf | None:
    if doc.get("perf") is None:
        return None
    sec = _check_keys(doc["perf"], set(_PERF_KEYS), "perf")
    out = {}
    for key, (field_name, scale) in _PERF_KEYS.items():
        if key not in sec:
            if key == "layer_overhead_us":
                continue
            raise ConfigError(f"missing key perf.{key}")
        v = sec[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or \
                (v == 0 and key not in ("storage_latency_us", "layer_overhead_us")):
            raise ConfigError(f"perf.{key} must be a positive number, got {v!r}")
        out[field_name] = float(v) * scale
    return Perf(**out)


def _kv_cache(doc) -> KvCache:
    kv = _check_keys(doc.get("kv_cache", {}) or {},
                     {"prefix", "chunk_tokens", "host", "disk", "dir"}, "kv_cache")
    prefix = kv.get("prefix", True)
    if not isinstance(prefix, bool):
        raise ConfigError(f"kv_cache.prefix must be true or false, got {prefix!r}")
    chunk = kv.get("chunk_tokens", 256)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 16 or chunk % 16:
        raise ConfigError(f"kv_cache.chunk_tokens must be a positive multiple of 16 (the "
                          f"page size), got {chunk!r}")
    d = kv.get("dir", "") or ""
    if not isinstance(d, str):
        raise ConfigError(f"kv_cache.dir must be a string, got {d!r}")
    return KvCache(prefix, chunk, parse_bytes(kv.get("host", 0), "kv_cache.host"),
                   parse_bytes(kv.get("disk", 0), "kv_cache.disk"), os.path.expanduser(d))


def _service(doc) -> ServiceLimits:
    sec = _check_keys(doc.get("service", {}) or {}, set(ServiceLimits.__dataclass_fields__),
                      "service")
    out = {}
    for key, f in ServiceLimits.__dataclass_fields__.items():
        if key not in sec:
            continue
        v = sec[key]
        if key == "max_queued_bytes":
            v = parse_bytes(v, f"service.{key}")
            ok = v > 0
        elif f.type == "float":
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and 0 <= v < 1e6
            v = float(v) if ok else v
        else:
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        if not ok:
            raise ConfigError(f"service.{key} must be a positive "
                              f"{'number of seconds' if f.type == 'float' else 'integer'}"
                              f", got {sec[key]!r}")
        out[key] = v
    lim = ServiceLimits(**out)
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


__all__ = ["DeviceConfig", "Budget", "Storage", "KvCache", "ServiceLimits", "resolve", "parse_bytes",
           "DEFAULT_CONFIG"]
