"""The memory edgert owns (Arena, SlotPool) and the reads that fill it (Storage)."""
from .arena import Arena, SlotPool
from .storage import Storage

__all__ = ["Arena", "SlotPool", "Storage"]
