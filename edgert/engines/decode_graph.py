"""The MoE decode step compiled ahead of time: two graphs per model, built once with
`torch.export` and AOTInductor, kept on disk, called through their C++ runner.

Why ahead of time. On the project's CPU a torch op issued from Python costs 3-9 us however
small its work (a 1x128 by 128x128 product: 8.8 us; a multiply: 3.4 us), and one eager
decode token of the demo Mixtral issues about 2,450 of them. `torch.compile` fuses them, but
each call of a compiled function costs about 33 us of dynamo and wrapper overhead here
(measured with a one-add function and 1 to 40 tensor arguments alike), which is a layer's
whole budget. A package from `aoti_compile_and_package`, called through its loader's `run`,
costs about 2 us per call. (Measurements: docs/benchmarks.md, `edgert bench moe-step`.)

The graphs, each shared by every layer (same shapes; a layer's weights are inputs):
- `attn`: input norm, q/k/v (one product where the pack stores them back to back), the
  family's q/k norms and clip, rotary, attention over the sequence's past K/V read straight
  from the arena's pages by index (no gather per layer in Python) plus the new token's own
  K/V, the output projection and residual, the post-attention norm, the router (routing
  weights, top-k ids, probabilities) and the next sparse layer's router on this state (the
  prefetch hint). Returns the new K/V; the caller stores every layer's at once.
- `experts`: the token's k routed experts (gate and up as one product where stored back to
  back), each term rounded and added in the caller's order (ascending expert id, as the eager
  step), Qwen2-MoE's gated shared expert, and the residual.
Between them the expert cache decides in Python which slots a token uses (its hits, misses,
prefetch and substitution unchanged) and pins them; the experts graph reads the slots where
they lie, one product per matrix, never a gathered copy (tools/moe_gather_probe.py).

Every operation is the eager step's own function from `moe_layers`, traced, so the graphs
compute the same math in the same order; fused kernels may round the last bit differently
(float32 logits stay within 1e-4 of transformers: tests/test_moe_decode_graph.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgert.engines.lowbit import Int4Linear, Int8Linear, linear
from edgert.engines.moe_layers import (MoeConfig, apply_rope, attention, layer_norm, rms_norm,
                                       rms_normalize, route)

log = logging.getLogger(__name__)

PAGE_TOKENS = 16      # tokens per KV page (edgert.kv.paged)
FORMAT = 5            # bump when the graphs' inputs or math change: old packages are ignored


@dataclass(frozen=True)
class StepShape:
    """What fixes the graphs: the family's math, the sizes, the dtype, the weight variants.

    qkv: "fused" (one [q+k+v, hidden] weight) | "split" (three, with biases when `qkv_bias`).
    experts: "fused" (gate_up, down) | "split" (gate, up, down) | "int8" | "int4"."""
    cfg: MoeConfig
    dtype: str
    qkv: str
    qkv_bias: bool
    o_bias: bool
    experts: str
    group: int = 0
    ffn: int = 0

    def key(self) -> str:
        text = repr((FORMAT, torch.__version__, asdict(self)))
        return hashlib.sha256(text.encode()).hexdigest()[:20]


# --- the graphs' math (traced by torch.export) -----------------------------------------------
class _Attn(torch.nn.Module):
    """Inputs: h [1, hidden]; kv [arena pages, layers, 2*16*Hk*D] (every page's K/V, a strided
    view of the whole arena: `PagePool.all_rows`); pages [P] (int64 ids of the sequence's
    pages that hold its past); meta [3] int64 = (past tokens, first visible past position,
    layer); inv_freq [D/2]
    (the rotary's, float32); then the layer's weights in `attn_weights` order. Outputs: h, the MoE input a, router
    probabilities (float32), top-k weights, top-k ids, the new K and V [Hk, D], hint
    probabilities (float32) of the next sparse layer's router."""

    def __init__(self, s: StepShape):
        super().__init__()
        self.s = s

    def forward(self, h, kv, pages, meta, inv_freq, w: list):
        s, c = self.s, self.s.cfg
        freqs = meta[0:1, None].float() * inv_freq                           # Rotary.cos_sin
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        w = list(w)
        take = w.pop
        w.reverse()
        ln1 = (take(), take()) if c.norm == "layer" else (take(),)
        a = _norm(c, h, ln1)
        if s.qkv == "fused":
            q, k, v = F.linear(a, take()).split(
                (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                 c.num_kv_heads * c.head_dim), dim=-1)
        else:
            ws = [take() for _ in range(3)]
            bs = [take() for _ in range(3)] if s.qkv_bias else [None] * 3
            q, k, v = (F.linear(a, wi, bi) for wi, bi in zip(ws, bs))
        if c.qk_norm == "full":
            q, k = rms_norm(q, take(), c.rms_eps), rms_norm(k, take(), c.rms_eps)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        D, Hq, Hk = c.head_dim, c.num_heads, c.num_kv_heads
        q, k, v = q.view(1, Hq, D), k.view(1, Hk, D), v.view(1, Hk, D)
        if c.qk_norm == "head":
            q, k = rms_norm(q, take(), c.rms_eps), rms_norm(k, take(), c.rms_eps)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)   # [H|Hk, 1, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # the past: layer l's K and V of page i are row pages[i] of kv[:, l] (16 tokens of K,
        # then 16 of V), read by index in one gather, never beyond the sequence's pages
        rows = kv[pages, meta[2:3]]          # [P, 2*16*Hk*D]: only the sequence's pages
        rows = rows.view(-1, 2, PAGE_TOKENS, Hk, D)
        past = torch.arange(rows.shape[0] * PAGE_TOKENS)
        valid = (past < meta[0]) & (past >= meta[1])
        Kp = torch.where(valid[:, None, None], rows[:, 0].reshape(-1, Hk, D), 0)
        Vp = torch.where(valid[:, None, None], rows[:, 1].reshape(-1, Hk, D), 0)
        K = torch.cat((Kp.transpose(0, 1), k), dim=1)                        # [Hk, S'+1, D]
        V = torch.cat((Vp.transpose(0, 1), v), dim=1)
        mask = torch.cat((valid, torch.ones(1, dtype=torch.bool)))[None, :]
        o = attention(q, K, V, mask)
        ow = take()
        h = h + F.linear(o, ow, take() if s.o_bias else None)
        ln2 = (take(), take()) if c.norm == "layer" else (take(),)
        if c.norm == "rms":
            x_hat = rms_normalize(h, c.rms_eps)
            a = ln2[0] * x_hat
        else:
            x_hat = F.layer_norm(h, (c.hidden_size,), eps=c.rms_eps)
            a = layer_norm(h, ln2[0], ln2[1], c.rms_eps)
        probs, weights, topk = route(c, F.linear(a, take()))
        topk, order = topk.sort(dim=-1)          # ascending id: the order terms are summed in
        weights = weights.gather(-1, order)
        hw = take()
        hb = take() if c.norm == "layer" else None
        hint = F.softmax(F.linear(x_hat, hw, hb).float(), dim=-1)
        return h, a, probs, weights[0], topk[0], k[:, 0], v[:, 0], hint


class _Experts(torch.nn.Module):
    """Inputs: h, a [1, hidden]; coef [k] (the routing weight of each term); then per term
    the expert's tensors (`expert_tensors` order); then the shared expert's four weights
    (Qwen2-MoE). Output: h + sum of terms (+ the gated shared expert)."""

    def __init__(self, s: StepShape):
        super().__init__()
        self.s = s
        self.per = {"fused": 2, "split": 3, "int8": 6, "int4": 6}[s.experts]

    def forward(self, h, a, coef, *w):
        s, c, n = self.s, self.s.cfg, self.per
        out = None
        for i in range(c.top_k):
            m = w[i * n:(i + 1) * n]
            if s.experts == "fused":
                g, u = F.linear(a, m[0].to(a.dtype)).chunk(2, dim=-1)
                y = F.linear(F.silu(g) * u, m[1].to(a.dtype))
            else:
                gate, up, down = _linears(s, m, a.dtype)
                y = linear(F.silu(linear(a, gate)) * linear(a, up), down)
            term = (y * coef[i]).to(y.dtype)
            out = term if out is None else out + term
        if c.shared_expert:
            sg, su, sd, gate = w[c.top_k * n:]
            sh = F.linear(F.silu(F.linear(a, sg)) * F.linear(a, su), sd)
            out = out + torch.sigmoid(F.linear(a, gate)) * sh
        return h + out


def _linears(s: StepShape, m, dtype):
    if s.experts == "split":
        return [t.to(dtype) for t in m]
    if s.experts == "int8":
        return [Int8Linear(m[2 * i], m[2 * i + 1]) for i in range(3)]
    return [Int4Linear(m[2 * i], m[2 * i + 1], s.group) for i in range(3)]


def _norm(c: MoeConfig, x, w):
    return rms_norm(x, w[0], c.rms_eps) if c.norm == "rms" else layer_norm(x, w[0], w[1],
                                                                          c.rms_eps)


# --- building, caching, calling --------------------------------------------------------------
class DecodeGraphs:
    """The two compiled graphs of one `StepShape`, from `cache_dir` when a previous process
    built them, else exported and compiled now (`compile_s`; `cached` says which).
    Raises whatever export or compilation raised; the caller falls back to eager."""

    def __init__(self, shape: StepShape, attn_example: list, experts_example: list,
                 cache_dir: Path):
        self.shape = shape
        t0 = time.perf_counter()
        key = shape.key()
        hits = []
        self._attn = self._get(cache_dir / f"decode-attn-{key}.pt2", hits,
                               lambda: _export_attn(shape, attn_example))
        self._experts = self._get(cache_dir / f"decode-experts-{key}.pt2", hits,
                                  lambda: torch.export.export(_Experts(shape),
                                                              tuple(experts_example)))
        self.cached = all(hits)
        self.compile_s = time.perf_counter() - t0

    @staticmethod
    def _get(path: Path, hits: list, export):
        if path.is_file():
            try:
                runner = _load(path)
                hits.append(True)
                return runner
            except Exception as e:  # noqa: BLE001 -- a stale or torn package: build again
                log.info("compiled decode graph %s unusable (%s); building it again", path, e)
        from torch._inductor import aoti_compile_and_package
        hits.append(False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")
        try:
            with _int4_as_fallback():
                aoti_compile_and_package(export(), package_path=str(tmp))
            os.replace(tmp, path)       # NOTE: whole or absent, for a process beside us
        finally:
            tmp.unlink(missing_ok=True)
        return _load(path)

    def attn(self, args: list) -> list:
        return self._attn.run(args)

    def experts(self, args: list) -> torch.Tensor:
        return self._experts.run(args)[0]


def _load(path: Path):
    """The package's C++ runner. NOTE: torch's own `aoti_load_package` wraps the same loader
    but first imports inductor (1.4 s here, twice what a restarted process spends loading its
    model); the loader itself takes a few ms."""
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader
    except AttributeError:                       # another torch: the public way
        from torch._inductor import aoti_load_package
        return aoti_load_package(str(path)).loader
    return loader(str(path), "model", False, 1, -1)


def _export_attn(shape: StepShape, example: list):
    pages = torch.export.Dim("pages", min=1, max=1 << 20)
    head, w = example[:5], list(example[5:])
    spec = (None, None, {0: pages}, None, None, [None] * len(w))
    return torch.export.export(_Attn(shape), (*head, w), dynamic_shapes=spec)


@contextlib.contextmanager
def _int4_as_fallback():
    """Compile torch's CPU int4 product as a plain call of the aten kernel.

    NOTE: inductor's own lowering of `_weight_int4pack_mm_for_cpu` (torch 2.13,
    quantized_lowerings.py) takes its scales unrealized and fails ("LoweringException:
    AssertionError: Pointwise") whenever they are computed in the graph, as the float16
    scales converted to a float32 step's dtype are. A fallback realizes its inputs first. The
    swap lasts for one compilation; the process's other compilations keep inductor's."""
    from torch._inductor import lowering as L
    op = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    saved = L.lowerings.get(op)
    L.lowerings[op] = L.fallback_handler(op, add_to_fallback_set=False)
    try:
        yield
    finally:
        if saved is None:
            L.lowerings.pop(op, None)
        else:
            L.lowerings[op] = saved
