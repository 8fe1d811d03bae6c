"""`edgert pack onnx|hf`, `edgert verify`, `edgert inspect`."""
from __future__ import annotations

import json
import os
import sys

from ..errors import PackCorrupt
from .arguments import named
from ..pack.format import DEFAULT_BLOCK_SIZE


def register(sub) -> None:
    p = sub.add_parser("pack", help="build a pack file from task models or an MoE checkpoint")
    psub = p.add_subparsers(dest="pack_kind", required=True)
    o = psub.add_parser("onnx", help="pack fine-tuned ONNX variants of one backbone",
                        description="Pack task models that share one graph into one pack.")
    o.add_argument("--base", metavar="BASE.onnx", help="the shared backbone (not with --append)")
    o.add_argument("--task", action="append", required=True, metavar="NAME=FILE.onnx")
    o.add_argument("-o", "--out", metavar="OUT.edgepack")
    o.add_argument("--append", metavar="PACK", help="add or replace these tasks in PACK as its "
                   "next version (only new blocks are appended; docs/updates.md)")
    o.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="bytes per block, a multiple of 4096 (default 65536)")
    o.add_argument("--align-tol", type=float, default=0.0,
                   help="snap task blocks within this max abs difference to the base "
                        "(lossy; 0 = lossless, the default)")
    o.add_argument("--prune-blocks", type=float, metavar="FRACTION",
                   help="zero this fraction of each weight matrix's blocks, least important "
                        "first (lossy; measured on --calib inputs and recorded in the pack)")
    o.add_argument("--joint", action="store_true",
                   help="with --prune-blocks: one block order for all tasks, so they prune "
                        "the same blocks and switches move fewer bytes")
    o.add_argument("--calib", action="append", default=[], metavar="NAME=FILE.npz",
                   help="calibration inputs of a task (arrays named by model input, batch "
                        "allowed); one per task with --prune-blocks or --quant qdq")
    o.add_argument("--importance", choices=["activation", "norm"],
                   help="with --prune-blocks: how blocks are ranked; activation (default): "
                        "weights scaled by the RMS of the input features they multiply on the "
                        "task's --calib inputs; norm: the block's own RMS")
    o.add_argument("--prune-scope", choices=["tensor", "model"],
                   help="with --prune-blocks: tensor (default): every weight matrix prunes "
                        "FRACTION of its blocks; model: FRACTION of all the task's "
                        "weight-matrix blocks, ranked across matrices by each block's share "
                        "of its matrix's energy (with --joint, blocks the tasks differ in go "
                        "first)")
    o.add_argument("--max-error", type=float, metavar="E",
                   help="with --prune-blocks: lower a task's fraction until its relative "
                        "output error |y - y_dense| / |y_dense| is at most E")
    o.add_argument("--quant", metavar="int8|qdq|int4",
                   help="quantize the base and every task with ONNX Runtime's quantizer first "
                        "(lossy; each task's output error is recorded): int8 = dynamic int8, "
                        "qdq = static QDQ int8 (needs --calib per task), int4 = MatMulNBits "
                        "4-bit weights")
    o.add_argument("--group-size", type=int, metavar="N",
                   help="with --quant int4: inputs per 4-bit scale, a power of two >= 16 "
                        "(default 32)")
    o.set_defaults(func=_run_onnx)
    from .pack_hf import add_hf_parser
    add_hf_parser(psub)

    v = sub.add_parser("verify", help="check every block of a pack against its hash",
                       description="Read every block of PACK and check it against its content "
                       "hash; exit 1 naming the first bad block.")
    v.add_argument("pack", help="the .edgepack file")
    v.set_defaults(func=_run_verify)

    i = sub.add_parser("inspect", help="tasks, blocks, sharing and switch costs of a pack",
                       description="What a pack holds: a task pack's inputs and outputs, its "
                       "tasks, stored vs dense bytes and the bytes each switch moves; an MoE "
                       "pack's architecture, experts and tokenizer. Sizes in MiB.")
    i.add_argument("pack", help="the .edgepack file")
    i.add_argument("--json", action="store_true", help="machine-readable output (bytes)")
    i.set_defaults(func=_run_inspect)


def _prune_options(args):
    """PruneOptions from the pack onnx flags, None without --prune-blocks (ValueError for
    a flag that needs it)."""
    from ..pack.prune import PruneOptions
    if args.prune_blocks is None:
        for flag, given in (("--joint", args.joint),
                            ("--calib", args.calib and args.quant is None),
                            ("--max-error", args.max_error is not None),
                            ("--importance", args.importance is not None),
                            ("--prune-scope", args.prune_scope is not None)):
            if given:
                raise ValueError(f"{flag} is used only with --prune-blocks FRACTION")
        return None
    return PruneOptions(args.prune_blocks, named(args.calib, "--calib", "NAME=FILE.npz"),
                        joint=args.joint, max_error=args.max_error,
                        **({"importance": args.importance} if args.importance else {}),
                        **({"scope": args.prune_scope} if args.prune_scope else {}))


def _quant_options(args, prune):
    """OnnxQuant from --quant/--group-size (and --calib when not pruning), else None."""
    from ..pack.onnx_quant import OnnxQuant
    from ..pack.quant import QuantOptionError
    if args.quant is None:
        if args.group_size is not None:
            raise QuantOptionError("--group-size needs --quant int4")
        return None
    calib = {} if prune is not None else named(args.calib, "--calib", "NAME=FILE.npz")
    return OnnxQuant(args.quant, args.group_size, calib)


def _run_onnx(args) -> int:
    from ..pack.onnx_import import pack_onnx
    from ..pack.prune import describe, pruning_summary
    if args.append is not None:
        return _append_onnx(args)
    if args.base is None or args.out is None:
        raise ValueError("--base BASE.onnx and -o OUT.edgepack are needed (or --append PACK)")
    prune = _prune_options(args)
    quant = _quant_options(args, prune)
    rep = pack_onnx(args.base, named(args.task, "--task", "NAME=FILE.onnx"), args.out,
                    block_size=args.block_size, align_tol=args.align_tol, prune=prune,
                    quant=quant)
    print(f"wrote {args.out}: {len(rep.tasks)} tasks, {rep.blocks_stored} distinct blocks")
    for t in rep.tasks:
        line = f"  {t.name}: {t.blocks} blocks"
        if args.align_tol > 0:
            line += (f", {t.snapped} snapped to the base (tol {args.align_tol:g}), "
                     f"max output error {t.max_output_error:.3g} on {t.outputs_checked} "
                     f"random inputs")
        print(line)
    if prune is not None or quant is not None:
        from ..pack.onnx_quant import describe as describe_quant
        from ..pack.reader import PackReader
        with PackReader(args.out) as r:
            lines = describe(pruning_summary(r)) if prune is not None else \
                describe_quant(r.config["quant"])
        print("\n".join(lines))
    return 0


def _append_onnx(args) -> int:
    from ..update.append import append_onnx
    for flag, given in (("--base", args.base), ("-o", args.out),
                        ("--align-tol", args.align_tol), ("--prune-blocks", args.prune_blocks)):
        if given:
            raise ValueError(f"{flag} does not go with --append (the pack keeps its base)")
    bad = _open_error(args.append)
    if bad:
        raise ValueError(bad)
    s = append_onnx(args.append, named(args.task, "--task", "NAME=FILE.onnx"))
    print(f"appended to {args.append}: version {s['generation']}, tasks "
          f"{', '.join(s['tasks'])}, {s['blocks_added']} new blocks "
          f"({s['bytes_added'] / 2**20:.2f} MiB)")
    return 0


def _open_error(path: str) -> str | None:
    """One line for a path that is not a pack file at all, else None."""
    if os.path.isdir(path):
        return f"{path}: is a directory, not a pack file"
    if not os.path.exists(path):
        return f"{path}: no such file"
    return None


def _read_pack(path: str, fn):
    """``fn(reader)`` on the pack at ``path``: (its result, 0), or (None, 1) after one FAIL
    line on stderr when the file is not a readable pack."""
    from ..pack.reader import PackReader
    bad = _open_error(path)
    if bad:
        print(f"FAIL {bad}", file=sys.stderr)
        return None, 1
    try:
        with PackReader(path) as r:
            return fn(r), 0
    except (PackCorrupt, OSError) as e:
        print(f"FAIL {path}: {e}", file=sys.stderr)
        return None, 1


def _run_verify(args) -> int:
    got, rc = _read_pack(args.pack, lambda r: (r.verify(), len(r.blocks),
                                               sum(b.zero for b in r.blocks)))
    if rc:
        return rc
    problems, n, zero = got
    if problems:
        print(f"FAIL {args.pack}: {len(problems)} problem(s); first: {problems[0]}",
              file=sys.stderr)
        return 1
    # zero blocks hold no bytes: their entries were checked when the manifest was opened
    print(f"OK {args.pack}: {n - zero} blocks verified"
          + (f", {zero} zero blocks (no data; entries checked)" if zero else ""))
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _run_inspect(args) -> int:
    from ..pack.prune import describe, pruning_summary
    from ..pack.stats import summary
    s, rc = _read_pack(args.pack, lambda r: {**summary(r), "pruning": pruning_summary(r),
                                             "quant": r.config.get("quant")})
    if rc:
        return rc
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['path']}: kind {s['kind']}, generation {s['generation']}, "
          f"block size {s['block_size']} B")
    dense = "" if "moe" in s else \
        f"dense (every task on its own): {_mib(s['bytes_dense'])}   "
    print(f"  blocks: {s['blocks']}   stored: {_mib(s['bytes_stored'])}   {dense}"
          f"file: {_mib(s['bytes_file'])}")
    z = s["zero_blocks"]
    if z["count"]:
        print(f"  zero blocks: {z['count']} block positions, {_mib(z['bytes'])} "
              f"(not stored, memset on load)")
    for kind in ("inputs", "outputs"):
        for name, v in s.get(kind, {}).items():
            print(f"  {kind[:-1]} {name}: {v['dtype']}[{', '.join(map(str, v['shape']))}]")
    if "moe" in s:
        m = s["moe"]
        print(f"  model: {', '.join(m['architectures'] or ['?'])}, {m['layers']} layers, hidden "
              f"{m['hidden_size']}, vocab {m['vocab_size']}, tokenizer "
              f"{'in the pack' if m['tokenizer'] else 'none (pass token ids)'}")
        if "experts" in m:
            print(f"  experts: {m['experts_per_layer']} per layer in {m['moe_layers']} layers, "
                  f"top-{m['top_k']}; {m['experts']} experts of {_mib(m['expert_bytes'])} "
                  f"({m['expert_dtype']}), {_mib(m['experts_bytes'])} in all")
        if "lowbit" in m:
            from ..pack.lowbit_stats import describe_lowbit
            print("  " + "\n  ".join(describe_lowbit(m["lowbit"])))
        for t in s["tasks"]:
            print(f"  dense (non-expert) weights: {_mib(s['task_bytes'][t])}")
        return 0
    for t in s["tasks"]:
        print(f"  task {t}: {_mib(s['task_bytes'][t])} dense")
    if s["pruning"]:
        print("  " + "\n  ".join(describe(s["pruning"])))
    if s.get("quant"):
        from ..pack.onnx_quant import describe as describe_quant
        print("  " + "\n  ".join(describe_quant(s["quant"])))
    tasks = s["tasks"]
    if len(tasks) > 1:
        w = max(len(t) for t in tasks) + 2
        tables = [("switch_bytes", "bytes a switch reads from storage (row -> column), MiB:")]
        if any(s["switch_zero_bytes"].values()):
            tables.append(("switch_zero_bytes", "bytes a switch memsets (zero blocks), MiB:"))
        for key, title in tables:
            print("  " + title)
            print("  " + " " * w + "".join(f"{t:>{w}}" for t in tasks))
            for a in tasks:
                row = "".join(f"{'-':>{w}}" if a == b else
                              f"{s[key][f'{a}->{b}'] / 2**20:>{w}.2f}" for b in tasks)
                print(f"  {a:<{w}}{row}")
        print("  bytes shared by each pair, MiB:")
        for pair, n in s["shared_bytes"].items():
            print(f"    {pair}: {n / 2**20:.2f}")
    return 0
