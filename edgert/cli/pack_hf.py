"""`edgert pack hf MODEL_DIR -o OUT.edgepack` (wired by edgert.cli.pack)."""
from __future__ import annotations

from ..pack.format import DEFAULT_BLOCK_SIZE


def add_hf_parser(pack_subparsers) -> None:
    p = pack_subparsers.add_parser(
        "hf", help="pack a Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
             "PhiMoE)",
        description="Pack a Hugging Face checkpoint directory (config.json, safetensors "
                    "shards, tokenizer.json) into one .edgepack with one extent per expert. "
                    "Experts may be stored per expert (hub layout) or fused (transformers' "
                    "save_original_format=False). A tensor the engine would not use, or a "
                    "missing one, is refused by name.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("-o", "--out", metavar="OUT.edgepack")
    p.add_argument("--append", metavar="PACK", help="a retrained checkpoint of PACK's "
                   "architecture as PACK's next version (only blocks that differ are appended)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="bytes per block of non-expert tensors (multiple of 4096)")
    p.add_argument("--quant", metavar="int8|int4|mixed",
                   help="also store a low-bit copy of every expert (weight-only): int8 per "
                        "output row, int4 per group of inputs (int4 and mixed); the name is "
                        "the pack's default precision. The 16-bit experts stay in the pack")
    p.add_argument("--group-size", type=int, metavar="N",
                   help="inputs per int4 scale and zero point: 32, 64 (default), 128 or 256")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_hf)


def _run_hf(args) -> int:
    from ..pack.hf_import import pack_hf
    if (args.out is None) == (args.append is None):
        raise ValueError("give one of -o OUT.edgepack or --append PACK")
    if args.append is not None:
        from ..update.append import append_hf
        s = append_hf(args.append, args.model_dir, progress=not args.quiet, quant=args.quant,
                      group_size=args.group_size)
        print(f"appended to {args.append}: version {s['generation']}, "
              f"{s['bytes_added'] / 2**20:.2f} MiB of new blocks")
        return 0
    s = pack_hf(args.model_dir, args.out, block_size=args.block_size, progress=not args.quiet,
                quant=args.quant, group_size=args.group_size)
    print(f"{args.out}: {s['family']}, {s['experts']} experts "
          f"({s['expert_bytes'] / 2**20:.1f} MiB), {s['tensors']} other tensors "
          f"({s['tensor_bytes'] / 2**20:.1f} MiB)")
    if "lowbit" in s:
        print(f"  {s['lowbit']} copies: {s['lowbit_bytes'] / 2**20:.1f} MiB, worst relative "
              f"L2 error {s['lowbit_rel_l2_max']:.4f}")
    return 0
