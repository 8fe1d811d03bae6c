"""What one `generate` call reports: `Generation` (the streamed form: an iterator of pieces
that says why it stopped) and `GenerateResult` (`details=True`), with the stop reasons.
Torch-free, so a client or a tool can use the types without the engine."""
from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Literal, get_args


StopReason = Literal["eos", "length", "kv_budget", "cancelled", "reloaded"]
# "reloaded" is never set here: the device service reports it for a stream it ended itself
STOP_REASONS: tuple[str, ...] = get_args(StopReason)


@dataclass(frozen=True)
class GenerateResult:
    """What `generate(..., details=True)` made and why it stopped."""
    output: str | list[int]     # what generate returns: text for a text prompt, else new ids
    stop_reason: StopReason
    tokens: int                 # new tokens made (an EOS included)

    def __post_init__(self):
        if self.stop_reason not in STOP_REASONS:
            raise ValueError(f"GenerateResult: stop_reason {self.stop_reason!r} is not one of "
                             f"{', '.join(STOP_REASONS)}")


class _Progress:
    """Written by one generation's token loop, read through its `Generation`."""
    __slots__ = ("tokens", "stop_reason")

    def __init__(self):
        self.tokens = 0
        self.stop_reason: StopReason | None = None


class Generation:
    """One streamed `generate` call: an iterator of pieces (text pieces for a text prompt,
    token ids for ids).

    `stop_reason`: None until it ended (or when it failed with an exception), then "eos"
    (the model's EOS, included), "length" (max_new_tokens made), "kv_budget" (no KV memory
    for the next token; what was made is kept) or "cancelled" (closed before its end).
    `tokens`: new tokens made so far. `close()` ends it early and gives the sequence's KV
    pages back; idempotent, also on leaving a `with` and when the object is dropped.
    Use it from one thread at a time.
    """

    def __init__(self, ids: Generator, pieces: Iterator, progress: _Progress):
        # NOTE: the token loop writes `progress`, never this object, so dropping the
        # Generation drops the loop at once (no cycle) and its pages go back
        self._ids, self._pieces, self._progress = ids, pieces, progress
        self._over = False      # ran to its end or raised

    @property
    def stop_reason(self) -> StopReason | None:
        return self._progress.stop_reason

    @property
    def tokens(self) -> int:
        return self._progress.tokens

    def __iter__(self) -> "Generation":
        return self

    def __next__(self):
        try:
            return next(self._pieces)
        except BaseException:       # StopIteration included: it is over either way
            self._over = True
            raise

    def close(self) -> None:
        if self._progress.stop_reason is None and not self._over:
            self._progress.stop_reason = "cancelled"
        self._over = True
        self._pieces.close()
        self._ids.close()           # the text wrapper does not close the loop it reads

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
