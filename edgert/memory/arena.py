"""Arena: the one block of memory edgert owns, cut into fixed-size slots per pool.

The arena maps ``weights + experts + kv`` bytes once, at start. Each pool is a fixed
byte range of it; a consumer carves its pool into equal slots of the size it needs
(a pack's block size, an expert's extent, a KV page). Equal slots mean no
fragmentation inside a pool by construction.

``memory.total`` minus the three pools is the allowance for memory an engine must
allocate itself (for example ONNX Runtime's pre-packed weights); it is not mapped
here but is accounted with ``charge()``/``discharge()`` so that it, too, never
passes the budget.
"""
from __future__ import annotations

import heapq
import logging
import mmap
import weakref

import numpy as np

from ..config import DeviceConfig
from ..errors import BudgetExceeded

log = logging.getLogger(__name__)
POOLS = ("weights", "experts", "kv")
SLOT_ALIGN = 4096  # O_DIRECT needs 4 KiB-aligned buffers; every slot starts on one


class SlotPool:
    """Fixed-size slots over one byte range of the arena: free list, runs, accounting."""

    def __init__(self, name: str, memory: np.ndarray):
        self.name = name
        self._mem = memory          # uint8 view of this pool's bytes
        self.bytes = len(memory)
        self.slot_size = 0
        self.capacity = 0
        self._used = bytearray()    # 1 = slot in use; index = slot id
        self._free: list[int] = []  # min-heap of free slot ids: low ids first keeps runs open
        self.in_use = 0
        self.peak = 0

    def carve(self, slot_size: int) -> int:
        """Cut the pool into slots of ``slot_size`` bytes; returns how many fit."""
        if slot_size <= 0 or slot_size % SLOT_ALIGN:
            raise ValueError(f"slot size {slot_size} must be a positive multiple of {SLOT_ALIGN}")
        if self.in_use:
            raise RuntimeError(f"pool {self.name}: cannot re-carve with {self.in_use} slots in use")
        self.slot_size = slot_size
        self.capacity = self.bytes // slot_size
        self._used = bytearray(self.capacity)
        self._free = list(range(self.capacity))  # sorted, so already a heap
        return self.capacity

    def _need(self, n: int, what: str) -> None:
        if not self.slot_size:
            raise RuntimeError(f"pool {self.name} has not been carved into slots")
        if n > len(self._free):
            raise BudgetExceeded(f"{self.name} pool: {what}", n * self.slot_size,
                                 len(self._free) * self.slot_size)

    def _mark(self, ids) -> None:
        for i in ids:
            self._used[i] = 1
        self.in_use += len(ids)
        self.peak = max(self.peak, self.in_use)

    def alloc(self, n: int = 1) -> list[int]:
        """``n`` slots (not necessarily adjacent). BudgetExceeded before any change."""
        self._need(n, f"{n} slots")
        ids = [heapq.heappop(self._free) for _ in range(n)]
        self._mark(ids)
        return ids

    def alloc_run(self, n: int) -> int:
        """``n`` adjacent slots, first fit; the first slot id."""
        self._need(n, f"a run of {n} adjacent slots")
        start = self._used.find(bytes(n)) if n else 0
        if start < 0:
            raise BudgetExceeded(f"{self.name} pool: no run of {n} adjacent free slots",
                                 n * self.slot_size, (self.capacity - self.in_use) * self.slot_size)
        ids = range(start, start + n)
        taken = set(ids)
        self._free = [i for i in self._free if i not in taken]
        heapq.heapify(self._free)
        self._mark(ids)
        return start

    def free(self, ids) -> None:
        for i in ids:
            assert self._used[i], f"pool {self.name}: slot {i} freed twice"
            self._used[i] = 0
            heapq.heappush(self._free, i)
            self.in_use -= 1

    def free_run(self, first: int, n: int) -> None:
        self.free(range(first, first + n))

    def view(self, slot: int) -> np.ndarray:
        """The slot's bytes (uint8, zero copy)."""
        assert 0 <= slot < self.capacity
        return self._mem[slot * self.slot_size:(slot + 1) * self.slot_size]

    def view_run(self, first: int, n: int) -> np.ndarray:
        assert 0 <= first and first + n <= self.capacity
        return self._mem[first * self.slot_size:(first + n) * self.slot_size]

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def in_use_bytes(self) -> int:
        return self.in_use * self.slot_size

    @property
    def peak_bytes(self) -> int:
        return self.peak * self.slot_size

    def stats(self) -> dict:
        return {"bytes": self.bytes, "slot_size": self.slot_size, "slots": self.capacity,
                "in_use_bytes": self.in_use_bytes, "peak_bytes": self.peak_bytes}


class Arena:
    """All of edgert's weight, expert and KV memory, mapped once from the config's budget."""

    def __init__(self, cfg: DeviceConfig):
        b = cfg.budget
        self.budget = b
        sizes = {"weights": b.weights, "experts": b.experts, "kv": b.kv}
        # round each pool down to whole 4 KiB pages so every slot is page aligned
        sizes = {k: v - v % SLOT_ALIGN for k, v in sizes.items()}
        self.mapped = sum(sizes.values())
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if b.prefault and hasattr(mmap, "MAP_POPULATE"):
            flags |= mmap.MAP_POPULATE  # back every page now, not on the first switch
        self._map = mmap.mmap(-1, max(self.mapped, SLOT_ALIGN), flags=flags)  # page aligned
        self._mem = np.frombuffer(self._map, dtype=np.uint8)
        self._device_base = _pin_for_gpu(self._map, cfg) if cfg.device == "cuda" else None
        self._host_base = self._mem.ctypes.data
        # NOTE: a registration outlives the mapping unless undone, and a later arena mapped
        # at the same address would then fail to register: undo it when the arena goes.
        self._unpin = (weakref.finalize(self, _unpin, self._host_base, self._map)
                       if self._device_base is not None else None)
        self._pools: dict[str, SlotPool] = {}
        pos = 0
        for name in POOLS:
            self._pools[name] = SlotPool(name, self._mem[pos:pos + sizes[name]])
            pos += sizes[name]
        self.extra_allowance = b.total - sum((b.weights, b.experts, b.kv))
        self._charges: dict[str, int] = {}
        self.extra_peak = 0

    def pool(self, name: str) -> SlotPool:
        try:
            return self._pools[name]
        except KeyError:
            raise KeyError(f"no pool {name!r}; pools are {', '.join(POOLS)}") from None

    # --- memory an engine allocates outside the mapped pools -----------------------------
    def charge(self, what: str, nbytes: int) -> None:
        """Account ``nbytes`` an engine allocates outside the arena; call before allocating.
        Taken from the unpooled allowance (``total`` minus the three pools)."""
        available = self.extra_allowance - sum(self._charges.values())
        if nbytes > available:
            raise BudgetExceeded(what, nbytes, available)
        self._charges[what] = self._charges.get(what, 0) + nbytes
        self.extra_peak = max(self.extra_peak, sum(self._charges.values()))

    def discharge(self, what: str) -> None:
        self._charges.pop(what, None)

    @property
    def extra_in_use(self) -> int:
        return sum(self._charges.values())

    def in_use_bytes(self) -> int:
        return sum(p.in_use_bytes for p in self._pools.values()) + self.extra_in_use

    def close(self) -> None:
        """Unpin the arena for the GPU now (else when the arena is garbage-collected). The
        host memory stays mapped while any view of it lives."""
        if self._unpin is not None:
            self._unpin()
        self._device_base = None

    # --- the GPU's view of the same bytes ------------------------------------------------
    @property
    def gpu_mapped(self) -> bool:
        """True when CUDA kernels can read and write the arena in place (device cuda)."""
        return self._device_base is not None

    def on_gpu(self, t):
        """The CUDA tensor that aliases CPU tensor ``t``, which must lie inside the arena.

        Zero copy: the GPU reads the arena's pinned pages (on Jetson, the same DRAM).
        """
        if self._device_base is None:
            raise RuntimeError("the arena is not mapped for the GPU (device cpu, or pinning "
                               "failed: see the log)")
        import torch
        nbytes = t.numel() * t.element_size()
        off = t.data_ptr() - self._host_base
        if not t.is_contiguous() or off < 0 or off + nbytes > self.mapped:
            raise ValueError("tensor is not a contiguous view of the arena")
        raw = cuda_bytes(self._device_base + off, nbytes)
        return raw.view(t.dtype).view(t.shape) if nbytes else torch.empty(
            t.shape, dtype=t.dtype, device="cuda")

    def stats(self) -> dict:
        return {"budget_total": self.budget.total, "mapped": self.mapped,
                "pools": {n: p.stats() for n, p in self._pools.items()},
                "extra": {"allowance": self.extra_allowance, "in_use": self.extra_in_use,
                          "peak": self.extra_peak, "charges": dict(self._charges)},
                "in_use_bytes": self.in_use_bytes()}


def _pin_for_gpu(buf: mmap.mmap, cfg: DeviceConfig) -> int | None:
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


def _unpin(host: int, buf: mmap.mmap) -> None:
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
