"""sample(): tiny temperatures and -inf logits never end in NaN (issue 17, item 5)."""
import math

import pytest
import torch

from edgert.engines.sampling import MIN_TEMPERATURE, check_sampling, sample

NEG = float("-inf")


def logits():
    return torch.tensor([1.0, 3.5, NEG, 3.0, -2.0, NEG])     # best: 1


def test_tiny_temperatures_pick_the_maximum_never_nan():
    g = torch.Generator().manual_seed(0)
    for temperature in (1e-300, 1e-38, 1e-30, 5e-324):
        for top_p in (1.0, 0.5, 1e-12):
            got = {sample(logits(), temperature, top_p, g) for _ in range(5)}
            assert got == {1}, (temperature, top_p)


def test_tiny_temperature_on_large_logits_never_overflows():
    # (3e38 - (-3e38)) / 1e-30 overflows float32 unless the maximum is taken out first
    big = torch.tensor([-3e38, 3e38, 2.9e38])
    assert sample(big, 1e-30, 1.0, torch.Generator().manual_seed(0)) == 1


def test_floor_is_the_smallest_normal_float32():
    assert MIN_TEMPERATURE == torch.finfo(torch.float32).tiny
    check_sampling(1, 1e-300, 1e-12)                      # accepted, like any finite t >= 0


def test_no_finite_logit_is_refused_by_name():
    with pytest.raises(ValueError, match="no finite logit"):
        sample(torch.full((4,), NEG), 0.7, 1.0)
    with pytest.raises(ValueError, match="no finite logit"):
        sample(torch.tensor([math.nan, 1.0]), 0.7, 1.0)
