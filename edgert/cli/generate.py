"""`edgert generate PACK --prompt TEXT`: stream a continuation from an MoE pack."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate text with an MoE pack (streams to stdout)",
                       description="Continue a prompt with an MoE language model pack.")
    g.add_argument("pack", metavar="PACK")
    g.add_argument("--prompt", required=True, metavar="TEXT")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--expert-budget", type=_budget, default=None, metavar="FRAC|SIZE",
                   help="expert slots: a fraction of all experts in (0, 1] (0.5) or a size "
                        "with a unit (256MiB); default: the device config's memory.experts")
    g.add_argument("--lossy-alpha", type=float, default=0.0, metavar="A",
                   help="allow substituting a resident expert within the gate-score band "
                        "(lossy; 0 = exact, the default)")
    g.add_argument("--precision", choices=("exact", "int8", "int4", "mixed"), default=None,
                   help="experts at full precision (exact), from the pack's int8 or int4 "
                        "copies, or mixed (the top band full, the rest int4); default: the "
                        "pack's own (`pack hf --quant`), else exact")
    g.add_argument("--precision-alpha", type=float, default=None, metavar="A",
                   help="mixed: a selected expert scoring >= (1+A) x the first unselected one "
                        "is computed at full precision (default 1.0)")
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="compute the whole prompt: do not reuse (nor keep) cached prefixes")
    g.add_argument("--cache-salt", default=None, metavar="SALT",
                   help="share cached prefixes only with prompts given the same salt")
    g.add_argument("--config", default=None, metavar="CFG",
                   help="device config: a shipped name or a YAML path (default: cpu-dev)")
    g.add_argument("--stats", action="store_true",
                   help="print a summary of the expert cache, the prefix cache and decode "
                        "speed to stderr")
    g.add_argument("--stats-json", action="store_true",
                   help="print every figure of lm.stats() as JSON to stderr")
    g.set_defaults(func=_run_generate)


def _budget(text: str):
    """A fraction in (0, 1] or a size with a unit; a bare number above 1 is refused (it used
    to mean bytes, which nobody means)."""
    import argparse

    from ..config import parse_bytes
    from ..errors import ConfigError
    try:
        value = float(text)
    except ValueError:
        try:
            n = parse_bytes(text, "--expert-budget")
        except ConfigError:
            n = 0
        if n <= 0 or not any(c.isalpha() for c in text):
            raise argparse.ArgumentTypeError(
                f"{text!r}: give a fraction in (0, 1] (0.5) or a size with a unit (512MiB)")
        return n
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{text}: a fraction must be in (0, 1]; for a size add a unit (e.g. 512MiB)")
    return value


def _run_generate(args) -> int:
    from edgert.runtime import Runtime
    rt = Runtime(args.config)
    lm = rt.load(args.pack, expert_budget=args.expert_budget, lossy_alpha=args.lossy_alpha,
                 prefix_cache=False if args.no_prefix_cache else None,
                 precision=args.precision, precision_alpha=args.precision_alpha)
    try:
        if lm.tokenizer is None:
            print(f"edgert generate: {args.pack} carries no tokenizer; use the Python API "
                  "with token ids", file=sys.stderr)
            return 2
        with lm.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         stream=True, cache_salt=args.cache_salt) as gen:
            for piece in gen:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        if gen.stop_reason == "kv_budget":
            print(f"edgert generate: stopped early after {gen.tokens} of {args.max_new_tokens} "
                  "tokens: no KV memory for the next one (memory.kv in the device config)",
                  file=sys.stderr)
        if args.stats:
            print(summary(lm.stats()), file=sys.stderr)
        if args.stats_json:
            print(json.dumps(lm.stats(), indent=1, default=str), file=sys.stderr)
    finally:
        lm.close()
    return 0


def summary(st: dict) -> str:
    """A few lines of lm.stats() for people."""
    ex = st["experts"]
    tot = ex.get("total", ex)
    lines = [f"device {st['device']}; prefill {st['prefill_tokens']} tokens, decode "
             f"{st['decode_tokens']} tokens at {st['decode_tokens_per_s']:.1f} tok/s"]
    if ex.get("provider") == "expert-cache":
        lines.append(
            f"expert cache: {ex['slots']} slots of {ex['slot_bytes'] / 1e6:.2f} MB, policy "
            f"{ex['policy']}, prefetch {'on' if ex['prefetch'] else 'off'}, lossy alpha "
            f"{ex['lossy_alpha']}, reads {ex['read_mode']}")
        lines.append(
            f"  exact hit rate {tot['exact_hit_rate']:.3f}, effective {tot['effective_hit_rate']:.3f}"
            f"; {tot['loads'] + tot['ahead_loads'] + tot['prefetch_loads']} reads, {tot['bytes_read'] / 1e6:.1f} MB read, "
            f"{1e3 * tot['stall_s']:.1f} ms stalled on loads")
    elif ex.get("provider") == "mixed":
        lines.append(
            f"mixed precision (alpha {ex['precision_alpha']}): "
            f"{100 * (ex['low_precision_share'] or 0):.1f}% of expert computations at int4; "
            + "; ".join(f"{p}: {ex[p]['slots']} slots of {ex[p]['slot_bytes'] / 1e6:.2f} MB, "
                        f"hit rate {ex[p]['total']['exact_hit_rate'] or 0:.3f}, "
                        f"{ex[p]['total']['bytes_read'] / 1e6:.1f} MB read" for p in ("exact", "int4")))
    else:
        lines.append(f"experts: {ex.get('provider')}, {ex.get('experts', '?')} resident")
    px = st["kv"].get("prefix", {})
    if px.get("enabled"):
        tiers = px["tiers"]
        lines.append(
            f"prefix cache: {px['lookups']} lookups, {px['hit_tokens']} tokens reused, "
            f"{px['computed_tokens']} computed; "
            + ", ".join(f"{t} {tiers[t]['hit_tokens']} hit / {tiers[t]['bytes_read'] / 1e6:.1f} MB "
                        f"read / {tiers[t]['bytes_written'] / 1e6:.1f} MB written"
                        for t in ("arena", "host", "disk")))
    else:
        lines.append("prefix cache: off")
    return "\n".join(lines)
