"""MoeLM: an MoE decoder (Mixtral, Qwen2/3-MoE, OLMoE, PhiMoE) over arena memory, experts
from an ExpertProvider.

Where the bytes live (one budget, the runtime's arena):
- non-expert weights: one extent, converted once to the device config's dtype and used
  through zero-copy torch views (moe_weights.py);
- experts: the provider's slots (the expert cache, or every expert resident);
- K/V: 16-token pages (edgert.kv.paged); prefixes already computed are
  reused from the arena, the host tier or the disk tier (edgert.kv.cache), and a prompt is
  prefilled in chunks of ``kv_cache.chunk_tokens``.

Per layer: attention over the paged cache; then, before the MoE block, the next sparse
layer's router is applied to the current hidden state and handed to `provider.hint` so
its experts can be prefetched while this layer computes.

Device: with `device: cuda` in the config (and a GPU torch can use) the model computes on
the GPU over the *same* arena bytes: the arena is page-locked and mapped into the GPU's
address space, and every weight, expert slot and KV page is a zero-copy CUDA view of it
(`Arena.on_gpu`). On Jetson, where CPU and GPU share DRAM, that is the only copy of
anything, so the one budget stays exact. Where the arena cannot be mapped, the model
computes on the CPU and says why in the log.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from edgert.dtypes import torch_dtype
from edgert.errors import BudgetExceeded, ConfigError, EdgertError, InputMismatch
from edgert.experts.api import ExpertLayout, slots_for_budget
from edgert.experts.cache import ExpertCache
from edgert.experts.mixed import (MixedExperts, precision_band,
                                  split_budget, token_bands)
from edgert.kv.cache import KVCache
from edgert.projection.costmodel import default_policy, prefetch_default
from edgert.kv.paged import PagePool
from edgert.kv.prefix import extra_keys, model_fingerprint

from edgert.engines.moe_layers import (MoeConfig, Rotary, apply_rope, attention, causal_mask,
                                       layer_norm, rms_norm, rms_normalize, route, swiglu)
from edgert.engines.compile import for_model as compiled_for, wanted as compile_wanted
from edgert.engines.moe_step import expert_terms, split_qkv
from edgert.engines.sampling import check_sampling, sample
from edgert.engines.threads import use_torch_threads
from edgert.engines.tokenizer import tokenizer_for

from .base import LoadedModel
from .generation import GenerateResult, Generation, _Progress
from .moe_decode import GraphStep
from .moe_options import check_mixed, check_options, check_precision, pick_device
from .moe_weights import HINT as _HINT, HINT_BIAS as _HINT_BIAS, QKV as _QKV, load_dense_weights

log = logging.getLogger(__name__)


class MoeLM(LoadedModel):
    """An MoE language model (families: edgert.pack.families). See docs/internals.md for
    the pack layout.

    expert_budget: None = the device config's ``memory.experts``; a float in (0, 1] = that
    fraction of all experts; an int = bytes. lossy_alpha > 0 lets the expert cache
    substitute a resident expert for a missing one inside the gate-score band.
    prefix_cache: None = the device config's ``kv_cache.prefix``; True / False overrides it.
    precision: "exact" (the checkpoint's experts, bit for bit as without low-bit copies),
    "int8" / "int4" (every expert from the pack's low-bit copy, computed by torch's
    weight-only kernels; budgets count the copy's bytes), "mixed" (per token, selected
    experts in the top band of `precision_alpha` at full precision, the others from int4
    copies; two caches in one byte budget: edgert/experts/mixed.py); None = the pack's
    default (its `--quant`, else exact).

    Thread-safe: each forward step (a prefill, a decode token) runs under the model's lock,
    so concurrent `generate()` calls interleave token by token and never pin experts
    against each other.
    """

    kind = "moe"

    def __init__(self, rt, reader, name: str, expert_budget=None, lossy_alpha: float = 0.0,
                 policy=None, provider=None, prefix_cache: bool | None = None,
                 precision: str | None = None, precision_alpha: float | None = None):
        check_options(expert_budget, lossy_alpha, policy)
        precision = check_precision(reader, precision)
        self.precision_alpha = check_mixed(precision, precision_alpha, lossy_alpha)
        if prefix_cache is not None and not isinstance(prefix_cache, bool):
            raise ConfigError(f"prefix_cache must be True, False or None, got {prefix_cache!r}")
        self.cfg = MoeConfig.from_hf(reader.config)     # UnsupportedModel before anything
        super().__init__(rt, reader, name)
        self.dtype = torch_dtype(rt.config.dtype)
        rt.set_torch_threads()
        self.device = pick_device(rt)
        self._gpu_views: dict[tuple, torch.Tensor] = {}
        self._own_provider = provider is None
        self.provider = None
        self.pages = self.kv = None
        self.w: dict[str, torch.Tensor] = {}
        kv_opts = rt.config.kv_cache
        if prefix_cache is not None:
            kv_opts = replace(kv_opts, prefix=prefix_cache)
        self.chunk_tokens = kv_opts.chunk_tokens
        try:
            self.w, self._weight_bytes = load_dense_weights(
                rt.arena, reader, self.cfg, self.dtype, f"{name}: dense weights", self._own)
            if self.device.type != "cpu":  # the same bytes, as the GPU sees them
                self.w = {k: rt.arena.on_gpu(t) for k, t in self.w.items()}
            if "lm_head.weight" not in self.w:  # tie_word_embeddings (checked at pack time)
                self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
            self.precision = precision
            self.layout = ExpertLayout.from_reader(
                reader, "exact" if precision == "mixed" else precision)
            self.low_layout = ExpertLayout.from_reader(reader, "int4") \
                if precision == "mixed" else None
            self.provider = provider or self._make_provider(expert_budget, lossy_alpha, policy)
            if self._own_provider:
                self._own(self.provider)
            # with prefix reuse a page also keeps its last token's final hidden state, so a
            # prompt that is entirely cached gets its logits without computing anything
            tail = self.cfg.hidden_size if kv_opts.prefix else 0
            self.pages = self._own(PagePool(
                rt.arena, f"{name}: kv pages", self.cfg.num_layers, self.cfg.num_kv_heads,
                self.cfg.head_dim, self.dtype, cap=rt.config.budget.kv or None,
                to_device=None if self.device.type == "cpu" else rt.arena.on_gpu, tail=tail))
            fp = model_fingerprint(reader, rt.config.dtype, self.pages.page_shape, tail)
            self.kv = self._own(KVCache(self.pages, fp, kv_opts, self.device, self._lock))
        except BaseException:
            self.close()
            raise
        self.rotary = Rotary(self.cfg.head_dim, self.cfg.rope_theta, self.device)
        self.tokenizer = tokenizer_for(reader.sections, reader.config)
        self._next_moe = {l: next((m for m in self.cfg.moe_layers if m > l), None)
                          for l in range(self.cfg.num_layers)}
        # the step of engines/moe_step.py (False: the step before it, separate q/k/v and
        # gate/up products; the per-expert loop stays for the low-bit kernels). Read per step:
        # `edgert bench moe-step` flips it to measure both in one process
        self.fast_decode = True
        # `compile: on` (or auto on CUDA): on the CPU the whole decode step is compiled ahead
        # of time (kinds/moe_decode.py; `graph_decode = False` turns it off per step, as
        # `edgert bench moe-step` does to measure both); on CUDA the expert terms
        self._compile_info: dict = {}
        self._graph = None
        self.graph_decode = True
        self._expert_terms = expert_terms
        if compile_wanted(rt.config.compile, self.device.type):
            if self.device.type == "cpu":
                try:                # a compile can take a minute: an interrupt gives all back
                    self._graph = GraphStep.build(self)
                except BaseException:
                    self.close()
                    raise
            else:
                self._expert_terms = compiled_for(expert_terms, f"{name}: expert step",
                                                  rt.config, self.device.type)
        self.counters = {"prefill_tokens": 0, "decode_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0}

    # --- loading --------------------------------------------------------------------------
    def _make_provider(self, expert_budget, lossy_alpha, policy):
        budget = self.rt.config.budget
        total = len(self.layout.table)
        cap = budget.experts if expert_budget is None else self.rt.arena.mapped
        if self.precision == "mixed":
            return self._make_mixed(expert_budget, cap, policy)
        slots = slots_for_budget(expert_budget, total, self.layout.extent_bytes, cap)
        # unnamed: the policy and prefetch the device config's cost model picks (costmodel.py)
        return ExpertCache(self.reader, self.rt.arena, f"{self.name}: expert slots", slots,
                           layout=self.layout,
                           policy=policy or default_policy(self.rt.config, self.layout,
                                                           slots / max(1, total)),
                           lossy_alpha=lossy_alpha,
                           prefetch=prefetch_default(self.rt.config, self.layout))

    def _make_mixed(self, expert_budget, cap, policy):
        """Two caches, full precision and int4, splitting one byte budget (`split_budget`);
        a fraction is of the full-precision experts' bytes. BudgetExceeded before any slot
        is taken when the budget is over `cap` or below top-k slots at each precision."""
        lay, low = self.layout, self.low_layout
        n = len(lay.table)
        if expert_budget is None:
            total = cap
        elif isinstance(expert_budget, float):
            total = max(1, round(expert_budget * n)) * lay.slot_bytes
        else:
            total = expert_budget
        if total > cap:
            raise BudgetExceeded("mixed-precision expert slots", total, cap)
        hi, lo = split_budget(total, lay.slot_bytes, low.slot_bytes, n, lay.top_k)
        pol = policy or default_policy(self.rt.config, lay, hi / max(1, n))
        pre = prefetch_default(self.rt.config, lay)
        exact = ExpertCache(self.reader, self.rt.arena, f"{self.name}: expert slots (exact)", hi,
                            policy=pol, prefetch=pre, layout=lay)
        try:
            cheap = ExpertCache(self.reader, self.rt.arena, f"{self.name}: expert slots (int4)",
                                lo, policy=pol, prefetch=pre, layout=low)
        except BaseException:
            exact.close()
            raise
        return MixedExperts(exact, cheap, self.precision_alpha)

    # --- the forward pass -----------------------------------------------------------------
    @torch.inference_mode()
    def _step(self, seq, ids: list[int], all_logits: bool) -> torch.Tensor:
        """Feed `ids` after what `seq` holds: cached pages first, the rest in chunks of
        `chunk_tokens`; logits [T, vocab] (all_logits) or [1, vocab]. On an error the
        sequence is as before."""
        kv = self.kv
        pages, length = len(seq.block_table), seq.length
        try:
            hit = 0 if all_logits else kv.match(seq, ids)
            rest = ids[hit:]
            if not rest:        # entirely cached: the last page kept its final hidden state
                return self._logits(kv.tail(seq)[None])
            kv.reserve(seq, len(rest))                    # BudgetExceeded before any compute
            use_torch_threads(min(len(rest), self.chunk_tokens), self.cfg.hidden_size,
                              self.rt.config)
            t0, outs = time.perf_counter(), []
            for i in range(0, len(rest), self.chunk_tokens):
                part = rest[i:i + self.chunk_tokens]
                last = i + len(part) == len(rest)
                if self._graph is not None and self.graph_decode and len(part) == 1 \
                        and seq.length and not all_logits:
                    out = self._graph.run(seq, part[0])
                else:
                    out = self._forward(seq, part, None if all_logits else
                                        slice(-1, None) if last else slice(0, 0))
                if all_logits or last:
                    outs.append(out)
            if len(rest) > 1 or length == 0:
                kv.note_compute(len(rest), time.perf_counter() - t0)
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        except BaseException:
            kv.truncate(seq, pages, length)
            raise

    @torch.inference_mode()
    def _forward(self, seq, ids: list[int], rows: slice | None = None) -> torch.Tensor:
        """Run `ids` after what `seq` holds; logits [T', vocab] of the `rows` asked for."""
        c, w = self.cfg, self.w
        T = len(ids)
        self.kv.reserve(seq, T)                           # BudgetExceeded before any write
        start = seq.length
        pos = torch.arange(start, start + T, device=self.device)
        cos, sin = self.rotary.cos_sin(pos, self.dtype)
        h = F.embedding(torch.tensor(ids, dtype=torch.long, device=self.device),
                        w["model.embed_tokens.weight"])
        masks: dict = {}
        for l in range(c.num_layers):
            p = f"model.layers.{l}."
            a = self._norm(h, p + "input_layernorm")
            q, k, v = self._qkv(a, p + "self_attn.")                  # [H|Hk, T, D]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.kv.write(seq, l, k, v)
            K, V = self.kv.read(seq, l, start + T)
            win = c.sliding_windows[l]
            if win not in masks:  # one mask per window size; none for a decode step seeing all
                masks[win] = None if T == 1 and (win is None or start + 1 <= win) \
                    else causal_mask(pos, start + T, win)
            o = attention(q, K, V, masks[win])
            h = h + F.linear(o, w[p + "self_attn.o_proj.weight"],
                             w.get(p + "self_attn.o_proj.bias"))
            nxt = self._next_moe[l]
            hint = nxt is not None and self._wants_hint(nxt)
            post = p + "post_attention_layernorm."
            if c.norm == "rms":
                x_hat = rms_normalize(h, c.rms_eps)
                a = w[post + "weight"] * x_hat                       # = rms_norm(h, w, eps)
            else:
                x_hat = F.layer_norm(h, (c.hidden_size,), eps=c.rms_eps) if hint else None
                a = layer_norm(h, w[post + "weight"], w[post + "bias"], c.rms_eps)
            if hint:  # the next sparse layer's router on this state (its norm folded in)
                logits = F.linear(x_hat, w[_HINT.format(nxt)], w.get(_HINT_BIAS.format(nxt)))
                self.provider.hint(nxt, F.softmax(logits.float(), dim=-1))
            if l in c.moe_layers:
                h = h + self._moe(l, a)
            else:
                h = h + swiglu(a, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"],
                               w[p + "mlp.down_proj.weight"])
        self.kv.write_tails(seq, h)
        self.kv.advance(seq, ids)
        return self._logits(h if rows is None else h[rows])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states h [T, hidden] (before the model's last norm)."""
        h = self._norm(h, "model.norm")
        return F.linear(h, self.w["lm_head.weight"], self.w.get("lm_head.bias"))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w, c = self.w, self.cfg
        if c.norm == "rms":
            return rms_norm(x, w[name + ".weight"], c.rms_eps)
        return layer_norm(x, w[name + ".weight"], w[name + ".bias"], c.rms_eps)

    def _qkv(self, x: torch.Tensor, p: str):
        """Queries [H, T, D], keys and values [Hk, T, D] of x [T, hidden], with the family's
        q/k norms (OLMoE: over the whole projection, then clip_qkv; Qwen3-MoE: per head)."""
        c, w = self.cfg, self.w
        fused = w.get(_QKV.format(p.split(".")[2])) if self.fast_decode else None
        if fused is not None:           # one product over q, k, v stored back to back
            q, k, v = split_qkv(F.linear(x, fused), c.num_heads, c.num_kv_heads, c.head_dim)
        else:
            q, k, v = (F.linear(x, w[f"{p}{n}_proj.weight"], w.get(f"{p}{n}_proj.bias"))
                       for n in "qkv")
        if c.qk_norm == "full":
            q = rms_norm(q, w[p + "q_norm.weight"], c.rms_eps)
            k = rms_norm(k, w[p + "k_norm.weight"], c.rms_eps)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        T, D = x.shape[0], c.head_dim
        q, k, v = q.view(T, c.num_heads, D), k.view(T, c.num_kv_heads, D), v.view(T, -1, D)
        if c.qk_norm == "head":
            q = rms_norm(q, w[p + "q_norm.weight"], c.rms_eps)
            k = rms_norm(k, w[p + "k_norm.weight"], c.rms_eps)
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    def _moe(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Sparse MoE block on x [T, hidden] (after post-attention norm)."""
        c, w = self.cfg, self.w
        p = f"model.layers.{layer}.{c.moe_prefix}."
        probs, weights, topk = route(c, F.linear(x, w[p + "gate.weight"]))
        if self.precision == "mixed":
            return self._shared(x, p, self._moe_mixed(layer, x, probs, weights, topk))
        use = self.provider.route(layer, probs, topk)                  # [T, k] ids to compute with
        rows = use.tolist()
        experts = sorted({e for row in rows for e in row})
        if x.shape[0] == 1 and self.fast_decode and self.layout.scheme is None:
            out = self._moe_decode(layer, x, rows[0], weights[0], experts)
        elif x.shape[0] == 1:
            out = self._moe_one_token(layer, x, rows[0], weights[0], experts)
        else:
            out = self._moe_tokens(layer, x, use.to(x.device), weights, experts)
        return self._shared(x, p, out)

    def _shared(self, x, p: str, out: torch.Tensor) -> torch.Tensor:
        """Qwen2-MoE's shared expert, gated, added to the routed experts' sum."""
        w = self.w
        if self.cfg.shared_expert:
            s = swiglu(x, w[p + "shared_expert.gate_proj.weight"],
                       w[p + "shared_expert.up_proj.weight"], w[p + "shared_expert.down_proj.weight"])
            out = out + torch.sigmoid(F.linear(x, w[p + "shared_expert_gate.weight"])) * s
        return out

    def _moe_mixed(self, layer, x, probs, weights, topk) -> torch.Tensor:
        """Each selected (token, expert) at the precision of its band (experts/mixed.py):
        the top band from the full-precision cache, the rest from the int4 cache."""
        mixed = self.provider
        band = precision_band(probs, topk, mixed.alpha)                # [T, k]
        n_high = int(band.sum())
        mixed.note(n_high, band.numel() - n_high)
        if x.shape[0] == 1:
            return self._moe_mixed_token(layer, x, probs, weights, topk, band)
        out = torch.zeros_like(x)
        for high in (True, False):
            tok, slot = torch.where(band == high)
            if tok.numel() == 0:
                continue
            cache, ids = mixed.provider(high), topk[tok, slot]
            cache.route(layer, probs[tok], ids[:, None])               # one row per pair
            for e in sorted(set(ids.tolist())):
                held = cache.acquire(layer, [e])
                try:
                    m = ids == e
                    t = tok[m]
                    y = swiglu(x[t], *self._expert(held[e], x.dtype))
                    out.index_add_(0, t, (y * weights[t, slot[m], None]).to(x.dtype))
                finally:
                    cache.release(layer, [e])
        return out

    def _moe_mixed_token(self, layer, x, probs, weights, topk, band) -> torch.Tensor:
        """Decode: a sum of terms over Python lists (`token_bands`), the same terms in the
        same order as the rows path: top band first, each band by ascending expert id."""
        out, w = None, weights[0]
        for high, sel, order in token_bands(band, topk):
            cache = self.provider.provider(high)
            cache.route(layer, probs.expand(len(sel), -1), topk[0, sel][:, None])
            for e, j in order:
                held = cache.acquire(layer, [e])
                try:
                    y = swiglu(x, *self._expert(held[e], x.dtype))
                    term = (y * w[j]).to(x.dtype)
                    out = term if out is None else out + term
                finally:
                    cache.release(layer, [e])
        return out

    def _groups(self, experts: list[int]):
        # NOTE: a provider pins at most `max_acquire` experts at once (None = any number;
        # absent = 1, which any cache with two slots can serve even while a prefetch holds
        # one). Experts are summed in ascending id order whatever the grouping, so the
        # result depends neither on the budget nor on the cache state: exact mode is exact.
        group = getattr(self.provider, "max_acquire", 1) or len(experts)
        return [experts[i:i + group] for i in range(0, len(experts), group)]

    def _expert(self, ew, dtype):
        if not isinstance(ew.gate, torch.Tensor):   # low-bit linears: their tensors, where we compute
            return [w if self.device.type == "cpu" else replace(
                w, **{f: self._on_device(getattr(w, f)) for f in ("q", "s", "sz")
                      if hasattr(w, f)}) for w in (ew.gate, ew.up, ew.down)]
        return [t if t.dtype == dtype else t.to(dtype)
                for t in (self._on_device(ew.gate), self._on_device(ew.up), self._on_device(ew.down))]

    def _moe_decode(self, layer, x, row: list[int], weights, experts) -> torch.Tensor:
        """Decode step over exact experts (engines/moe_step.py): per pinned group one call of
        `expert_terms` on the slots' own bytes (gate and up as one product); the same terms
        in the same order as `_moe_one_token`."""
        out = None
        for ids in self._groups(experts):
            held = self.provider.acquire(layer, ids)
            try:
                js = [j for e in ids for j, r in enumerate(row) if r == e]   # ascending id
                mats = [self._fused_expert(held[row[j]], x.dtype) for j in js]
                coef = weights[js] if len(js) != len(row) or js != sorted(js) else weights
                out = self._expert_terms(x, mats, coef, out)
            finally:
                self.provider.release(layer, ids)
        return out

    def _fused_expert(self, ew, dtype) -> tuple:
        if ew.gate_up is not None and ew.gate_up.dtype == dtype:
            return self._on_device(ew.gate_up), self._on_device(ew.down)
        return tuple(self._expert(ew, dtype))

    def _moe_one_token(self, layer, x, row: list[int], weights, experts) -> torch.Tensor:
        """Decode step: the same sums, in the same order, as `_moe_tokens` on one row."""
        out = None
        for ids in self._groups(experts):
            held = self.provider.acquire(layer, ids)
            try:
                for e in ids:
                    y = swiglu(x, *self._expert(held[e], x.dtype))
                    for j, r in enumerate(row):
                        if r == e:
                            term = (y * weights[j]).to(y.dtype)
                            out = term if out is None else out + term
            finally:
                self.provider.release(layer, ids)
        return out

    def _moe_tokens(self, layer, x, use, weights, experts) -> torch.Tensor:
        out = torch.zeros_like(x)
        for ids in self._groups(experts):
            held = self.provider.acquire(layer, ids)
            try:
                for e in ids:
                    tok, slot = torch.where(use == e)
                    y = swiglu(x[tok], *self._expert(held[e], x.dtype))
                    out.index_add_(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
            finally:
                self.provider.release(layer, ids)
        return out

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """Expert weights where the model computes: a zero-copy view of an arena slot."""
        if self.device.type == "cpu" or t.device == self.device:
            return t
        key = (t.data_ptr(), t.shape, t.dtype)
        v = self._gpu_views.get(key)
        if v is None:
            try:
                v = self.rt.arena.on_gpu(t)
            except ValueError:  # a provider holding experts outside the arena (tests)
                return t.to(self.device)
            if len(self._gpu_views) > 4096:
                self._gpu_views.clear()
            self._gpu_views[key] = v
        return v

    def _wants_hint(self, layer: int) -> bool:
        ask = getattr(self.provider, "wants_hint", None)   # optional: see experts/api.py
        return ask(layer) if ask is not None else getattr(self.provider, "prefetch", True)

    # --- public surface -------------------------------------------------------------------
    def logits(self, token_ids, cache_salt=None) -> np.ndarray:
        """Logits [len, vocab] (float32) of a full prefill through the paged-cache path
        (every token is computed; the pages it fills are cached for later prompts)."""
        ids = self._ids(token_ids)
        with self.sequence(cache_salt) as s:
            return s.feed(ids, all_logits=True)

    def sequence(self, cache_salt=None) -> "Sequence":
        """A sequence in the paged KV cache, fed token by token (see `Sequence.feed`).
        Sequences with different `cache_salt` (a str, bytes or int) never share pages."""
        self._check_open()
        return Sequence(self, extra_keys({"salt": cache_salt}))

    def generate(self, token_ids_or_text, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stream: bool = False, cache_salt=None,
                 details: bool = False):
        """Continue a prompt. Text in -> text out; ids in -> list of new ids.

        Stops after max_new_tokens, at the config's EOS (which is included), or when the KV
        budget has no room for the next token (what was made is kept). `stream=True` returns
        a `Generation` (an iterator of text pieces or ids that says why it stopped);
        `details=True` a `GenerateResult(output, stop_reason, tokens)` instead of the output.
        temperature < sampling.MIN_TEMPERATURE (about 1.2e-38; 0 included) is greedy.
        The prompt's cached prefix is reused (see docs/internals.md, "KV cache"); prompts
        with different `cache_salt` never share cached pages.
        """
        self._check_open()
        as_text = isinstance(token_ids_or_text, str)
        ids = self._ids(token_ids_or_text)
        check_sampling(max_new_tokens, temperature, top_p)
        limit = self.reader.config.get("max_position_embeddings")
        if limit and len(ids) + max_new_tokens > int(limit):
            raise InputMismatch(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                                f"is past the model's max_position_embeddings ({limit})")
        extra = extra_keys({"salt": cache_salt})
        progress = _Progress()
        made = self._generate_ids(ids, max_new_tokens, temperature, top_p, seed, extra, progress)
        gen = Generation(made, self._text_pieces(made) if as_text else made, progress)
        if stream:
            return gen
        out = list(gen)
        output = "".join(out) if as_text else out
        return GenerateResult(output, gen.stop_reason, gen.tokens) if details else output

    def _generate_ids(self, ids, max_new, temperature, top_p, seed, extra,
                      progress: _Progress) -> Iterator[int]:
        gen = torch.Generator().manual_seed(seed)
        with Sequence(self, extra) as s:
            logits = s.feed(ids)
            for i in range(max_new):
                tok = sample(torch.from_numpy(logits), temperature, top_p, gen)
                progress.tokens += 1
                # NOTE: the reason is set before the last token leaves, so a caller that
                # closes right after it sees how the generation ended, not "cancelled"
                if tok in self.cfg.eos_token_ids:
                    progress.stop_reason = "eos"
                elif i == max_new - 1:
                    progress.stop_reason = "length"
                yield tok
                if progress.stop_reason is not None:
                    break
                try:
                    logits = s.feed([tok])
                except BudgetExceeded as e:   # NOTE: keep what was made; say why it stopped
                    progress.stop_reason = "kv_budget"
                    log.warning("generation stopped after %d tokens: no KV memory for the "
                                "next one (%s)", i + 1, e)
                    break

    def _text_pieces(self, ids: Iterator[int]) -> Iterator[str]:
        st = self.tokenizer.stream()
        for t in ids:
            piece = st.push(t)
            if piece:
                yield piece
        tail = st.flush()
        if tail:
            yield tail

    def _ids(self, x) -> list[int]:
        if isinstance(x, str):
            if self.tokenizer is None:
                raise EdgertError("this pack has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(x)
        else:
            arr = np.asarray(x)
            if isinstance(x, (bytes, bytearray)) or arr.dtype.kind not in "iu" and arr.size:
                raise InputMismatch(f"prompt of type {type(x).__name__}: pass text (a str; "
                                    f"decode bytes first) or token ids (a list of ints)")
            ids = [int(t) for t in arr.reshape(-1)]
        if not ids:
            raise InputMismatch("empty prompt")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InputMismatch(f"token ids out of range [0, {self.cfg.vocab_size}): {bad[:5]}")
        return ids

    def stats(self) -> dict:
        with self._lock:
            self._check_open()
            c = dict(self.counters)
            return {"name": self.name, "kind": self.kind, "device": str(self.device),
                    "experts": self.provider.stats(), "kv": self.kv.stats(),
                    "weights_bytes": self._weight_bytes, **c, "memory": self.memory(),
                    "compile": dict(self._compile_info) or
                    getattr(self._expert_terms, "stats", lambda: None)(),
                    "decode_tokens_per_s": c["decode_tokens"] / c["decode_s"]
                    if c["decode_s"] else 0.0}

    def close(self) -> None:
        """Give the arena back: KV pages, expert slots, the weights; stop the prefetch worker;
        close the pack. Idempotent; waits for a forward step in flight."""
        with self._lock:
            super().close()
            self._gpu_views.clear()
            self._graph = None          # its views of the arena go with the weights
            self.w = {}


class Sequence:
    """One sequence in the model's paged KV cache; `feed` runs tokens after what it holds.

        with lm.sequence() as s:
            last = s.feed(prompt_ids)          # logits [vocab] of the last prompt token
            nxt = s.feed([token])              # one decode step

    Its KV pages go back to the pool on `close` (or leaving the `with`).
    """

    def __init__(self, lm: MoeLM, extra: tuple = (), seq=None):
        self.lm = lm
        self._seq = seq if seq is not None else lm.kv.new_sequence(extra)
        self._pages = lm.pages

    @property
    def length(self) -> int:
        return self._seq.length

    def fork(self) -> "Sequence":
        """A second sequence that shares every page of this one (a partial last page is
        copied by whichever of the two writes into it first)."""
        lm = self.lm
        with lm._lock:
            lm._check_open()
            if self._seq is None:
                raise EdgertError("this sequence is closed")
            return Sequence(lm, seq=lm.kv.fork(self._seq))

    def feed(self, token_ids, all_logits: bool = False) -> np.ndarray:
        """Logits (float32) of the last token [vocab], or of every token fed [T, vocab]."""
        lm = self.lm
        ids = lm._ids(token_ids)
        with lm._lock:          # one forward step at a time per model
            lm._check_open()
            if self._seq is None:
                raise EdgertError("this sequence is closed")
            t0 = time.perf_counter()
            out = lm._step(self._seq, ids, all_logits)
            out = out.float().cpu().numpy()
            key = "decode" if len(ids) == 1 and self._seq.length > 1 else "prefill"
            lm.counters[key + "_tokens"] += len(ids)
            lm.counters[key + "_s"] += time.perf_counter() - t0
        return out if all_logits else out[0]

    def close(self) -> None:
        """Give the sequence's KV pages back (nothing to do once its model is closed)."""
        seq, self._seq = self._seq, None
        if seq is not None and not self.lm.closed:
            with self.lm._lock:
                if not self.lm.closed:
                    self.lm.kv.release(seq)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
