"""The EMA of the trained weights: the update rule, and its checkpoint file (safetensors; older .pt files load)."""

import os

import pytest
import torch
from torch import nn

from refiner_rl.trainers.ema import EMA, EMA_FILE, ema_state_path, load_ema_state, save_ema_state


def _module(value: float) -> nn.Module:
    m = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_update_follows_the_rule():
    m = _module(1.0)
    ema = EMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update(m)  # 0.9 * 1 + 0.1 * 3
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.2))
    with ema.applied(m):
        assert torch.allclose(m.weight, torch.full((1, 2), 1.2))
    assert torch.equal(m.weight, torch.full((1, 2), 3.0))


def test_state_file_round_trip(tmp_path):
    ema = EMA(_module(0.5), decay=0.99)
    assert ema_state_path(str(tmp_path)) is None
    save_ema_state(ema, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [EMA_FILE]  # no temporary file left behind
    other = EMA(_module(0.0), decay=0.99)
    load_ema_state(other, ema_state_path(str(tmp_path)))
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])

    with pytest.raises(ValueError, match="lacks 1 parameters"):
        other.load_state_dict({})
