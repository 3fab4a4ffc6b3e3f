"""cam_plugin.adapter: the hook-free computation and the one core step
(``Adapter.maps_from_capture``) agree with the hook path and the identity."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyResNet, images, randomize_head

import cam_plugin as cp


@pytest.fixture(scope="module")
def net() -> TinyResNet:
    torch.manual_seed(0)
    return randomize_head(TinyResNet(num_classes=10)).eval()


def test_hook_free_compute_matches_hook_path(net: TinyResNet) -> None:
    x = images(2, 16)
    cam = cp.CAM(net)
    res = cam(x, targets="all")
    with torch.no_grad():
        feats = net.forward_features(x)
        logits, maps = cam.adapter.compute(feats)
    torch.testing.assert_close(logits, res.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps, res.maps)


def test_maps_from_capture_is_the_core_step(net: TinyResNet) -> None:
    x = images(3, 16, seed=4)
    adapter = cp.resolve(net, example=x)
    with torch.no_grad():
        feats, out = net.forward_features(x), net(x)
    step = adapter.maps_from_capture(feats, out, select=lambda s: s.topk(2, dim=1).indices)
    assert step.classes is not None and step.classes.shape == (3, 2)
    assert torch.equal(step.classes, out.topk(2, dim=1).indices)
    assert step.logits is out and step.maps.shape == (3, 2, 4, 4)
    bias = step.head.class_bias(step.classes)
    # the identity: mean_xy M_c + b_c = S_c for the selected classes
    torch.testing.assert_close(
        step.maps.mean(dim=(2, 3)) + bias, out.gather(1, step.classes), rtol=1e-4, atol=1e-4
    )
    no_output = adapter.maps_from_capture(feats)  # logits from the folded head
    torch.testing.assert_close(no_output.logits, out, rtol=1e-4, atol=1e-4)
    assert no_output.classes is None and no_output.maps.shape == (3, 10, 4, 4)
    with pytest.raises(cp.UnsupportedHeadError, match="reproduces the model's logits"):
        adapter.maps_from_capture(feats, out + 1.0, verify=True)


def test_adapter_contract_errors(net: TinyResNet) -> None:
    with pytest.raises(cp.CAMInputError, match="feature_module must be an nn.Module"):
        cp.Adapter(feature_module="layer2", head=[net.fc])  # type: ignore[arg-type]
    with pytest.raises(cp.CAMInputError, match="'avg' or 'max'"):
        cp.Adapter(feature_module=net.layer2, head=[net.fc], pool="sum")  # type: ignore[arg-type]
    adapter = cp.Adapter(feature_module=net.layer2, head=[net.fc])
    assert adapter.num_features == 16 and adapter.head_modules[0][1] is net.fc
    with pytest.raises(cp.CAMInputError, match="output_fn"):
        adapter.logits_from_output({"logits": torch.zeros(1, 10)})
