"""What one MoE load may ask for, checked before it takes anything: the expert budget, the
lossy and precision options, the device (kinds/moe.py's `MoeLM`)."""
from __future__ import annotations

import logging

import torch

from edgert.errors import ConfigError
from edgert.experts.api import lowbit_copy
from edgert.experts.mixed import DEFAULT_PRECISION_ALPHA
from edgert.experts.policies import PolicyName
from edgert.pack.lowbit import PRECISIONS
from edgert.pack.quant import QuantOptionError

log = logging.getLogger(__name__)


def pick_device(rt) -> torch.device:
    """cuda when the config asks for it and the arena is mapped for the GPU; else cpu."""
    if rt.config.device != "cuda":
        return torch.device("cpu")
    if not rt.arena.gpu_mapped:
        log.warning("config %s asks for device cuda, but the arena is not mapped for the GPU "
                    "(see the arena's warning); the MoE model computes on the CPU",
                    rt.config.name)
        return torch.device("cpu")
    return torch.device("cuda")


def check_precision(reader, precision: str | None) -> str:
    """The precision a load computes experts at; QuantOptionError naming the option when the
    pack holds no copy for it (checked before anything is taken)."""
    lb = reader.manifest.lowbit
    if precision is None:
        precision = lb.precision if lb is not None else "exact"
    if precision not in PRECISIONS:
        raise QuantOptionError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "mixed":
        lowbit_copy(reader, "int4", "mixed")   # mixed computes the low band from int4 copies
    elif precision != "exact":
        lowbit_copy(reader, precision)
    return precision


def check_mixed(precision: str, alpha, lossy_alpha) -> float:
    """precision_alpha for the load (0 unless mixed); QuantOptionError naming the option."""
    if precision != "mixed":
        if alpha is not None:
            raise QuantOptionError(f"precision_alpha={alpha!r} applies to precision='mixed' "
                                   f"only (this load computes at {precision})")
        return 0.0
    if lossy_alpha:
        raise QuantOptionError("lossy_alpha with precision='mixed': mixed precision computes "
                               "every selected expert and never substitutes")
    if alpha is None:
        return DEFAULT_PRECISION_ALPHA
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise QuantOptionError(f"precision_alpha must be a number >= 0, got {alpha!r}")
    return float(alpha)


SMALLEST_SLOT = 4096   # an expert slot is whole 4 KiB pages: a smaller int is not bytes


def check_options(expert_budget, lossy_alpha, policy) -> None:
    """Refuse bad options before a load takes anything."""
    if expert_budget is not None and (isinstance(expert_budget, bool) or not isinstance(
            expert_budget, (int, float)) or not expert_budget > 0
            or (isinstance(expert_budget, float) and expert_budget > 1.0)
            or (isinstance(expert_budget, int) and expert_budget < SMALLEST_SLOT)):
        raise ConfigError(f"expert_budget={expert_budget!r}: give a fraction of the experts "
                          f"(a float in (0, 1], e.g. 0.5) or a byte count of at least one "
                          f"expert slot (an int >= {SMALLEST_SLOT}, e.g. 512 << 20)")
    if not isinstance(lossy_alpha, (int, float)) or not lossy_alpha >= 0:
        raise ConfigError(f"lossy_alpha must be >= 0, got {lossy_alpha!r}")
    if isinstance(policy, str) and policy not in {p.value for p in PolicyName}:
        raise ConfigError(f"policy {policy!r}; choose one of "
                          f"{', '.join(p.value for p in PolicyName)}")
