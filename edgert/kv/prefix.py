"""Prefix hashing, the hash -> arena page map, and the prefix-closed eviction order.

Naming (portable across processes, hash seeds and machines):
- a *model fingerprint* (16 bytes) is blake3 of canonical bytes of what decides a page's
  contents: the pack's weight hashes (tensor by tensor, expert by expert), the model config,
  the tokenizer, the KV dtype and the page layout;
- a full page (16 tokens) is named by blake3(parent's name, its token ids, the sequence's
  extra keys); the first page's parent is the fingerprint. Extra keys are tagged by their
  source (``{"salt": "user-7"}``): tag and value are length-prefixed and typed, so no key of
  one source can equal a key of another, nor token bytes.
Everything goes through ``_Canon`` into blake3, never Python's ``hash()``.

The eviction order of a tier is *prefix-closed*: an entry is not evicted while an entry
naming it as parent is present (its cached descendants go first), least recently used
first among such leaves (`PrefixLRU`).
"""
from __future__ import annotations

import heapq
import json
import struct
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

import blake3

HASH_BYTES = 16          # 128 bits: the pack's block names use the same width
FORMAT = b"edgert-kv-page/1"   # bump when the page layout or the hash recipe changes

ExtraKeys = tuple[tuple[str, bytes], ...]   # canonical: sorted by tag, values as bytes


class _Canon:
    """Typed, length-prefixed canonical bytes into one blake3 state."""

    def __init__(self, domain: bytes):
        self.h = blake3.blake3()
        self.bytes(domain)

    def bytes(self, b: bytes) -> "_Canon":
        self.h.update(struct.pack("<Q", len(b)))
        self.h.update(b)
        return self

    def str(self, s: str) -> "_Canon":
        return self.bytes(s.encode())

    def int(self, i: int) -> "_Canon":
        self.h.update(struct.pack("<q", int(i)))
        return self

    def digest(self) -> bytes:
        return self.h.digest(HASH_BYTES)


def extra_keys(keys: Mapping[str, object] | None) -> ExtraKeys:
    """Canonical extra keys: {tag: str | bytes | int | None}; None values are dropped.

    The value's type is part of its bytes, so salt "1" and salt 1 are different keys."""
    out = []
    for tag, value in (keys or {}).items():
        if value is None:
            continue
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"extra key tag must be a non-empty str, got {tag!r}")
        if isinstance(value, bool) or not isinstance(value, (str, bytes, int)):
            raise TypeError(f"extra key {tag!r}: value must be str, bytes or int, "
                            f"got {type(value).__name__}")
        kind = {str: b"s", bytes: b"b", int: b"i"}[type(value)]
        raw = value.encode() if isinstance(value, str) else \
            value if isinstance(value, bytes) else str(value).encode()
        out.append((tag, kind + raw))
    return tuple(sorted(out))


def page_hash(parent: bytes, tokens: Sequence[int], extra: ExtraKeys = ()) -> bytes:
    """The name of a full page: blake3(parent, token ids as u32 LE, tagged extra keys)."""
    c = _Canon(FORMAT + b"/page").bytes(parent)
    c.bytes(struct.pack(f"<{len(tokens)}I", *tokens))
    c.int(len(extra))
    for tag, value in extra:
        c.str(tag).bytes(value)
    return c.digest()


def chain_hashes(root: bytes, tokens: Sequence[int], page_tokens: int, extra: ExtraKeys = (),
                 parent: bytes | None = None, start: int = 0) -> list[bytes]:
    """Names of the full pages of ``tokens[start:]`` (``start`` a page boundary), chained
    from ``parent`` (None = the root, i.e. the model fingerprint)."""
    assert start % page_tokens == 0
    out, p = [], root if parent is None else parent
    for i in range(start, len(tokens) - page_tokens + 1, page_tokens):
        p = page_hash(p, tokens[i:i + page_tokens], extra)
        out.append(p)
    return out


def model_fingerprint(reader, kv_dtype: str, page_shape: Iterable[int],
                      tail: int = 0) -> bytes:
    """What decides a page's bytes: weights (by hash), config, tokenizer, KV dtype, layout.

    Independent of the order blocks sit in the pack file: tensors by name, experts by
    (layer, expert)."""
    c = _Canon(FORMAT + b"/model")
    c.str(kv_dtype)
    for n in page_shape:
        c.int(n)
    c.int(tail)
    c.str(json.dumps(reader.config, sort_keys=True, separators=(",", ":"), default=str))
    tok = reader.sections.get("tokenizer")
    c.bytes(blake3.blake3(bytes(tok)).digest(HASH_BYTES) if tok else b"")
    specs = reader.task("model")
    for name in sorted(specs):
        s = specs[name]
        c.str(name).str(s.dtype)
        c.int(len(s.shape))
        for d in s.shape:
            c.int(d)
        c.int(len(s.blocks))
        for b in s.blocks:
            c.bytes(reader.blocks[b].hash)
    experts = getattr(getattr(reader, "manifest", None), "experts", None)
    table = dict(experts.table) if experts is not None else {}
    c.int(len(table))
    for (layer, expert), b in sorted(table.items()):
        c.int(layer).int(expert).bytes(reader.blocks[b].hash)
    return c.digest()


class PageIndex:
    """hash -> arena page id of the cached full pages of one model. Thread-safe.

    NOTE: the pool may reuse a page between a lookup here and its use; callers claim pages
    with ``PagePool.share_tagged``, which checks the page still carries the hash (the pool's
    tag) under the pool's lock, so a stale entry is a miss, never wrong bytes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pages: dict[bytes, int] = {}

    def run(self, hashes: Sequence[bytes]) -> list[int]:
        """Page ids of the longest run of ``hashes`` (from the first) present here."""
        out = []
        with self._lock:
            for h in hashes:
                pid = self._pages.get(h)
                if pid is None:
                    break
                out.append(pid)
        return out

    def add(self, h: bytes, pid: int) -> None:
        with self._lock:
            self._pages[h] = pid

    def forget(self, h: bytes, pid: int) -> None:
        with self._lock:
            if self._pages.get(h) == pid:
                del self._pages[h]

    def clear(self) -> None:
        with self._lock:
            self._pages.clear()

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, h: bytes) -> bool:
        return h in self._pages


class _Node:
    __slots__ = ("parent", "children", "tick")

    def __init__(self, parent, tick):
        self.parent, self.children, self.tick = parent, set(), tick


class PrefixLRU:
    """Eviction order of one tier: least recently used *leaf* first (an entry with no
    entry below it in this tier), so a prefix never loses a page before its descendants.

    Keys are page or chunk names; each names its parent (None for a root). Ticks are
    nanoseconds (``time.time_ns()`` unless given, e.g. a file's mtime), strictly increasing
    for touches made here. Not thread-safe: the tier's lock guards it."""

    def __init__(self):
        self._nodes: dict = {}
        self._waiting: dict = {}      # parent not present -> its children present
        self._heap: list = []         # (tick, key) of leaves; stale entries skipped
        self._last = 0

    def _now(self, tick):
        if tick is None:
            tick = max(time.time_ns(), self._last + 1)
            self._last = tick
        return tick

    def add(self, key, parent=None, tick: int | None = None) -> None:
        if key in self._nodes:
            self.touch(key, tick)
            return
        node = _Node(parent, self._now(tick))
        node.children = self._waiting.pop(key, set())
        self._nodes[key] = node
        if parent is not None:
            p = self._nodes.get(parent)
            (p.children if p is not None else self._waiting.setdefault(parent, set())).add(key)
        if not node.children:
            heapq.heappush(self._heap, (node.tick, key))

    def tick(self, key) -> int | None:
        """When `key` was last used (None when absent)."""
        node = self._nodes.get(key)
        return None if node is None else node.tick

    def touch(self, key, tick: int | None = None) -> int | None:
        """Mark `key` used now (or at `tick`); its new tick (None when absent)."""
        node = self._nodes.get(key)
        if node is None:
            return None
        node.tick = self._now(tick)
        if not node.children:
            heapq.heappush(self._heap, (node.tick, key))
        self._compact()
        return node.tick

    def remove(self, key) -> None:
        node = self._nodes.pop(key, None)
        if node is None:
            return
        if node.children:                   # forced removal (clear, a bad file): orphans wait
            self._waiting.setdefault(key, set()).update(node.children)
        if node.parent is not None:
            p = self._nodes.get(node.parent)
            if p is not None:
                p.children.discard(key)
                if not p.children:
                    heapq.heappush(self._heap, (p.tick, node.parent))
            else:
                w = self._waiting.get(node.parent)
                if w is not None:
                    w.discard(key)
                    if not w:
                        del self._waiting[node.parent]

    def peek(self):
        """(tick, key) of the next victim, or None when empty."""
        while self._heap:
            tick, key = self._heap[0]
            node = self._nodes.get(key)
            if node is not None and node.tick == tick and not node.children:
                return tick, key
            heapq.heappop(self._heap)
        return None

    def pop(self):
        """Remove and return the next victim's key (None when empty)."""
        top = self.peek()
        if top is None:
            return None
        self.remove(top[1])
        return top[1]

    def _compact(self) -> None:
        if len(self._heap) > 4 * len(self._nodes) + 64:
            self._heap = [(n.tick, k) for k, n in self._nodes.items() if not n.children]
            heapq.heapify(self._heap)

    def clear(self) -> None:
        self._nodes.clear(), self._waiting.clear(), self._heap.clear()

    def __contains__(self, key) -> bool:
        return key in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)
