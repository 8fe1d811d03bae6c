"""The memory edgert owns (Arena, its Leases and SlotPools) and the reads that fill it."""
from .arena import Arena
from .slots import Lease, SlotPool
from .storage import Storage

__all__ = ["Arena", "Lease", "SlotPool", "Storage"]
