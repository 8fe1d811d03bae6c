"""The MoE model on `device: cuda`: zero-copy GPU views of the arena, or the CPU with a reason.

The GPU tests run where torch sees a GPU (they are skipped on CPU-only machines, such as
CI); the fallback test runs where it does not.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import edgert
from edgert.config import DeviceConfig
from edgert.memory import SlotPool
from edgert.pack.hf_import import pack_hf
from moe_models import HAS_CACHE, mixtral_config, prompt, qwen_config, save

HAS_GPU = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU torch can use")


def config(device: str) -> DeviceConfig:
    return DeviceConfig.from_dict({
        "name": f"test-{device}", "device": device, "threads": 1, "dtype": "float32",
        "memory": {"total": "64 MiB", "engine": "44 MiB", "experts": "8 MiB", "kv": "4 MiB"},
        "storage": {"read_mode": "buffered"}})


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def pack(request, tmp_path_factory):
    make = mixtral_config if request.param == "mixtral" else qwen_config
    d = save(make(), tmp_path_factory.mktemp(request.param) / "ckpt")
    p = d.parent / "model.edgepack"
    pack_hf(d, p, progress=False)
    return p


@pytest.mark.skipif(HAS_GPU, reason="checks the fallback where torch sees no GPU")
def test_cuda_config_without_gpu_computes_on_cpu_and_says_why(pack, caplog):
    ids = prompt(24)
    with caplog.at_level(logging.WARNING):
        rt = edgert.Runtime(config("cuda"))
    assert not rt.arena.gpu_mapped
    assert "sees no GPU" in caplog.text
    with caplog.at_level(logging.WARNING):
        lm = rt.load(pack)
    assert lm.device.type == "cpu" and lm.stats()["device"] == "cpu"
    assert "computes on the CPU" in caplog.text
    with pytest.raises(RuntimeError, match="not mapped for the GPU"):
        rt.arena.on_gpu(torch.zeros(4))
    ref = edgert.Runtime(config("cpu")).load(pack)
    np.testing.assert_array_equal(lm.logits(ids), ref.logits(ids))


@gpu_only
def test_arena_views_alias_the_same_bytes_on_both_sides():
    import gc
    for _ in range(3):  # an arena unpins when it goes: the next one, often at the same
        with edgert.Runtime(config("cuda")) as rt:  # address, pins again
            assert rt.arena.gpu_mapped
        assert not rt.arena.gpu_mapped
    for _ in range(3):
        assert edgert.Runtime(config("cuda")).arena.gpu_mapped
        gc.collect()
    rt = edgert.Runtime(config("cuda"))
    assert rt.arena.gpu_mapped
    pool = SlotPool(rt.arena, "test", 4096)
    slot = pool.alloc(1)[0]
    host = torch.from_numpy(pool.view(slot)[:4096].view(np.float32))
    dev = rt.arena.on_gpu(host)
    assert dev.is_cuda and dev.shape == host.shape
    host[:] = torch.arange(1024, dtype=torch.float32)
    assert torch.equal(dev.cpu(), host)                  # written by the CPU, read by the GPU
    dev.mul_(2)                                           # written by the GPU...
    torch.cuda.synchronize()
    assert host[7].item() == 14.0                         # ...read by the CPU, no copy
    with pytest.raises(ValueError):
        rt.arena.on_gpu(torch.zeros(4))                  # not arena memory


@gpu_only
@pytest.mark.parametrize("budget", [pytest.param(
    "small", marks=pytest.mark.skipif(not HAS_CACHE, reason="needs the expert cache")), 1.0])
def test_cuda_logits_and_greedy_equal_cpu_with_no_copies(pack, budget):
    ids = prompt(40)
    cpu = edgert.Runtime(config("cpu")).load(pack)
    rt = edgert.Runtime(config("cuda"))
    before = torch.cuda.memory_allocated()
    frac = 0.25 if budget == "small" else budget
    lm = rt.load(pack, expert_budget=frac)
    assert lm.device.type == "cuda"
    # weights, expert slots and KV pages are views of the arena: torch allocated nothing
    # for them (only RoPE's small inverse-frequency table, one 512-byte block)
    assert torch.cuda.memory_allocated() - before <= 512
    np.testing.assert_allclose(lm.logits(ids), cpu.logits(ids), atol=1e-4, rtol=0)
    assert lm.generate(ids[:8], max_new_tokens=32) == cpu.generate(ids[:8], max_new_tokens=32)
    assert rt.arena.stats()["in_use_bytes"] <= rt.arena.mapped
    assert lm.stats()["device"].startswith("cuda")
    lm.close()
    assert rt.arena.in_use_bytes() == 0


@gpu_only
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_cuda_lowbit_experts_equal_cpu_kernels(tmp_path, quant):
    """device: cuda selects torch's CUDA weight-only kernels (int4: `_weight_int4pack_mm`
    after a repack on the GPU, bfloat16 inside); logits equal the CPU kernels' within the
    bfloat16 rounding of that kernel. Not run where this was written (no GPU)."""
    d = save(mixtral_config(hidden_size=64, intermediate_size=32), tmp_path / "ckpt")
    p = tmp_path / f"{quant}.edgepack"
    pack_hf(d, p, progress=False, quant=quant, group_size=32 if quant == "int4" else None)
    ids = prompt(16)
    gpu = edgert.Runtime(config("cuda")).load(p, precision=quant, expert_budget=0.5)
    assert gpu.device.type == "cuda"
    cpu = edgert.Runtime(config("cpu")).load(p, precision=quant, expert_budget=0.5)
    want = cpu.logits(ids)
    tol = 1e-4 if quant == "int8" else 0.05
    assert np.abs(gpu.logits(ids) - want).max() <= tol * np.abs(want).max()
