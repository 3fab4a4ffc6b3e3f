"""Hook lifecycle, host untouched, batch semantics, targets and bad input."""

from __future__ import annotations

import gc

import pytest
import timm
import torch
from helpers import TinyCNN, assert_identity, images, randomize_head
from torch import nn

import cam_plugin as cp
from cam_plugin.hooks import FeatureCapture


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_head(timm.create_model("resnet18", num_classes=10)).eval()


def test_thousand_calls_leave_no_hook_even_when_forward_raises() -> None:
    model = randomize_head(TinyCNN(num_classes=5)).eval()
    baseline = cp.count_hooks(model)
    cam = cp.CAM(model, input_size=(3, 8, 8))
    x = images(2, 8)
    raised = 0
    for i in range(1000):
        model.raise_in_head = i % 3 == 0
        try:
            res = cam(x, topk=2)
            assert res.maps.shape == (2, 2, 4, 4)
        except RuntimeError as err:
            assert "boom" in str(err)
            raised += 1
        assert cp.count_hooks(model) == baseline
    assert raised == 334


def test_feature_capture_removed_on_exception_and_gc(tiny_cnn: nn.Module) -> None:
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


def test_two_cams_on_one_model_do_not_interfere(resnet: nn.Module) -> None:
    x = images(3, 64)
    a, b = cp.CAM(resnet), cp.CAM(resnet)
    with a, b:
        ra = a(x, targets=1)
        rb = b(x, targets=[2, 3, 4])
        ra2 = a(x, targets=1)
    torch.testing.assert_close(ra.maps, ra2.maps)
    assert rb.classes[:, 0].tolist() == [2, 3, 4]
    assert cp.count_hooks(resnet) == 0


def test_host_model_untouched(resnet: nn.Module) -> None:
    x = images(2, 64)
    resnet.zero_grad(set_to_none=True)
    params = {k: v.clone() for k, v in resnet.state_dict().items()}
    with torch.no_grad():
        before = resnet(x)
    rng = torch.get_rng_state()
    res = cp.CAM(resnet)(x, topk=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not resnet.training
    assert all(p.grad is None for p in resnet.parameters())
    for k, v in resnet.state_dict().items():
        assert torch.equal(v, params[k]), k
    with torch.no_grad():
        assert torch.equal(resnet(x), before)
    assert torch.equal(res.logits, before)


def test_probe_restores_train_mode_and_rng() -> None:
    model = randomize_head(timm.create_model("resnet18", num_classes=4))
    model.train()
    bn = model.bn1
    stats = bn.running_mean.clone()
    rng = torch.get_rng_state()
    adapter = cp.resolve(model)  # probe forward runs in eval mode, then restores
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(bn.running_mean, stats)
    assert torch.equal(torch.get_rng_state(), rng)
    assert adapter.feature_name == "layer4"


def test_train_mode_needs_opt_in(resnet: nn.Module) -> None:
    model = randomize_head(timm.create_model("resnet18", num_classes=4)).train()
    cam = cp.CAM(model)
    with pytest.raises(cp.CAMInputError, match="train mode"):
        cam(images(2, 64))
    res = cp.CAM(model, allow_train=True)(images(2, 64))
    assert model.training and res.maps.shape == (2, 1, 2, 2)


def test_batch_equals_single_calls(resnet: nn.Module) -> None:
    x = images(8, 64, seed=3)
    cam = cp.CAM(resnet)
    batch = cam(x, topk=3)
    for i in range(8):
        single = cam(x[i : i + 1], topk=3)
        assert torch.equal(single.classes, batch.classes[i : i + 1])
        torch.testing.assert_close(single.maps, batch.maps[i : i + 1], rtol=1e-4, atol=1e-5)


def test_targets_forms(resnet: nn.Module) -> None:
    x = images(3, 64)
    cam = cp.CAM(resnet)
    top = cam(x)
    assert torch.equal(top.classes[:, 0], top.logits.argmax(1))
    assert cam(x, topk=4).classes.shape == (3, 4)
    assert cam(x, targets=7).classes.tolist() == [[7], [7], [7]]
    assert cam(x, targets=torch.tensor([1, 2, 3])).classes.tolist() == [[1], [2], [3]]
    multi = cam(x, targets=[[1, 2], [3], [4, 5, 6]])
    assert multi.classes.tolist() == [[1, 2, -1], [3, -1, -1], [4, 5, 6]]
    per_image = multi.per_image()
    assert [c.tolist() for c, _ in per_image] == [[1, 2], [3], [4, 5, 6]]
    assert [m.shape[0] for _, m in per_image] == [2, 1, 3]
    assert_identity(multi)
    full = cam(x, targets="all")
    assert full.maps.shape == (3, 10, 2, 2)
    torch.testing.assert_close(multi.maps[0, :2], full.maps[0, [1, 2]])
    torch.testing.assert_close(multi.maps[2], full.maps[2, [4, 5, 6]])


def test_result_chain(resnet: nn.Module) -> None:
    res = cp.CAM(resnet)(images(2, 64), topk=2)
    up = res.upsample()
    assert up.maps.shape == (2, 2, 64, 64) and up.stage == "upsampled"
    norm = up.normalize()
    assert float(norm.maps.min()) >= 0.0 and float(norm.maps.max()) <= 1.0
    flat = norm.maps.flatten(2)
    assert torch.allclose(flat.amax(-1), torch.ones(2, 2))
    boxes = norm.boxes(0.2)
    assert boxes.shape == (2, 2, 4)
    assert bool((boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all())
    assert float(res.relu().maps.min()) >= 0.0
    arrays = res.to_numpy()
    assert arrays["maps"].shape == (2, 2, 2, 2) and arrays["classes"].shape == (2, 2)
    assert torch.allclose(
        res.probabilities.sum(), res.logits.softmax(1).gather(1, res.classes).sum()
    )


def test_constant_map_normalizes_to_zeros() -> None:
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 1] = 3.0
    out = cp.minmax_normalize(maps)
    assert torch.equal(out, torch.zeros_like(out))


def test_under_no_grad_and_inference_mode(resnet: nn.Module) -> None:
    x = images(2, 64)
    cam = cp.CAM(resnet)
    with torch.no_grad():
        a = cam(x)
    with torch.inference_mode():
        b = cam(x)
    torch.testing.assert_close(a.maps, b.maps)


def test_differentiable_maps_feed_a_loss(resnet: nn.Module) -> None:
    x = images(2, 64).requires_grad_()
    cam = cp.CAM(resnet, differentiable=True)
    res = cam(x, targets=[1, 2])
    assert res.maps.requires_grad
    res.maps.relu().mean().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert resnet.fc.weight.grad is not None
    resnet.zero_grad(set_to_none=True)
    plain = cp.CAM(resnet)(x.detach())
    # nothing in a plain result carries a graph back into the host's parameters
    assert not any(
        t.requires_grad for t in (plain.maps, plain.logits, plain.bias, plain.identity_residual())
    )


@pytest.mark.parametrize(
    ("images_arg", "error", "match"),
    [
        ([[0.0]], TypeError, "torch.Tensor"),
        (torch.zeros(3, 64, 64), cp.CAMInputError, "unsqueeze"),
        (torch.zeros(1, 1, 64, 64), cp.CAMInputError, "channels"),
        (torch.zeros(0, 3, 64, 64), cp.CAMInputError, "empty"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "floating"),
        (torch.full((1, 3, 64, 64), float("nan")), cp.CAMInputError, "NaN"),
        (torch.full((1, 3, 64, 64), float("inf")), cp.CAMInputError, "inf"),
    ],
    ids=["not-tensor", "rank", "channels", "empty", "int", "nan", "inf"],
)
def test_bad_images(resnet: nn.Module, images_arg, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        cp.CAM(resnet)(images_arg)


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        (10, "out of range"),
        (-1, "out of range"),
        ([1, 2], "2 entries but the batch has 3"),
        ([[1], [2]], "2 entries"),
        ([[1], [2], [99]], "out of range"),
        (torch.tensor([0.5, 1.0, 2.0]), "integer"),
        ("some", "'all'"),
        ([[1], [], [2]], "empty"),
    ],
)
def test_bad_targets(resnet: nn.Module, targets, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(cp.CAMInputError, match=match):
        cp.CAM(resnet)(images(3, 64), targets=targets)
    assert cp.count_hooks(resnet) == 0


def test_bad_topk(resnet: nn.Module) -> None:
    with pytest.raises(cp.CAMInputError, match="topk"):
        cp.CAM(resnet)(images(1, 64), topk=11)


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        cp.CAM("resnet18")  # type: ignore[arg-type]


def test_unresolvable_model_lists_what_was_tried() -> None:
    class ReturnsDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> dict:
            return {"out": self.conv(x)}

    with pytest.raises(cp.AdapterNotFoundError) as info:
        cp.CAM(ReturnsDict(), input_size=(3, 16, 16))(images(1, 16))
    msg = str(info.value)
    assert "generic probe" in msg and "register_adapter" in msg and "dict" in msg


def test_register_adapter_takes_precedence() -> None:
    class Net(TinyCNN):
        pass

    model = randomize_head(Net(num_classes=3)).eval()
    calls = []

    def factory(m: nn.Module) -> cp.Adapter:
        calls.append(m)
        return cp.Adapter(feature_module=m.features, head=[("fc", m.fc)], input_size=(3, 8, 8))

    cp.register_adapter(Net, factory, name="test-net")
    try:
        res = cp.CAM(model)(images(2, 8), targets="all")
        assert calls and "test-net" in cp.registered_adapters()
        assert_identity(res)
    finally:
        from cam_plugin import registry

        registry._REGISTRY[:] = [e for e in registry._REGISTRY if e.name != "test-net"]


def test_hook_free_compute_matches_hook_path(resnet: nn.Module) -> None:
    x = images(2, 64)
    cam = cp.CAM(resnet)
    res = cam(x, targets="all")
    with torch.no_grad():
        feats = resnet.forward_features(x)
        logits, maps = cam.adapter.compute(feats)
    torch.testing.assert_close(logits, res.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps, res.maps)


def test_verify_catches_a_changed_model(resnet: nn.Module) -> None:
    model = randomize_head(timm.create_model("resnet18", num_classes=3)).eval()
    cam = cp.CAM(model)
    cam(images(1, 64))  # resolved from this call
    model.global_pool = timm.layers.SelectAdaptivePool2d(pool_type="max", flatten=True)
    with pytest.raises(cp.UnsupportedHeadError, match="reproduces the model's logits"):
        cam(images(1, 64))
    assert cp.count_hooks(model) == 0
