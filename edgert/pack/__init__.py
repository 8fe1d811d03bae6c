"""Pack files: block-granular, content-addressed weight stores (docs/pack-format.md)."""
from .format import ALIGN, DEFAULT_BLOCK_SIZE, block_hash
from .manifest import BlockEntry, Manifest, TensorSpec
from .reader import PackReader
from .writer import PackWriter

__all__ = ["ALIGN", "DEFAULT_BLOCK_SIZE", "block_hash", "BlockEntry", "Manifest", "TensorSpec",
           "PackReader", "PackWriter"]
