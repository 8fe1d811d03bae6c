"""Streamed decoding: the pieces add up to a full decode, with bounded work per token."""
import json

import numpy as np
import pytest

from edgert.engines.tokenizer import ByteTokenizer, HFTokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import (Tokenizer, decoders, models, normalizers,  # noqa: E402
                        pre_tokenizers, trainers)

CORPUS = ["the quick brown fox jumps over the lazy dog", "naïve café, déjà vu",
          "Grüße aus Köln", "one two three four five six seven eight nine ten"] * 10
# text the tokenizers were not trained on: CJK, emoji, combining marks
SAMPLES = ["the quick 日本語のテキスト fox", "emoji 😀🎉 and flags 🇩🇪🇫🇷 jump",
           "e\u0301te\u0301 naïve Köln déjà", "", " leading and  double  spaces ",
           "ünïcödé 中文 한국어 עברית"]


def byte_level_bpe() -> HFTokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|end|>"], show_progress=False))
    return HFTokenizer(tok.to_str().encode())


def sentencepiece_byte_fallback() -> HFTokenizer:
    """Llama / Mixtral style: '▁' for spaces, <0xXX> tokens for characters out of vocab,
    and a decoder that strips the leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    doc = json.loads(tok.to_str())
    vocab = doc["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    doc["model"]["byte_fallback"] = True
    doc["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return HFTokenizer(json.dumps(doc).encode())


TOKENIZERS = {"byte_level_bpe": byte_level_bpe, "sentencepiece": sentencepiece_byte_fallback}


def streamed(tok, ids) -> str:
    st = tok.stream()
    return "".join(st.push(i) for i in ids) + st.flush()


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def test_stream_equals_full_decode_of_text(tok):
    for text in SAMPLES:
        ids = tok.encode(text)
        assert streamed(tok, ids) == tok.decode(ids), text


def random_text(rng, n: int) -> str:
    """Words, spaces and characters from several scripts, 1 to 4 UTF-8 bytes each."""
    ranges = [(0x20, 0x7E), (0xC0, 0x17F), (0x300, 0x36F), (0x5D0, 0x5EA), (0x3040, 0x30FF),
              (0x4E00, 0x4FFF), (0xAC00, 0xACFF), (0x1F600, 0x1F64F)]
    out = []
    for _ in range(n):
        if rng.random() < 0.3:
            out.append(CORPUS[rng.integers(len(CORPUS))].split()[0] + " ")
        else:
            lo, hi = ranges[rng.integers(len(ranges))]
            out.append(chr(rng.integers(lo, hi + 1)))
    return "".join(out)


def test_stream_equals_full_decode_of_random_text(tok):
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = tok.encode(random_text(rng, int(rng.integers(1, 40))))
        assert streamed(tok, ids) == tok.decode(ids), ids


def test_stream_equals_full_decode_of_random_ids():
    """Any ids at all, invalid UTF-8 and specials included, with a byte-level decoder.
    NOTE: not for byte fallback: there a full decode turns the bytes of an invalid run into
    one U+FFFD each, so an earlier prefix's decode is not a prefix of the whole."""
    tok = byte_level_bpe()
    vocab = tok._tok.get_vocab_size()
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, vocab, size=rng.integers(1, 60)).tolist()
        assert streamed(tok, ids) == tok.decode(ids), ids


def test_multibyte_characters_are_held_until_complete(tok):
    ids = tok.encode("😀 日本")
    st = tok.stream()
    pieces = [st.push(i) for i in ids] + [st.flush()]
    assert not any("\ufffd" in p for p in pieces) and "".join(pieces) == tok.decode(ids)


def test_work_per_token_is_bounded(tok):
    """Each push decodes at most two short windows, however long the output gets."""
    ids = tok.encode(" ".join(SAMPLES * 40))
    assert len(ids) > 1000
    calls = []
    full_decode = tok.decode
    tok.decode = lambda window: calls.append(len(window)) or full_decode(window)
    try:
        out = streamed(tok, ids)
    finally:
        del tok.decode
    assert out == tok.decode(ids)
    assert len(calls) <= 2 * (len(ids) + 1)
    assert max(calls) <= 16                     # a few tokens: one character's bytes at most
    assert sum(calls) <= 16 * len(ids)          # linear, not quadratic, in the output length


def test_byte_tokenizer_stream_equals_decode():
    tok = ByteTokenizer()
    rng = np.random.default_rng(1)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert streamed(tok, ids) == tok.decode(ids) == text
    for _ in range(100):
        ids = rng.integers(0, 300, size=rng.integers(1, 40)).tolist()
        assert streamed(tok, ids) == tok.decode(ids)
