"""The one alignment shared by pack extents, arena slots and direct reads."""
from __future__ import annotations

# O_DIRECT needs the file offset, the length and the buffer address aligned to the
# device's logical block size; 4 KiB covers both 512-byte and 4 KiB sectors.
ALIGN = 4096


def align_up(n: int) -> int:
    """The smallest multiple of ALIGN that is >= n."""
    return -(-n // ALIGN) * ALIGN
