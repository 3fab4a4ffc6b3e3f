"""cam_plugin.hooks: the FeatureCapture lifecycle and count_hooks."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from helpers import TinyCNN, images
from torch import nn

import cam_plugin as cp
from cam_plugin.hooks import FeatureCapture


def test_feature_capture_removed_on_exception_and_gc(tiny_cnn: TinyCNN) -> None:
    baseline = cp.count_hooks(tiny_cnn)
    with pytest.raises(ValueError, match="inside"), FeatureCapture(tiny_cnn.features) as cap:
        tiny_cnn(images(1, 8))
        assert cap.value is not None and cp.count_hooks(tiny_cnn) == baseline + 1
        raise ValueError("inside")
    assert cp.count_hooks(tiny_cnn) == baseline
    cap2 = FeatureCapture(tiny_cnn.features).install()
    assert cp.count_hooks(tiny_cnn) == baseline + 1
    del cap2
    gc.collect()
    assert cp.count_hooks(tiny_cnn) == baseline


def test_install_and_remove_are_idempotent(tiny_cnn: TinyCNN) -> None:
    cap = FeatureCapture(tiny_cnn.features)
    assert not cap.active
    assert cap.install() is cap and cap.install() is cap
    assert cap.active and cp.count_hooks(tiny_cnn) == 1
    tiny_cnn(images(1, 8))
    assert cap.value is not None
    cap.remove()
    cap.remove()
    assert not cap.active and cap.value is None and cp.count_hooks(tiny_cnn) == 0
    with cap:  # a removed capture can be installed again
        assert cp.count_hooks(tiny_cnn) == 1
    assert cp.count_hooks(tiny_cnn) == 0


def test_output_and_input_capture_what_the_module_sees(tiny_cnn: TinyCNN) -> None:
    x = images(2, 8)
    with FeatureCapture(tiny_cnn.fc, "input") as inp, FeatureCapture(tiny_cnn.features) as out:
        logits = tiny_cnn(x)
    with torch.no_grad():
        feats = tiny_cnn.features(x)
        pooled = torch.flatten(tiny_cnn.pool(feats), 1)
    assert inp.value is None and out.value is None  # the stored tensor goes with the hook
    with FeatureCapture(tiny_cnn.fc, "input") as inp, FeatureCapture(tiny_cnn.features) as out:
        tiny_cnn(x)
        torch.testing.assert_close(out.value, feats)
        torch.testing.assert_close(inp.value, pooled)
        got = out.pop()
        assert got is not None and out.value is None  # pop forgets
    torch.testing.assert_close(tiny_cnn.fc(pooled), logits)


def test_detach_by_default_and_graph_on_request(tiny_cnn: TinyCNN) -> None:
    x = images(1, 8).requires_grad_()
    with FeatureCapture(tiny_cnn.features) as cap:
        tiny_cnn(x)
        assert cap.value is not None and not cap.value.requires_grad
    with FeatureCapture(tiny_cnn.features, detach=False) as cap:
        tiny_cnn(x)
        assert cap.value is not None and cap.value.requires_grad
        cap.value.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_tuple_outputs_keep_the_first_tensor_and_non_tensors_clear() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x * 3

    class Named(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"x": x}

    x = torch.ones(1, 2)
    pair, named = Pair(), Named()
    with FeatureCapture(pair) as cap:
        pair(x)
        assert cap.value is not None and torch.equal(cap.value, x * 2)
    with FeatureCapture(named) as cap:
        named(x)
        assert cap.value is None


def test_only_the_installing_threads_forwards_are_recorded(tiny_cnn: TinyCNN) -> None:
    mine, theirs = images(1, 8, seed=1), images(1, 8, seed=2)
    with torch.no_grad():
        want_mine, want_theirs = tiny_cnn.features(mine), tiny_cnn.features(theirs)

    def other() -> None:
        tiny_cnn(theirs)

    with (
        FeatureCapture(tiny_cnn.features) as cap,
        FeatureCapture(tiny_cnn.features, any_thread=True) as anyone,
    ):
        tiny_cnn(mine)
        t = threading.Thread(target=other)
        t.start()
        t.join()
        torch.testing.assert_close(cap.value, want_mine)
        torch.testing.assert_close(anyone.value, want_theirs)
    assert cp.count_hooks(tiny_cnn) == 0


def test_bad_arguments_are_refused(tiny_cnn: TinyCNN) -> None:
    with pytest.raises(cp.CAMInputError, match="nn.Module"):
        FeatureCapture("features")  # type: ignore[arg-type]
    with pytest.raises(cp.CAMInputError, match="'output' or 'input'"):
        FeatureCapture(tiny_cnn.features, "gradient")  # type: ignore[arg-type]


def test_count_hooks_sees_module_and_global_hooks(tiny_cnn: TinyCNN) -> None:
    assert cp.count_hooks(tiny_cnn) == 0
    handles = [
        tiny_cnn.fc.register_forward_pre_hook(lambda m, a: None),
        tiny_cnn.register_forward_hook(lambda m, a, o: None),
        nn.modules.module.register_module_forward_hook(lambda m, a, o: None),
    ]
    try:
        assert cp.count_hooks(tiny_cnn) == 3
    finally:
        for h in handles:
            h.remove()
    assert cp.count_hooks(tiny_cnn) == 0
