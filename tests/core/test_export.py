"""cam_plugin.export: ``CAMModule`` equals eager ``CAM`` (torch-only models), exports to ONNX
(when onnxruntime is installed), keeps the host's modes; the timm versions are in
tests/integrations/test_export_timm.py.

``torch.compile`` of the module is exercised by ``benchmarks/speed.py`` (compiling even a
tiny CNN takes ~50 s on this 2-core machine, more than this file's budget).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from helpers import TinyCNN, TinyResNet, images, randomize_head

import cam_plugin as cp
from cam_plugin.export import CAMModule, export_onnx


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) / float(b.abs().max())


@pytest.fixture(scope="module")
def resnet() -> TinyResNet:
    """ResNet-shaped, with timm's forward_features / forward_head (torch only)."""
    torch.manual_seed(0)
    return randomize_head(TinyResNet(num_classes=11)).eval()


@pytest.fixture(scope="module")
def convnext() -> TinyResNet:
    """A LayerNorm head after the pool, as ConvNeXt's (torch only)."""
    torch.manual_seed(0)
    return randomize_head(TinyResNet(num_classes=9, head_norm=True)).eval()


def _eager(model: torch.nn.Module, x: torch.Tensor, topk, upsample: bool, normalize: bool):  # type: ignore[no-untyped-def]
    res = cp.CAM(model)(x, targets="all" if topk is None else None, topk=topk or 1)
    if upsample:
        res = res.upsample(placement="bilinear")  # CAMModule resizes plainly
    if normalize:
        res = res.normalize()
    return res


CASES = [
    ("tiny", 1, False, False),
    ("tiny", 3, False, False),
    ("tiny", None, False, False),
    ("tiny", 2, True, True),
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
    if which == "tiny":
        torch.manual_seed(0)
        model, x, trunk = randomize_head(TinyCNN()).eval(), images(3, 32), "hook"
    else:
        model, x, trunk = request.getfixturevalue(which), images(2, 16), "forward_features"
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


def test_result_keeps_the_identity_and_host_untouched(resnet: TinyResNet) -> None:
    x = images(2, 16, seed=1)
    with torch.no_grad():
        before = resnet(x)
    res = CAMModule(resnet, topk=4).result(x)
    scale = max(1.0, float(res.logits.abs().max()))
    assert float(res.identity_residual().abs().max()) <= 1e-4 * scale
    assert res.stage == "feature" and res.maps.shape == (2, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(resnet(x), before)
    assert not resnet.training and cp.count_hooks(resnet) == 0


def test_hook_trunk_removes_its_hook_and_keeps_gradients(tiny_cnn: TinyCNN) -> None:
    x = images(2, 32).requires_grad_(True)
    _, maps, _ = CAMModule(tiny_cnn, trunk="hook")(x)
    maps.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert cp.count_hooks(tiny_cnn) == 0


def test_callable_trunk_and_refresh(resnet: TinyResNet) -> None:
    x = images(2, 16, seed=2)
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


def test_bad_options_are_refused(tiny_cnn: TinyCNN) -> None:
    with pytest.raises(cp.CAMInputError, match="forward_features"):
        CAMModule(tiny_cnn, trunk="forward_features")
    with pytest.raises(cp.CAMInputError, match="topk"):
        CAMModule(tiny_cnn, topk=0)
    with pytest.raises(cp.CAMInputError, match="upsample"):
        CAMModule(tiny_cnn, upsample=(32,))
    with pytest.raises(cp.CAMInputError, match="upsample"):
        CAMModule(tiny_cnn, upsample=224)  # type: ignore[arg-type]
    with pytest.raises(cp.CAMInputError, match="trunk"):
        CAMModule(tiny_cnn, trunk="sideways")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.Module"):
        CAMModule("resnet")  # type: ignore[arg-type]
    module = CAMModule(tiny_cnn)
    with pytest.raises(cp.CAMInputError, match="4-D"):
        module(images(1, 32)[0])
    with pytest.raises(cp.CAMInputError, match="channels"):
        module(torch.zeros(1, 1, 32, 32))
    tiny_cnn.train()
    try:
        with pytest.raises(cp.CAMInputError, match="train mode"):
            CAMModule(tiny_cnn)
        tiny_cnn.eval()
        module.train()  # the wrapper's train() reaches the model: refused at call time
        with pytest.raises(cp.CAMInputError, match="train mode"):
            module(images(1, 32))
    finally:
        tiny_cnn.eval()


@pytest.mark.parametrize("which", ["tiny", "resnet"])
def test_onnx_export_matches_eager(which: str, request, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if which == "tiny":
        torch.manual_seed(0)
        model, size = randomize_head(TinyCNN()).eval(), 32
    else:
        model, size = request.getfixturevalue(which), 16
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


def test_finite_check_is_exact_and_refuses_bad_images(tiny_cnn: TinyCNN) -> None:
    from cam_plugin.cam import all_finite

    x = images(2, 8)
    assert all_finite(x)
    big = torch.full((4, 4), 3e38)  # the sum overflows: the exact check decides
    assert all_finite(big)
    assert all_finite(big.half().float()) is False  # 3e38 -> inf in fp16
    assert all_finite(torch.full((2, 2), 60000.0, dtype=torch.float16))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 2, 3, 4] = bad
        assert not all_finite(y)
        assert not all_finite(y.bfloat16())
        with pytest.raises(cp.CAMInputError, match="NaN or inf"):
            cp.CAM(tiny_cnn)(images(1, 32).index_fill(3, torch.tensor([5]), bad))


_FAULTS = """
import resource, sys, torch
from cam_plugin.export import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(64 * 2**20 // 4)  # a 64 MiB block, above glibc's mmap threshold
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
faults()
print(min(faults() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_reuses_pages() -> None:
    """In a child process (the setting is process-wide): a repeated 64 MiB allocation faults
    in ~16k fresh pages by default and none once freed memory is kept."""
    counts = {}
    for mode in ("default", "keep"):
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
        )
        counts[mode] = int(out.stdout.split()[-1])
    assert counts["default"] > 8000, counts
    assert counts["keep"] < 200, counts


def _modes(model: torch.nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("dynamo", [False, True])
def test_export_onnx_keeps_every_module_mode(dynamo: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 11: the TorchScript exporter restored the wrapper's (train) mode onto the host."""
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = randomize_head(TinyCNN()).eval()
    module = CAMModule(model)
    model.features[1].train()  # a mixed state (a BatchNorm in train mode) must come back
    before = _modes(model)
    assert module.training is False  # mirrors the (eval) host
    export_onnx(module, tmp_path / "ok.onnx", example=images(2, 32), dynamo=dynamo)
    assert _modes(model) == before
    with pytest.raises(Exception):  # noqa: B017 - whatever the exporter raises
        export_onnx(
            module, tmp_path / "missing-dir" / "x" / "bad.onnx", example=images(2, 5)[:, :1]
        )
    assert _modes(model) == before
    assert cp.count_hooks(model) == 0


def test_camodule_mirrors_the_wrapped_models_mode(tiny_cnn: TinyCNN) -> None:
    module = CAMModule(tiny_cnn)
    assert module.training is False and not any(_modes(tiny_cnn))


def test_export_onnx_names_the_extra_when_onnx_is_missing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnx")  # onnx present, onnxscript hidden: the message names the extra
    code = (
        "import sys; sys.modules['onnxscript'] = None\n"
        "import torch, cam_plugin.export as e\n"
        "from helpers import TinyCNN\n"
        "try:\n"
        "    e.export_onnx(TinyCNN().eval(), 'x.onnx', dynamo=True)\n"
        "except ImportError as err:\n"
        "    print('ERR', err)\n"
    )
    env_path = str(Path(__file__).resolve().parents[1])  # tests/, where helpers.py lives
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": env_path},
        timeout=120,
    )
    assert "ERR export_onnx needs onnxscript: pip install 'cam-plugin[onnx]'" in out.stdout, out
