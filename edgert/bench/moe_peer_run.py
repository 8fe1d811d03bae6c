"""One side of `edgert bench moe --peer llama.cpp`, in a process of its own (so its peak
memory is its own): load, prefill the prompt, decode greedily, print one JSON line.

    python -m edgert.bench.moe_peer_run '{"side": "llama" | "edgert", ...}'

Threads as edgert's device config has them: ``threads`` for a prompt, ``decode_threads`` for
a decode step (llama.cpp's ``n_threads_batch`` and ``n_threads``). Both sides do the same
work per token: one forward step of one token, then the argmax of
its logits. Figures: load seconds, time to first token (prefill + first argmax), decode
tok/s over the remaining tokens, the process's resident memory after its imports (torch,
llama_cpp) and before loading, and its peak (VmHWM: anonymous and file-mapped pages, so
llama.cpp's mapped model counts), the tokens. With ``cgroup`` (a memory cgroup directory
made by the parent) the process joins it at that same point, so the cgroup's limit bounds
what loading and decoding add (the model file's page cache included), not the interpreter
and libraries that were already resident, and ``peak_rss - rss_before`` measures the same
span. edgert also reports ``budgeted_peak``: the peak of what its budget governs (arena:
dense weights, expert slots, KV pages; plus the engine memory it charged).
"""
from __future__ import annotations

import json
import os
import sys
import time


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _enter(cgroup: str | None) -> int:
    """Join ``cgroup`` (if any); the resident memory just before: the run's baseline."""
    base = _status("VmRSS")
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    return base


def _llama(a: dict):
    """(baseline RSS, load s, step function) for llama.cpp through llama-cpp-python."""
    import numpy as np
    from llama_cpp import Llama
    _drop_cache(a["path"])
    base = _enter(a.get("cgroup"))
    t = time.perf_counter()
    llm = Llama(model_path=a["path"], n_ctx=a["n_ctx"], n_batch=a["n_ctx"],
                n_threads=a["decode_threads"], n_threads_batch=a["threads"], use_mmap=True,
                verbose=False)
    load = time.perf_counter() - t

    n_vocab = llm.n_vocab()

    def step(ids):
        llm.eval(ids)    # NOTE: without logits_all the wrapper keeps no scores: read the C buffer
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1),
                                                   shape=(n_vocab,))))
    return base, load, step


def _edgert(a: dict):
    """(baseline RSS, load s, step function) for edgert: precision and expert budget as asked."""
    import torch

    from edgert import Runtime
    from edgert.config import resolve
    cfg = resolve(a.get("config"))
    torch.set_num_threads(a["threads"])
    rt = Runtime(cfg)
    _drop_cache(a["path"])
    base = _enter(a.get("cgroup"))
    t = time.perf_counter()
    lm = rt.load(a["path"], precision=a["precision"], expert_budget=a["budget"],
                 prefix_cache=False)
    load = time.perf_counter() - t
    seq = lm.sequence().__enter__()

    def step(ids):
        return int(torch.as_tensor(seq.feed(ids)).argmax())
    step.keep = (rt, lm, seq)            # alive until the process ends
    step.budgeted = lambda: rt.arena.stats()["peak_bytes"] + \
        rt.arena.stats()["engine"]["peak"]
    return base, load, step


def run(a: dict) -> dict:
    base, load, step = (_llama if a["side"] == "llama" else _edgert)(a)
    t = time.perf_counter()
    tok = step(list(a["prompt"]))
    ttft = time.perf_counter() - t
    out, times = [tok], []
    for _ in range(a["tokens"] - 1):
        t = time.perf_counter()
        tok = step([tok])
        times.append(time.perf_counter() - t)
        out.append(tok)
    budgeted = getattr(step, "budgeted", None)
    return {"load_s": load, "ttft_s": ttft, "tok_s": len(times) / sum(times) if times else None,
            "step_ms_p50": 1e3 * sorted(times)[len(times) // 2] if times else None,
            "rss_before": base, "peak_rss": _status("VmHWM"), "tokens": out,
            "budgeted_peak": budgeted() if budgeted else None}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
