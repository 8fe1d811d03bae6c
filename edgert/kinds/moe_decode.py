"""MoeLM's decode step through the ahead-of-time compiled graphs (engines/decode_graph.py).

Per token: per layer one `attn` call, the expert cache's route / acquire in Python, one
`experts` call over the pinned slots, release; then every layer's new K/V are stored into the
sequence's page with one copy each, the page tails and prefix hashes are kept as in the
eager step, and the logits are computed. Prefill, mixed precision, models with dense MLP
layers and steps whose experts the cache cannot pin at once take the eager path.

`GraphStep.build(lm)` returns None with a logged reason where the model cannot use it; a
failed export or compile falls back to eager the same way (`MoeLM.stats()["compile"]`).
"""
from __future__ import annotations

import logging

import torch

from edgert.engines.compile import cache_dir, use_cache_dir
from edgert.engines.decode_graph import PAGE_TOKENS, DecodeGraphs, StepShape

from .moe_weights import HINT, HINT_BIAS, QKV

log = logging.getLogger(__name__)


class Unsupported(Exception):
    """This model takes the eager step (the message says why)."""


class GraphStep:
    def __init__(self, lm, shape: StepShape, graphs: DecodeGraphs):
        self.lm, self.shape, self.graphs = lm, shape, graphs
        c = lm.cfg
        pages = lm.pages
        self.kv_rows = pages.all_rows()
        self.windows = c.sliding_windows
        self.weights = [_attn_weights(lm, l, shape) for l in range(c.num_layers)]
        self.shared = [_shared_weights(lm, l) for l in range(c.num_layers)]
        self.inv_freq = lm.rotary.inv_freq
        self.hinted = [lm._next_moe[l] for l in range(c.num_layers)]   # its next sparse layer
        self.tokens = 0

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def build(cls, lm) -> "GraphStep | None":
        """The compiled step for `lm`, or None (eager) with the reason logged and kept in
        `lm._compile_info`."""
        info = lm._compile_info
        try:
            shape = step_shape(lm)
        except Unsupported as e:
            info.update(compiled=False, failed=f"not compiled: {e}")
            log.info("%s decodes eagerly: %s", lm.name, e)
            return None
        try:
            d = cache_dir(lm.rt.config.storage.scratch_dir)
            use_cache_dir(d)
            graphs = DecodeGraphs(shape, _attn_example(lm, shape), _experts_example(lm, shape),
                                  d)
        except Exception as e:  # noqa: BLE001 -- any failure to compile means eager
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            info.update(compiled=False, failed=reason)
            log.warning("compiling %s's decode step failed (%s); it decodes eagerly",
                        lm.name, reason)
            return None
        info.update(compiled=True, compile_s=graphs.compile_s, cached=graphs.cached,
                    failed=None, step="aot")
        log.info("%s: decode step compiled ahead of time in %.1f s (%s)", lm.name,
                 graphs.compile_s, "from the cache" if graphs.cached else "built now")
        return cls(lm, shape, graphs)

    # --- one token --------------------------------------------------------------------------
    def run(self, seq, token: int) -> torch.Tensor:
        """Feed one token after what `seq` holds (at least one token); logits [1, vocab]."""
        lm = self.lm
        kv, provider = lm.kv, lm.provider
        kv.reserve(seq, 1)                                # BudgetExceeded before any write
        length = seq.length
        idx = seq._index
        if idx is None or idx.shape[0] != len(seq.block_table):
            idx = seq._index = torch.tensor(seq.block_table, dtype=torch.long)
        past = idx[:-(-length // PAGE_TOKENS)]
        meta = torch.tensor([[length, 0 if w is None else max(0, length - w + 1), l]
                             for l, w in enumerate(self.windows)], dtype=torch.long)
        h = torch.nn.functional.embedding(torch.tensor([token]), lm.w["model.embed_tokens.weight"])
        freq, rows, hinted = self.inv_freq, self.kv_rows, self.hinted
        ks, vs = [], []
        for l, m in enumerate(meta.unbind(0)):
            h, a, probs, weights, topk, k, v, hint = self.graphs.attn(
                [h, rows, past, m, freq, *self.weights[l]])
            ks.append(k)
            vs.append(v)
            nxt = hinted[l]
            if nxt is not None and lm._wants_hint(nxt):
                provider.hint(nxt, hint)
            h = self._experts(l, h, a, probs, weights, topk)
        self._store(seq, length, ks, vs)
        kv.write_tails(seq, h)
        kv.advance(seq, [token])
        self.tokens += 1
        return lm._logits(h)            # NOTE: eager: a third graph cost a third more compile

    def _experts(self, l, h, a, probs, weights, topk) -> torch.Tensor:
        lm, provider = self.lm, self.lm.provider
        use = provider.route(l, probs, topk)                  # topk, weights: [k]
        row = use.tolist()
        experts = sorted(set(row))
        group = getattr(provider, "max_acquire", 1) or len(experts)
        if group < len(experts):          # the cache cannot pin them together: eager terms
            p = f"model.layers.{l}.{lm.cfg.moe_prefix}."
            return h + lm._shared(a, p, lm._moe_one_token(l, a, row, weights, experts))
        # the graph gave the top-k in ascending id; a substitution may have changed that
        if use is topk and len(experts) == len(row):
            coef = weights
        else:
            js = [j for e in experts for j, r in enumerate(row) if r == e]
            coef, row = weights[js], [row[j] for j in js]
        held = provider.acquire(l, experts)
        try:
            mats = []
            for e in row:
                mats.extend(expert_tensors(self.shape.experts, held[e]))
            return self.graphs.experts([h, a, coef, *mats, *self.shared[l]])
        finally:
            provider.release(l, experts)

    def _store(self, seq, length: int, ks, vs) -> None:
        """Every layer's K and V of the new token into its page, one copy each."""
        page = self.lm.pages.page(seq.block_table[length // PAGE_TOKENS])
        off = length % PAGE_TOKENS
        page[:, 0, off] = torch.stack(ks)
        page[:, 1, off] = torch.stack(vs)


def expert_tensors(kind: str, ew) -> tuple:
    """One expert's tensors as the experts graph takes them (`_Experts`)."""
    if kind == "fused":
        return ew.gate_up, ew.down
    if kind == "split":
        return ew.gate, ew.up, ew.down
    if kind == "int8":
        return ew.gate.q, ew.gate.s, ew.up.q, ew.up.s, ew.down.q, ew.down.s
    return ew.gate.q, ew.gate.sz, ew.up.q, ew.up.sz, ew.down.q, ew.down.sz


# --- what the graphs are built for ----------------------------------------------------------
def step_shape(lm) -> StepShape:
    """The model's `StepShape`; Unsupported (why) where the compiled step does not apply."""
    c, w = lm.cfg, lm.w
    if lm.device.type != "cpu":
        raise Unsupported("the ahead-of-time step is built for the CPU; on CUDA the expert "
                          "terms are compiled with torch.compile (engines/compile.py)")
    if lm.precision == "mixed":
        raise Unsupported("mixed precision picks each expert's precision per token")
    if set(c.moe_layers) != set(range(c.num_layers)):
        raise Unsupported("the model has dense MLP layers")
    fused = [QKV.format(l) in w for l in range(c.num_layers)]
    if any(fused) and not all(fused):
        raise Unsupported("q/k/v are stored back to back in some layers only")
    p0 = "model.layers.0.self_attn."
    qkv_bias = p0 + "q_proj.bias" in w
    lay = lm.layout
    if lay.scheme is None:
        exp = "fused" if lay.gate_up_adjacent else "split"
    else:
        exp = lay.scheme
    ffn, _ = lay.ffn_hidden
    return StepShape(c, str(lm.dtype).removeprefix("torch."), "fused" if all(fused) else "split",
                     qkv_bias, p0 + "o_proj.bias" in w, exp, lay.group_size, ffn)


def _attn_weights(lm, l: int, s: StepShape) -> list:
    c, w = lm.cfg, lm.w
    p = f"model.layers.{l}."
    a = p + "self_attn."
    out = [w[p + "input_layernorm.weight"]]
    if c.norm == "layer":
        out.append(w[p + "input_layernorm.bias"])
    if s.qkv == "fused":
        out.append(w[QKV.format(l)])
    else:
        out += [w[f"{a}{n}_proj.weight"] for n in "qkv"]
        if s.qkv_bias:
            out += [w[f"{a}{n}_proj.bias"] for n in "qkv"]
    if c.qk_norm is not None:
        out += [w[a + "q_norm.weight"], w[a + "k_norm.weight"]]
    out.append(w[a + "o_proj.weight"])
    if s.o_bias:
        out.append(w[a + "o_proj.bias"])
    out.append(w[p + "post_attention_layernorm.weight"])
    if c.norm == "layer":
        out.append(w[p + "post_attention_layernorm.bias"])
    out.append(w[f"{p}{c.moe_prefix}.gate.weight"])
    nxt = lm._next_moe[l]
    h = l if nxt is None else nxt          # the last layer's hint is computed, never used
    out.append(w[HINT.format(h)])
    if c.norm == "layer":
        out.append(w[HINT_BIAS.format(h)])
    return out


def _shared_weights(lm, l: int) -> list:
    if not lm.cfg.shared_expert:
        return []
    w, p = lm.w, f"model.layers.{l}.{lm.cfg.moe_prefix}."
    return [w[p + "shared_expert.gate_proj.weight"], w[p + "shared_expert.up_proj.weight"],
            w[p + "shared_expert.down_proj.weight"], w[p + "shared_expert_gate.weight"]]


def _attn_example(lm, s: StepShape) -> list:
    past = torch.tensor([0, 1], dtype=torch.long)
    meta = torch.tensor([17, 0, 0], dtype=torch.long)
    h = torch.zeros(1, lm.cfg.hidden_size, dtype=lm.dtype)
    return [h, lm.pages.all_rows(), past, meta, lm.rotary.inv_freq, *_attn_weights(lm, 0, s)]


def _experts_example(lm, s: StepShape) -> list:
    c, lay = lm.cfg, lm.layout
    h = torch.zeros(1, c.hidden_size, dtype=lm.dtype)
    coef_dtype = torch.float32 if c.family == "mixtral" else lm.dtype
    # NOTE: one buffer per term: export would read one tensor passed twice as one input
    mats = [t for _ in range(c.top_k) for t in expert_tensors(
        s.experts, lay.views(torch.zeros(lay.slot_bytes, dtype=torch.uint8).numpy()))]
    return [h, h.clone(), torch.zeros(c.top_k, dtype=coef_dtype), *mats,
            *_shared_weights(lm, c.moe_layers[0])]

