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
    """Decodes the ids so far and emits what is new; holds back an incomplete character."""

    def __init__(self, tok: HFTokenizer):
        self._tok, self._ids, self._sent = tok, [], 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self._sent = text[self._sent:], len(text)
        return piece

    def flush(self) -> str:
        text = self._tok.decode(self._ids)
        piece, self._sent = text[self._sent:], len(text)
        return piece


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
