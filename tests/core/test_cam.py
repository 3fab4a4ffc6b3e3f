"""cam_plugin.cam: hook lifecycle, host untouched, batch semantics, targets and bad input.

Torch-only models: ``TinyResNet`` (10 classes, a 4 x 4 last map at 16 x 16) stands in for a
ResNet; the timm versions of the framework-specific checks are in tests/integrations/.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TinyCNN, TinyResNet, assert_identity, images, randomize_head
from torch import nn

import cam_plugin as cp
from cam_plugin.cam import all_finite, check_eval_mode, check_images, parse_targets

SIZE = 16  # TinyResNet: 16 x 16 -> a 4 x 4 feature map


@pytest.fixture(scope="module")
def net() -> TinyResNet:
    torch.manual_seed(0)
    return randomize_head(TinyResNet(num_classes=10)).eval()


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


def test_two_cams_on_one_model_do_not_interfere(net: TinyResNet) -> None:
    x = images(3, SIZE)
    a, b = cp.CAM(net), cp.CAM(net)
    with a, b:
        ra = a(x, targets=1)
        rb = b(x, targets=[2, 3, 4])
        ra2 = a(x, targets=1)
    torch.testing.assert_close(ra.maps, ra2.maps)
    assert rb.classes[:, 0].tolist() == [2, 3, 4]
    assert cp.count_hooks(net) == 0


def test_host_model_untouched(net: TinyResNet) -> None:
    x = images(2, SIZE)
    net.zero_grad(set_to_none=True)
    params = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        before = net(x)
    rng = torch.get_rng_state()
    res = cp.CAM(net)(x, topk=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not net.training
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, params[k]), k
    with torch.no_grad():
        assert torch.equal(net(x), before)
    assert torch.equal(res.logits, before)


def test_train_mode_needs_opt_in() -> None:
    model = randomize_head(TinyResNet(num_classes=4)).train()
    cam = cp.CAM(model)
    with pytest.raises(cp.CAMInputError, match="train mode"):
        cam(images(2, SIZE))
    res = cp.CAM(model, allow_train=True)(images(2, SIZE))
    assert model.training and res.maps.shape == (2, 1, 4, 4)


def test_batch_equals_single_calls(net: TinyResNet) -> None:
    x = images(8, SIZE, seed=3)
    cam = cp.CAM(net)
    batch = cam(x, topk=3)
    for i in range(8):
        single = cam(x[i : i + 1], topk=3)
        assert torch.equal(single.classes, batch.classes[i : i + 1])
        torch.testing.assert_close(single.maps, batch.maps[i : i + 1], rtol=1e-4, atol=1e-5)


def test_targets_forms(net: TinyResNet) -> None:
    x = images(3, SIZE)
    cam = cp.CAM(net)
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
    assert full.maps.shape == (3, 10, 4, 4)
    torch.testing.assert_close(multi.maps[0, :2], full.maps[0, [1, 2]])
    torch.testing.assert_close(multi.maps[2], full.maps[2, [4, 5, 6]])


def test_parse_targets_is_the_public_reading_of_targets() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])

    def rows(targets, topk: int = 1) -> list:  # type: ignore[no-untyped-def]
        classes = parse_targets(targets, logits, topk=topk)
        assert classes is not None
        return classes.tolist()

    assert rows(None, topk=2) == [[1, 2], [0, 2]]
    assert parse_targets("all", logits) is None
    assert rows(2) == [[2], [2]]
    assert rows([[0, 1], [2]]) == [[0, 1], [2, -1]]
    with pytest.raises(cp.CAMInputError, match="out of range"):
        parse_targets(3, logits)


def test_under_no_grad_and_inference_mode(net: TinyResNet) -> None:
    x = images(2, SIZE)
    cam = cp.CAM(net)
    with torch.no_grad():
        a = cam(x)
    with torch.inference_mode():
        b = cam(x)
    torch.testing.assert_close(a.maps, b.maps)


def test_differentiable_maps_feed_a_loss(net: TinyResNet) -> None:
    x = images(2, SIZE).requires_grad_()
    cam = cp.CAM(net, differentiable=True)
    res = cam(x, targets=[1, 2])
    assert res.maps.requires_grad
    res.maps.abs().mean().backward()  # (these two classes have no positive evidence here)
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert net.fc.weight.grad is not None
    net.zero_grad(set_to_none=True)
    plain = cp.CAM(net)(x.detach())
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
def test_bad_images(net: TinyResNet, images_arg, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        cp.CAM(net)(images_arg)


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
def test_bad_targets(net: TinyResNet, targets, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(cp.CAMInputError, match=match):
        cp.CAM(net)(images(3, SIZE), targets=targets)
    assert cp.count_hooks(net) == 0


def test_bad_topk(net: TinyResNet) -> None:
    with pytest.raises(cp.CAMInputError, match="topk"):
        cp.CAM(net)(images(1, SIZE), topk=11)


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        cp.CAM("resnet18")  # type: ignore[arg-type]


def test_verify_catches_a_changed_model() -> None:
    model = randomize_head(TinyResNet(num_classes=3)).eval()
    cam = cp.CAM(model)
    cam(images(1, SIZE))  # resolved from this call
    model.global_pool = nn.AdaptiveMaxPool2d(1)  # the model changed after resolution
    with pytest.raises(cp.UnsupportedHeadError, match="reproduces the model's logits"):
        cam(images(1, SIZE))
    assert cp.count_hooks(model) == 0


def test_public_checks(net: TinyResNet) -> None:
    """``check_images`` / ``check_eval_mode`` / ``all_finite`` are the one copy every face uses."""
    x = images(2, SIZE)
    assert all_finite(x) and not all_finite(x.index_fill(0, torch.tensor([1]), float("nan")))
    assert check_images(x, None, model=net) is x  # a good batch passes
    with pytest.raises(cp.CAMInputError, match="unsqueeze"):
        check_images(x[0], None)
    with pytest.raises(cp.CAMInputError, match="1 channels but the model expects 3"):
        check_images(x[:, :1], None, channels=3)
    with pytest.raises(cp.CAMInputError, match="float64"):
        check_images(x.double(), None, model=net)
    check_eval_mode(net, None)
    net.train()
    try:
        with pytest.raises(cp.CAMInputError, match="train mode"):
            check_eval_mode(net, None)
    finally:
        net.eval()
