"""The thread policy (engines/threads.py), the config keys that state it, and the busy
processes of `edgert bench contention` (started and always ended by the bench)."""
from __future__ import annotations

import os

import pytest
import torch

from edgert.bench.contention import beside, fair_slowdown
from edgert.config import DeviceConfig, resolve
from edgert.engines.threads import SMALL_STEP, torch_threads, use_torch_threads
from edgert.errors import ConfigError


def test_small_steps_take_decode_threads_large_ones_threads():
    assert torch_threads(1, 128, threads=4, decode_threads=1) == 1          # a decode step
    assert torch_threads(256, 128, threads=4, decode_threads=1) == 4        # a prefill chunk
    assert torch_threads(1, SMALL_STEP, threads=4, decode_threads=2) == 4   # wide enough
    assert torch_threads(1, 128, threads=1, decode_threads=3) == 1          # never above threads


def test_use_torch_threads_sets_torch():
    keep = torch.get_num_threads()
    cfg = DeviceConfig.from_dict({"name": "t", "memory": {"total": "64 MiB"}, "threads": 2,
                                  "decode_threads": 1})
    try:
        use_torch_threads(1, 128, cfg)
        assert torch.get_num_threads() == 1
        use_torch_threads(512, 128, cfg)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(keep)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_decode_threads_is_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="decode_threads"):
        DeviceConfig.from_dict({"name": "t", "memory": {"total": "64 MiB"},
                                "decode_threads": bad})


def test_shipped_jetson_configs_leave_cores_to_others():
    for name, cores in (("jetson-orin-nano-8gb", 6), ("jetson-orin-nx-16gb", 8),
                        ("jetson-agx-orin-64gb", 12)):
        cfg = resolve(name)
        assert 1 <= cfg.threads < cores and cfg.decode_threads == 1


def test_fair_share_bound():
    assert fair_slowdown(2, 1, 2) == 2.0      # 2 threads, one busy process, 2 cores
    assert fair_slowdown(1, 1, 2) == 1.0      # one thread still has a core to itself
    assert fair_slowdown(2, 2, 2) == 3.0
    assert fair_slowdown(1, 2, 2) == 1.5
    assert fair_slowdown(4, 2, 6) == 2.0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_busy_processes_end_even_when_the_measurement_fails():
    before = set(os.listdir("/proc"))
    with pytest.raises(RuntimeError):
        with beside(2):
            mine = [p for p in set(os.listdir("/proc")) - before if p.isdigit()]
            busy = [int(p) for p in mine if _alive(int(p)) and
                    b"while True" in open(f"/proc/{p}/cmdline", "rb").read()]
            assert len(busy) == 2
            raise RuntimeError("the measurement failed")
    assert not any(_alive(p) for p in busy)
