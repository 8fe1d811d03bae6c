"""How many threads an engine computes with: the device config's ``threads`` (the cores
edgert may use) for large steps, ``decode_threads`` for small ones.

NOTE: a thread that waits at a barrier for a core another process holds turns a fair
share (at most N/cores slower) into many times slower. Measured here (2 cores, torch
2.13 with OpenMP, MoE FFN of hidden 128): one-token steps on 2 threads ran 5.6 -> 11 us
per layer alone (thread wake-up costs more than the work) and 6 us -> 630 us beside one
busy process (`edgert bench contention`); on 1 thread 5.6 and 6.1 us. A step of 256
tokens gains from 2 threads alone (198 -> 131 us)."""
from __future__ import annotations

# A step whose activations hold fewer elements than this (tokens x hidden) is small: a
# decode step or a short prompt. 8192 = 64 tokens at hidden 128, where 2 threads stopped
# gaining alone on this machine; a device that gains from more (a wide model on idle
# cores) says so with `decode_threads`.
SMALL_STEP = 8192


def torch_threads(tokens: int, hidden: int, threads: int, decode_threads: int) -> int:
    """Threads for a torch step of ``tokens`` tokens of width ``hidden``."""
    return min(threads, decode_threads) if tokens * hidden < SMALL_STEP else threads


def use_torch_threads(tokens: int, hidden: int, config) -> None:
    """Set torch's (process-wide) intra-op thread count for the coming step; a no-op when it
    is already right, so a run of decode steps pays nothing."""
    import torch
    n = torch_threads(tokens, hidden, config.threads, config.decode_threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
