"""Typed errors. Every message says what went wrong and where."""
from __future__ import annotations


class EdgertError(Exception):
    """Base class of every error edgert raises on purpose."""


class ConfigError(EdgertError, ValueError):
    """A device config is malformed: unknown key, bad value, impossible budget."""


class PackCorrupt(EdgertError):
    """A pack file is damaged: bad magic, truncation, checksum mismatch, bad manifest."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None,
                 block: int | None = None, tensor: str | None = None):
        where = []
        if path is not None:
            where.append(f"file {path}")
        if tensor is not None:
            where.append(f"tensor {tensor}")
        if block is not None:
            where.append(f"block {block}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(message + (f" ({', '.join(where)})" if where else ""))
        self.path, self.offset, self.block, self.tensor = path, offset, block, tensor


class CheckpointIncomplete(PackCorrupt):
    """A checkpoint directory lacks a file or tensor its config or index promises.

    A subclass of PackCorrupt: the input to the packer is damaged in the same sense a pack
    can be, and callers that already handle PackCorrupt keep working.
    """


class BudgetExceeded(EdgertError, MemoryError):
    """A request does not fit the configured memory budget. Raised before allocating."""

    def __init__(self, what: str, needed: int, available: int):
        super().__init__(f"{what}: needs {needed} bytes, {available} bytes available in the budget")
        self.what, self.needed, self.available = what, needed, available


class UnknownTask(EdgertError, KeyError):
    """A task name that the pack does not hold."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown task {name!r}; the pack holds: {', '.join(sorted(known)) or '(none)'}")
        self.name, self.known = name, list(known)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class IncompatibleModels(EdgertError):
    """Task models that do not share one graph."""


class UnsupportedModel(EdgertError):
    """A checkpoint whose architecture edgert does not run."""


class InputMismatch(EdgertError, ValueError):
    """Inputs that do not fit the model: run()'s names, dtypes or shapes; a prompt that is
    not text or token ids."""


class ModelClosed(EdgertError):
    """A model (or runtime) used after ``close()``."""
