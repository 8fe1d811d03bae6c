"""The arena as the GPU sees it: page-locked, mapped into the GPU's address space (zero copy).

Used when the device config says ``device: cuda``. On Jetson the GPU shares DRAM with the
CPU, so kernels read the arena in place and the one budget stays exact.
"""
from __future__ import annotations

import logging
import mmap

from ..config import DeviceConfig

log = logging.getLogger(__name__)


def pin_for_gpu(buf: mmap.mmap, cfg: DeviceConfig) -> int | None:
    """Page-lock the arena and map it into the GPU's address space (zero copy).

    On Jetson the GPU shares DRAM with the CPU, so CUDA kernels read the arena in place:
    no second copy of any weight, and the one budget stays exact. Returns the device
    address of the arena's first byte, or None (with the reason logged) where that is
    not possible; callers then compute on the CPU.
    """
    try:
        import ctypes

        import torch
        if not torch.cuda.is_available():
            log.warning("config %s asks for device cuda but torch sees no GPU; arena stays "
                        "pageable host memory and compute runs on the CPU", cfg.name)
            return None
        host = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        rt = torch.cuda.cudart()
        rc = rt.cudaHostRegister(host, len(buf), _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED)
        if int(rc) != 0:
            log.warning("cudaHostRegister failed (%s); arena stays pageable", rc)
            return None
        dev = _device_pointer(host)
        if dev is None or not _check_alias(buf, dev):
            log.warning("the pinned arena is not readable in place by the GPU; compute runs "
                        "on the CPU")
            rt.cudaHostUnregister(host)
            return None
        return dev
    except Exception as e:  # no CUDA runtime: the CPU path still works
        log.warning("cannot pin the arena for the GPU: %s", e)
        return None


def unpin(host: int, buf: mmap.mmap) -> None:
    """cudaHostUnregister; `buf` rides along so the mapping lives until this has run."""
    try:
        import torch
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaHostUnregister(host)
    except Exception as e:  # interpreter shutdown, driver gone: nothing left to protect
        log.debug("cudaHostUnregister: %s", e)


_HOST_REGISTER_PORTABLE = 1
_HOST_REGISTER_MAPPED = 2


def _device_pointer(host: int) -> int | None:
    """cudaHostGetDevicePointer from the CUDA runtime torch has loaded (UVA fallback)."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libcudart" in line})
        lib = ctypes.CDLL(paths[0]) if paths else None
    except OSError:
        lib = None
    if lib is None:
        return host  # unified virtual addressing: registered host pointers are device pointers
    out = ctypes.c_void_p()
    rc = lib.cudaHostGetDevicePointer(ctypes.byref(out), ctypes.c_void_p(host), 0)
    return int(out.value) if rc == 0 and out.value else None


def _check_alias(buf: mmap.mmap, dev: int) -> bool:
    """Write a pattern through the host view, read it through the device view."""
    pattern = bytes(range(1, 65))
    saved = buf[:64]
    buf[:64] = pattern
    try:
        got = bytes(cuda_bytes(dev, 64).cpu().numpy().tobytes())
    finally:
        buf[:64] = saved
    return got == pattern


class _CudaArray:
    """Just enough of __cuda_array_interface__ (v3) for torch.as_tensor to alias bytes."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "strides": None, "version": 3}


def cuda_bytes(ptr: int, nbytes: int):
    """A torch uint8 CUDA tensor over ``nbytes`` at device address ``ptr`` (no copy)."""
    import torch
    return torch.as_tensor(_CudaArray(ptr, nbytes), device="cuda")
