"""CAMModule on timm models (the ``forward_features`` trunk of timm's own convention, a
LayerNorm head), and their ONNX export; the torch-only checks are in tests/core/test_export.py."""

from __future__ import annotations

from typing import Optional

import pytest

timm = pytest.importorskip("timm")

import torch  # noqa: E402
from helpers import images, randomize_head  # noqa: E402

import cam_plugin as cp  # noqa: E402
from cam_plugin.export import CAMModule, export_onnx  # noqa: E402


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) / float(b.abs().max())


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_head(timm.create_model("resnet18", num_classes=11)).eval()


@pytest.fixture(scope="module")
def convnext() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_head(timm.create_model("convnext_atto", num_classes=9)).eval()


def _eager(model: torch.nn.Module, x: torch.Tensor, topk, upsample: bool, normalize: bool):  # type: ignore[no-untyped-def]
    res = cp.CAM(model)(x, targets="all" if topk is None else None, topk=topk or 1)
    if upsample:
        res = res.upsample(placement="bilinear")  # CAMModule resizes plainly
    if normalize:
        res = res.normalize()
    return res


CASES = [
    ("resnet", 3, False, False),
    ("resnet", None, False, False),
    ("resnet", 2, True, True),
    ("convnext", 1, True, True),  # LayerNorm head: the mean shift and 1/σ enter the maps
    ("convnext", None, False, False),
]


@pytest.mark.parametrize(("which", "topk", "upsample", "normalize"), CASES)
def test_module_equals_eager_cam(
    which: str, topk: Optional[int], upsample: bool, normalize: bool, request: pytest.FixtureRequest
) -> None:
    model, x, trunk = request.getfixturevalue(which), images(2, 64), "forward_features"
    module = CAMModule(model, topk=topk, upsample=upsample, normalize=normalize).eval()
    assert module.trunk == trunk
    with torch.no_grad():
        logits, maps, classes = module(x)
    ref = _eager(model, x, topk, upsample, normalize)
    assert torch.equal(classes, ref.classes)
    assert _rel_err(logits, ref.logits) <= 1e-5
    assert maps.shape == ref.maps.shape
    assert _rel_err(maps, ref.maps) <= 1e-4
    assert cp.count_hooks(model) == 0


def test_result_keeps_the_identity_and_host_untouched(resnet: torch.nn.Module) -> None:
    x = images(2, 64, seed=1)
    with torch.no_grad():
        before = resnet(x)
    res = CAMModule(resnet, topk=4).result(x)
    scale = max(1.0, float(res.logits.abs().max()))
    assert float(res.identity_residual().abs().max()) <= 1e-4 * scale
    assert res.stage == "feature" and res.maps.shape == (2, 4, 2, 2)
    with torch.no_grad():
        assert torch.equal(resnet(x), before)
    assert not resnet.training and cp.count_hooks(resnet) == 0


def test_callable_trunk_and_refresh(resnet: torch.nn.Module) -> None:
    x = images(2, 64, seed=2)
    module = CAMModule(resnet, topk=None, trunk=resnet.forward_features)
    assert module.trunk == "callable"
    with torch.no_grad():
        logits, maps, _ = module(x)
        assert _rel_err(logits, resnet(x)) <= 1e-5
        # the fold is a snapshot: changing the head needs refresh()
        fc = resnet.get_classifier()
        saved = fc.weight.detach().clone()
        try:
            fc.weight.mul_(2)
            _, stale, _ = module(x)
            assert torch.allclose(stale, maps)
            _, fresh, _ = module.refresh()(x)
            assert _rel_err(fresh, 2 * maps) <= 1e-5
        finally:
            fc.weight.copy_(saved)


def test_onnx_export_matches_eager(resnet: torch.nn.Module, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, size = resnet, 64
    path = export_onnx(
        model, tmp_path / "cam.onnx", example=images(2, size), topk=2, upsample=True, normalize=True
    )
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = images(3, size, seed=5)  # another batch size: the batch dimension is dynamic
    logits, maps, classes = (torch.from_numpy(a) for a in sess.run(None, {"images": x.numpy()}))
    ref = _eager(model, x, 2, True, True)
    assert torch.equal(classes, ref.classes)
    assert _rel_err(logits, ref.logits) <= 1e-4
    assert _rel_err(maps, ref.maps) <= 1e-4
    assert cp.count_hooks(model) == 0
