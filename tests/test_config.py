from pathlib import Path

import pytest

from edgert import ConfigError, DeviceConfig
from edgert.config import DEFAULT_CONFIG, parse_bytes, resolve

CONFIGS = sorted((Path(__file__).parent.parent / "device_configs").glob("*.yaml"))


def test_shipped_configs_load_and_fit():
    names = {p.stem for p in CONFIGS}
    assert {"cpu-dev", "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb",
            "desktop-rtx4090"} <= names
    for p in CONFIGS:
        cfg = DeviceConfig.load(p)
        b = cfg.budget
        assert 0 < b.arena == b.total - b.engine and b.experts + b.kv <= b.arena
        assert cfg.name == p.stem
        kv = cfg.kv_cache            # every shipped config sizes both prefix-cache tiers
        assert kv.prefix and kv.chunk_tokens % 16 == 0 and kv.host > 0 and kv.disk > 0


def test_default_is_cpu_dev():
    cfg = resolve(None)
    assert cfg.source == str(DEFAULT_CONFIG) and cfg.device == "cpu"
    assert cfg.providers == ("cpu",)
    assert resolve(cfg) is cfg


def _doc(**over):
    doc = {"name": "x", "memory": {"total": "1 GiB", "engine": "256 MiB"}}
    doc.update(over)
    return doc


@pytest.mark.parametrize("doc,needle", [
    (_doc(colour="blue"), "colour"),
    (_doc(memory={"total": "1 GiB", "wieghts": 5}), "memory.wieghts"),
    (_doc(storage={"read_mode": "direct", "speed": 1}), "storage.speed"),
    (_doc(memory={"total": "1 GiB", "engine": "1 GiB"}), "leaves no arena"),
    (_doc(memory={"total": "1 GiB", "engine": "512 MiB", "kv": "600 MiB"}), "memory.kv"),
    (_doc(memory={"total": "1 GiB", "weights": "256 MiB"}), "memory.weights is no longer"),
    (_doc(memory={"total": 0}), "memory.total"),
    (_doc(memory={"total": "lots"}), "memory.total"),
    (_doc(providers=["cuda", "metal"]), "providers"),
    (_doc(storage={"read_mode": "mmap"}), "read_mode"),
    (_doc(threads=0), "threads"),
    (_doc(memory={"total": "1 GiB", "prefault": "yes"}), "prefault"),
    (_doc(dtype="int4"), "dtype"),
    ({"memory": {"total": 1}}, "name"),
    ([1, 2], "mapping"),
    (_doc(kv_cache={"prefix": "yes"}), "kv_cache.prefix"),
    (_doc(kv_cache={"chunk_tokens": 100}), "kv_cache.chunk_tokens"),
    (_doc(kv_cache={"host": "lots"}), "kv_cache.host"),
    (_doc(kv_cache={"disk": -1}), "kv_cache.disk"),
    (_doc(kv_cache={"dir": 5}), "kv_cache.dir"),
    (_doc(kv_cache={"tier": "cloud"}), "kv_cache.tier"),
])
def test_bad_configs_name_the_key(doc, needle):
    with pytest.raises(ConfigError, match=needle):
        DeviceConfig.from_dict(doc)


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        DeviceConfig.load(p)
    with pytest.raises(ConfigError, match="cannot read"):
        DeviceConfig.load(tmp_path / "missing.yaml")


def test_parse_bytes():
    assert parse_bytes("1.5 GiB", "k") == 3 << 29
    assert parse_bytes("512MiB", "k") == 512 << 20
    assert parse_bytes(4096, "k") == 4096
    assert parse_bytes("2 GB", "k") == 2 * 10**9
    for bad in ("-1", "1 XB", True, "1 GiBs"):
        with pytest.raises(ConfigError):
            parse_bytes(bad, "k")


def test_kv_cache_section_and_its_defaults():
    cfg = DeviceConfig.from_dict(_doc(kv_cache={"host": "64 MiB", "disk": "1 GiB",
                                                "chunk_tokens": 128, "dir": "~/kv"}))
    kv = cfg.kv_cache
    assert (kv.prefix, kv.chunk_tokens, kv.host, kv.disk) == (True, 128, 64 << 20, 1 << 30)
    assert not kv.dir.startswith("~")
    bare = DeviceConfig.from_dict(_doc()).kv_cache   # no section: prefixes in the arena only
    assert bare.prefix and bare.host == 0 and bare.disk == 0 and bare.chunk_tokens == 256


PERF = {"storage_read_gbps": 2, "storage_latency_us": 100, "memory_gbps": 68,
        "compute_tflops": 10}


@pytest.mark.parametrize("doc,line", [
    (_doc(perf={**PERF, "storage_read_gbps": float("nan")}),
     "perf.storage_read_gbps: nan is not a finite number"),
    (_doc(perf={**PERF, "layer_overhead_us": float("inf")}),
     "perf.layer_overhead_us: inf is not a finite number"),
    (_doc(service={"drain_timeout_s": float("-inf")}),
     "service.drain_timeout_s: -inf is not a finite number"),
    (_doc(memory={"total": float("nan")}), "memory.total: nan is not a finite number"),
    (_doc(threads=float("inf")), "threads: inf is not a finite number"),
])
def test_nan_and_infinities_are_refused_by_key(doc, line):
    with pytest.raises(ConfigError) as e:
        DeviceConfig.from_dict(doc)
    assert str(e.value) == f"<dict>: {line}"


def test_nan_in_a_yaml_file_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nmemory: {total: 1 GiB}\nperf:\n  storage_read_gbps: .nan\n"
                 "  storage_latency_us: 100\n  memory_gbps: 68\n  compute_tflops: 10\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: perf\.storage_read_gbps: nan is not a "
                                          r"finite number$"):
        DeviceConfig.load(p)


@pytest.mark.parametrize("doc,key", [
    (_doc(perf={**PERF, "read_gbps": 2}), "perf.read_gbps"),
    (_doc(service={"workers": 2, "threads": 2}), "service.threads"),
    (_doc(kv_cache={"prefix": True, "pages": 4}), "kv_cache.pages"),
    (_doc(memory={"total": "1 GiB", "swap": 0}), "memory.swap"),
])
def test_unknown_keys_are_refused_with_the_known_ones(doc, key):
    with pytest.raises(ConfigError) as e:
        DeviceConfig.from_dict(doc)
    msg = str(e.value)
    assert f"unknown key {key} (known: " in msg and "\n" not in msg


@pytest.mark.parametrize("doc,line", [
    (_doc(threads="2"), "threads: expected int | null, got str"),
    (_doc(decode_threads=1.5), "decode_threads: expected int, got float"),
    (_doc(kv_cache={"prefix": "yes"}), "kv_cache.prefix: expected bool, got str"),
    (_doc(perf={**PERF, "memory_gbps": "fast"}), "perf.memory_gbps: expected float, got str"),
    (_doc(perf={**PERF, "memory_gbps": True}), "perf.memory_gbps: expected float, got bool"),
    (_doc(perf={**PERF, "compute_tflops": 0}), "perf.compute_tflops: expected float > 0.0, got 0"),
    (_doc(service={"max_batch": 0}), "service.max_batch: expected int >= 1, got 0"),
    (_doc(providers="cpu"), "providers: expected a list, got str"),
    (_doc(providers=[]), "providers: expected a list of length >= 1, got []"),
    (_doc(providers=["cpu", "metal"]),
     "providers[1]: expected one of tensorrt, cuda, cpu, got 'metal'"),
    (_doc(storage=[1]), "storage: expected a mapping | null, got a list"),
    (_doc(name=5), "name: expected str, got int"),
    ({"name": "x"}, "missing key memory"),
    (_doc(perf={"storage_read_gbps": 1}), "missing key perf.storage_latency_us"),
])
def test_wrong_types_say_what_and_where_in_one_line(doc, line):
    with pytest.raises(ConfigError) as e:
        DeviceConfig.from_dict(doc)
    assert str(e.value) == f"<dict>: {line}"


def test_the_schema_keeps_the_defaults_of_the_config_types():
    cfg = DeviceConfig.from_dict(_doc(server=None, storage=None, kv_cache=None, service=None))
    assert cfg.server == "" and cfg.storage.read_mode == "direct"
    assert cfg.service.workers == 4 and cfg.service.max_queued_bytes == 256 << 20
    assert cfg.kv_cache.chunk_tokens == 256 and cfg.perf is None
    assert cfg.threads >= 1 and cfg.decode_threads == 1
    svc = DeviceConfig.from_dict(_doc(service={"max_queued_bytes": "1 MiB",
                                               "drain_timeout_s": 2})).service
    assert svc.max_queued_bytes == 1 << 20 and svc.drain_timeout_s == 2.0
