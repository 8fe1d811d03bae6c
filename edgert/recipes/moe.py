"""Train the demo MoE language model: a small Mixtral on the Python standard library's sources.

    python -m edgert.recipes.moe --out models/out/moe            # ~5 minutes on 2 idle cores, ~13 on busy ones
    python -m edgert.recipes.moe --out models/out/moe-tiny --quick   # seconds; for tests and CI
    python -m edgert.recipes.moe --shape fine --out models/out/moe-fine   # the benchmark model
    python -m edgert.recipes.moe --shape fine --quick --out models/out/moe-fine-tiny

Why: random weights route almost uniformly, which says nothing about an expert cache. A model
trained on real text (here Python source, found offline on any machine with Python) routes
with the skew and temporal locality that caching exploits.

Outputs (under --out, git-ignored): a Hugging Face checkpoint written by `save_pretrained`
(config.json + model.safetensors in the hub layout `...experts.N.w1/w2/w3`), a byte-level
`tokenizer.json`, `heldout.txt` (files never used for training) and `train_log.json`.

Byte convention: token id == byte value (vocab 256), no special tokens; text is UTF-8 bytes.
`tokenizer.json` encodes exactly that (GPT-2 byte-to-unicode alphabet, no merges).

Deterministic: sorted file list, held-out split by a hash of the relative path, fixed seeds,
fixed step count, `torch.set_num_threads(2)`. (The wall-clock guard `--max-minutes` only
cuts training short when a machine is far slower than expected; the log records it.)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
             "lib2to3", "ensurepip", "turtledemo"}
HELDOUT_EVERY = 20          # 1 file in 20 (by path hash) is held out
HELDOUT_MAX_BYTES = 256 * 1024
MAX_FILE_BYTES = 256 * 1024  # very large generated files (e.g. unicode tables) teach little


@dataclass(frozen=True)
class Recipe:
    layers: int = 8
    experts: int = 16
    top_k: int = 2
    hidden: int = 128
    ffn: int = 256
    heads: int = 4
    kv_heads: int = 2
    seq: int = 256
    batch: int = 8
    steps: int = 700
    lr: float = 2e-3
    warmup: int = 50
    aux_coef: float = 0.01   # Mixtral's load-balancing loss: skewed routing, never collapsed
    seed: int = 0
    corpus_limit: int = 24 * 1024 * 1024

    @classmethod
    def from_name(cls, name: str) -> "Recipe":
        presets = {
            "full": cls(),
            "quick": cls(layers=2, experts=8, top_k=2, hidden=32, ffn=64, heads=2, kv_heads=1,
                         seq=64, batch=4, steps=30, warmup=5, corpus_limit=512 * 1024),
            # The deployed shape family (OLMoE: 64 experts per layer, top-8): many small
            # experts, the same active FFN width per token as "full" (8 x 64 = 2 x 256).
            "fine": cls(layers=8, experts=64, top_k=8, hidden=128, ffn=64, steps=600),
            "fine-quick": cls(layers=4, experts=16, top_k=8, hidden=32, ffn=16, heads=2,
                              kv_heads=1, seq=64, batch=4, steps=30, warmup=5,
                              corpus_limit=512 * 1024),
        }
        return presets[name]


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative posix path, path) of the standard library's .py files, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        out.append((rel.as_posix(), p))
    out.sort(key=lambda t: t[0])
    return out


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % HELDOUT_EVERY == 0


def build_corpus(limit: int) -> tuple[bytes, bytes, dict]:
    """Training bytes (up to `limit`), held-out bytes, and a summary of which files went where."""
    train, held, n_train, n_held = [], [], 0, 0
    size_train = size_held = 0
    for rel, path in stdlib_files():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if not data or len(data) > MAX_FILE_BYTES:
            continue
        chunk = b"# file: " + rel.encode() + b"\n" + data + b"\n"
        if is_heldout(rel):
            if size_held < HELDOUT_MAX_BYTES:
                held.append(chunk)
                size_held += len(chunk)
                n_held += 1
        elif size_train < limit:
            train.append(chunk)
            size_train += len(chunk)
            n_train += 1
    if not train or not held:
        raise SystemExit("no standard-library sources found to train on")
    info = {"stdlib": sysconfig.get_paths()["stdlib"], "train_files": n_train, "heldout_files": n_held,
            "train_bytes": size_train, "heldout_bytes": size_held}
    return b"".join(train), b"".join(held)[:HELDOUT_MAX_BYTES], info


def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: printable bytes map to themselves, others to U+0100 and up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def save_tokenizer(out: Path) -> bool:
    """Write a byte-level tokenizer.json whose ids are byte values. False when `tokenizers` is absent."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return False
    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    probe = "def f(x):\n\treturn x  # é\u2603"
    assert tok.encode(probe).ids == list(probe.encode()), "tokenizer ids must equal UTF-8 bytes"
    tok.save(str(out / "tokenizer.json"))
    return True


def make_model(r: Recipe):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=256, hidden_size=r.hidden, intermediate_size=r.ffn, num_hidden_layers=r.layers,
        num_attention_heads=r.heads, num_key_value_heads=r.kv_heads, num_local_experts=r.experts,
        num_experts_per_tok=r.top_k, max_position_embeddings=max(1024, 4 * r.seq),
        output_router_logits=True, router_aux_loss_coef=r.aux_coef, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, rope_theta=10000.0)
    try:  # grouped_mm is ~1.5x faster to train on CPU; the saved checkpoint is the same layout
        return MixtralForCausalLM._from_config(cfg, experts_implementation="grouped_mm")
    except (TypeError, ValueError):
        return MixtralForCausalLM(cfg)


def batches(data: np.ndarray, r: Recipe, gen: np.random.Generator):
    while True:
        starts = gen.integers(0, len(data) - r.seq - 1, size=r.batch)
        yield torch.from_numpy(np.stack([data[s:s + r.seq] for s in starts]).astype(np.int64))


@torch.no_grad()
def heldout_loss(model, held: np.ndarray, seq: int, windows: int = 16) -> float:
    model.eval()
    step = max(seq, (len(held) - seq - 1) // windows)
    losses = []
    for s in range(0, len(held) - seq - 1, step)[:windows]:
        x = torch.from_numpy(held[s:s + seq].astype(np.int64))[None]
        losses.append(float(model(x, labels=x, output_router_logits=False).loss))
    model.train()
    return float(np.mean(losses))


def train(out: Path, r: Recipe, max_minutes: float) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(r.seed)
    out.mkdir(parents=True, exist_ok=True)
    train_bytes, held_bytes, info = build_corpus(r.corpus_limit)
    data = np.frombuffer(train_bytes, dtype=np.uint8)
    held = np.frombuffer(held_bytes, dtype=np.uint8)
    model = make_model(r)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / r.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(1.0, s / r.steps))))
    gen = np.random.default_rng(r.seed)
    t0, log, steps_done = time.perf_counter(), [], 0
    for step, x in zip(range(r.steps), batches(data, r, gen)):
        outp = model(x, labels=x)
        outp.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        steps_done = step + 1
        if step % 50 == 0 or steps_done == r.steps:
            aux = float(outp.aux_loss.detach())
            lm = float(outp.loss.detach()) - r.aux_coef * aux
            log.append({"step": step, "lm_loss": lm, "aux_loss": aux, "elapsed_s": time.perf_counter() - t0})
            print(f"step {step:5d}/{r.steps}  lm {lm:.3f}  aux {aux:.3f}  "
                  f"{time.perf_counter() - t0:6.0f}s", flush=True)
        if time.perf_counter() - t0 > max_minutes * 60:
            print(f"stopping at step {steps_done}: over {max_minutes} minutes", flush=True)
            break
    model.config.output_router_logits = False
    model.save_pretrained(out)
    (out / "heldout.txt").write_bytes(held_bytes)
    summary = {"recipe": asdict(r), "corpus": info, "steps_done": steps_done,
               "train_seconds": time.perf_counter() - t0,
               "heldout_loss_nats_per_byte": heldout_loss(model, held, r.seq),
               "tokenizer_json": save_tokenizer(out), "log": log}
    (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    print(f"saved {out}: held-out loss {summary['heldout_loss_nats_per_byte']:.3f} nats/byte", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m edgert.recipes.moe", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("models/out/moe"))
    ap.add_argument("--quick", action="store_true", help="tiny model, seconds (tests, CI)")
    ap.add_argument("--shape", choices=("coarse", "fine"), default="coarse",
                    help="coarse: 16 experts/layer, top-2 (the first demo model); fine: 64 "
                         "experts/layer, top-8 (OLMoE's shape family, the benchmark model)")
    ap.add_argument("--steps", type=int, help="override the preset's step count")
    ap.add_argument("--max-minutes", type=float, default=15.0)
    a = ap.parse_args(argv)
    names = {("coarse", False): "full", ("coarse", True): "quick",
             ("fine", False): "fine", ("fine", True): "fine-quick"}
    r = Recipe.from_name(names[(a.shape, a.quick)])
    if a.steps:
        r = Recipe(**{**asdict(r), "steps": a.steps})
    train(a.out, r, a.max_minutes)


if __name__ == "__main__":
    main()
