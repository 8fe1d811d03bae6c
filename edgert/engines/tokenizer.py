"""Text <-> token ids for MoE packs, and incremental decoding for streamed output.

A pack's "tokenizer" section holds the checkpoint's tokenizer.json; it is run with the
`tokenizers` library when installed. Without it, a model whose vocabulary is bytes uses
`ByteTokenizer`: token id = byte value (0..255); ids from 256 up are specials (BOS, EOS,
padding) and decode to nothing. edgert's demo MoE is trained that way.
"""
from __future__ import annotations

import codecs

from edgert.errors import EdgertError

BYTE_VOCAB = 256
MAX_BYTE_VOCAB = 512  # byte values plus at most 256 specials; larger vocabularies are not bytes


class ByteTokenizer:
    kind = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < BYTE_VOCAB).decode("utf-8", errors="replace")

    def stream(self) -> "_ByteStream":
        return _ByteStream()


class _ByteStream:
    """Feeds one id at a time; returns the text completed by it (UTF-8 may span ids)."""

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(bytes([token_id])) if token_id < BYTE_VOCAB else ""

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class HFTokenizer:
    kind = "tokenizers"

    def __init__(self, tokenizer_json: bytes):
        from tokenizers import Tokenizer
        self._tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def stream(self) -> "_PrefixStream":
        return _PrefixStream(self)


class _PrefixStream:
    """Emits the text each new id adds, decoding only a short window of recent ids.

    The window holds the ids of the last emitted piece (context, so that decoders which
    look at neighbours, e.g. a leading-space strip, see what a full decode sees) followed
    by the ids not emitted yet. A piece is the window's text past the text of its context;
    it is held back while it ends in an incomplete character (U+FFFD). The pieces and
    flush() add up to ``decode(all ids)`` whenever decoding more ids only appends text:
    always with byte-level BPE; with byte fallback (Llama, Mixtral) for ids of valid UTF-8
    (a full decode of invalid byte runs shows one U+FFFD per byte and rewrites earlier ones).
    """

    def __init__(self, tok: HFTokenizer):
        self._tok = tok
        self._window: list[int] = []
        self._context = 0   # window[:_context] was emitted with the previous piece

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        w, decode = self._window, self._tok.decode
        done = decode(w[:self._context]) if self._context else ""
        text = decode(w)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        del w[:self._context]       # the new piece's ids are the next piece's context
        self._context = len(w)
        return text[len(done):]


def tokenizer_for(sections: dict, config: dict):
    """The pack's tokenizer, a ByteTokenizer for byte vocabularies, or None."""
    raw = sections.get("tokenizer")
    if raw:
        try:
            return HFTokenizer(bytes(raw))
        except ImportError:
            pass
        except Exception as e:  # tokenizers raises its own exception type
            raise EdgertError(f"the pack's tokenizer.json cannot be loaded: {e}") from None
    vocab = int(config.get("vocab_size", 0))
    if config.get("edgert_tokenizer") == "bytes" or BYTE_VOCAB <= vocab <= MAX_BYTE_VOCAB:
        return ByteTokenizer()
    return None
