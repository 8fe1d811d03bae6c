"""Decode speed of a toy Mixtral on `device: cpu` and `device: cuda`, same pack, same budget.

    python tools/moe_device_speed.py        # needs transformers (test extra) and, for cuda, a GPU

Builds a random 4-layer, 8-expert checkpoint with transformers (as the tests do), packs it,
and generates 64 tokens greedily on each device with 25% of the experts in memory. A model
this small measures launch and sync overhead, not arithmetic: it checks the path, it does
not predict a real model's speed.
"""
from __future__ import annotations

import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import edgert  # noqa: E402
from edgert.pack.hf_import import pack_hf  # noqa: E402
from moe_models import mixtral_config, prompt, save  # noqa: E402
from test_moe_device import config  # noqa: E402


def main() -> int:
    d = save(mixtral_config(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                            num_local_experts=8, num_experts_per_tok=2),
             pathlib.Path(tempfile.mkdtemp()) / "ckpt")
    pack = d.parent / "toy.edgepack"
    pack_hf(d, pack, progress=False)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        with edgert.Runtime(config(dev)) as rt:
            lm = rt.load(pack, expert_budget=0.25)
            lm.generate(prompt(8), max_new_tokens=8)                 # warm-up
            t = time.perf_counter()
            n = len(lm.generate(prompt(8), max_new_tokens=64))
            dt = time.perf_counter() - t
            hit = lm.stats()["experts"]["total"]["exact_hit_rate"]
            print(f"config device {dev}: computes on {lm.device}, {n} tokens, "
                  f"{n / dt:.1f} tok/s, exact hit rate {hit:.3f}")
            lm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
