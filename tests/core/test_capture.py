"""cam_plugin.capture: ForwardCapture takes the feature map (and, on first use, the adapter)
from the user's one forward; no hook outlives the block."""

from __future__ import annotations

import pytest
import torch
from helpers import Counted, TinyResNet, images, randomize_head
from torch import nn

import cam_plugin as cp
from cam_plugin.capture import ForwardCapture, resolve_without_forward


@pytest.fixture
def net() -> TinyResNet:
    torch.manual_seed(0)
    return randomize_head(TinyResNet(num_classes=6)).eval()


def test_unresolved_capture_reads_the_adapter_from_the_same_forward(net: TinyResNet) -> None:
    x = images(2, 16)
    counted = Counted(net)
    try:
        with ForwardCapture(net, None) as fc:
            out = net(x)
        assert cp.count_hooks(net) == 3  # only the counter's own hooks are left
        adapter, captured = fc.finish(x, out)
        assert counted.counts() == (1, 1, 1), "no forward other than the user's"
    finally:
        counted.remove()
    assert adapter.feature_module is net.layer2 and fc.adapter is adapter
    with torch.no_grad():
        torch.testing.assert_close(captured, net.forward_features(x))
    assert not captured.requires_grad


def test_known_adapter_captures_with_one_hook(net: TinyResNet) -> None:
    adapter = cp.resolve(net, input_size=(3, 16, 16))
    x = images(3, 16, seed=1).requires_grad_()
    with ForwardCapture(net, adapter, detach=False) as fc:
        assert cp.count_hooks(net) == 1
        out = net(x)
    assert cp.count_hooks(net) == 0
    got, captured = fc.finish(x, out)
    assert got is adapter and captured.requires_grad  # detach=False keeps the graph
    torch.testing.assert_close(captured, net.forward_features(x))
    maps = adapter.maps_from_capture(captured, out, verify=True).maps
    maps.sum().backward()
    assert x.grad is not None


def test_feature_module_not_called_is_a_clear_error(net: TinyResNet) -> None:
    adapter = cp.Adapter(feature_module=nn.Conv2d(3, 4, 1), head=[net.fc], name="stray")
    with ForwardCapture(net, adapter) as fc:
        out = net(images(1, 16))
    with pytest.raises(cp.CAMInputError, match="was not called"):
        fc.finish(images(1, 16), out)


def test_hooks_removed_when_the_forward_raises(net: TinyResNet) -> None:
    adapter = cp.resolve(net, input_size=(3, 16, 16))
    for known in (None, adapter):
        with pytest.raises(RuntimeError), ForwardCapture(net, known):
            net(torch.zeros(1, 5, 16, 16))  # wrong channel count: the conv raises
        assert cp.count_hooks(net) == 0


def test_resolve_without_forward(net: TinyResNet) -> None:
    counted = Counted(net)
    try:
        assert resolve_without_forward(net) is None  # the generic reading needs a forward
        assert counted.counts() == (0, 0, 0)
    finally:
        counted.remove()

    class Explicit(TinyResNet):
        def __cam_adapter__(self) -> cp.Adapter:
            return cp.Adapter(feature_module=self.layer2, head=[("fc", self.fc)])

    model = Explicit().eval()
    adapter = resolve_without_forward(model)
    assert adapter is not None and adapter.feature_module is model.layer2
