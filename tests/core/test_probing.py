"""cam_plugin.probing: a probe leaves modes, autograd and every RNG as they were (also on
error); probe inputs are deterministic and follow the model's device and dtype."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import TinyCNN
from torch import nn

from cam_plugin.probing import first_tensor, model_device_dtype, probe_input, rng_guard, untouched


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_untouched_restores_mixed_modes_and_rng_on_error() -> None:
    model = TinyCNN().train()
    model.features[1].eval()  # a mixed state must come back exactly
    before = _modes(model)
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="inside"), untouched(model) as m:
        assert m is model
        assert not any(_modes(model)), "the block runs in eval mode"
        assert not torch.is_grad_enabled()
        torch.randn(3)  # uses the (forked) global RNG
        raise RuntimeError("inside")
    assert _modes(model) == before
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.is_grad_enabled()


def test_untouched_leaves_running_stats_and_grads_alone() -> None:
    model = TinyCNN().train()
    bn = model.features[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
    stats = bn.running_mean.clone()
    with untouched(model):
        out = model(torch.randn(2, 3, 8, 8))
    assert not out.requires_grad
    assert torch.equal(bn.running_mean, stats)
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_untouched_options() -> None:
    model = TinyCNN().train()
    with untouched(model, eval_mode=False, grad=True):
        assert all(_modes(model)) and torch.is_grad_enabled()
    np_state, py_state = np.random.get_state(), random.getstate()
    with untouched(model, all_rngs=True):
        np.random.rand(3)
        random.random()
    assert np.array_equal(np.random.get_state()[1], np_state[1])  # type: ignore[index]
    assert random.getstate() == py_state


def test_rng_guard_restores_every_rng() -> None:
    torch_state, np_state, py_state = (
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
    )
    with pytest.raises(ValueError), rng_guard():
        torch.rand(2), np.random.rand(2), random.random()
        raise ValueError
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])  # type: ignore[index]
    assert random.getstate() == py_state


def test_probe_input_is_deterministic_and_private() -> None:
    model = TinyCNN()
    rng = torch.get_rng_state()
    a = probe_input(model, (3, 8, 6))
    b = probe_input(model, (3, 8, 6))
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG was used"
    assert a.shape == (2, 3, 8, 6) and torch.equal(a, b)
    u = probe_input(model, (3, 4, 4), batch=5, dist="uniform")
    assert u.shape == (5, 3, 4, 4) and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert probe_input(model.double(), (3, 4, 4)).dtype == torch.float64
    assert probe_input(model, (3, 4, 4), dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="positive size"):
        probe_input(model, (3, 0, 4))
    with pytest.raises(ValueError, match="batch"):
        probe_input(model, (3, 4, 4), batch=0)


def test_model_device_dtype_and_first_tensor() -> None:
    assert model_device_dtype(TinyCNN().half()) == (torch.device("cpu"), torch.float16)
    assert model_device_dtype(nn.ReLU()) == (torch.device("cpu"), torch.float32)
    counter = nn.Module()
    counter.register_buffer("steps", torch.zeros((), dtype=torch.long))
    assert model_device_dtype(counter)[1] == torch.float32  # an integer buffer says nothing
    t = torch.zeros(1)
    assert first_tensor(t) is t
    assert first_tensor((t, 1)) is t and first_tensor([t]) is t
    assert first_tensor(()) is None and first_tensor((1, t)) is None
    assert first_tensor({"x": t}) is None
