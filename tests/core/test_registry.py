"""cam_plugin.registry: resolution order (explicit, registered, entry points, generic), the
probe leaves the model untouched, and failures list what was tried. Torch-only models; the
timm integration's lazy loading is checked in tests/integrations/test_timm.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TinyCNN, TinyResNet, assert_identity, images, randomize_head
from torch import nn

import cam_plugin as cp
from cam_plugin import registry


class DictNet(nn.Module):
    """Returns a dict: the generic probe cannot read it; an adapter with output_fn can."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.pool(self.body(x)).flatten(1))}


def test_entry_point_adapter_is_loaded(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pkg = tmp_path / "dictnet_cam"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            import cam_plugin as cp

            def register():
                def factory(model):
                    if type(model).__name__ != "DictNet":
                        return None
                    return cp.Adapter(
                        feature_module=model.body, head=[("fc", model.fc)],
                        input_size=(3, 8, 8), output_fn=lambda out: out["logits"],
                    )
                cp.register_adapter(lambda m: type(m).__name__ == "DictNet", factory,
                                    name="dictnet-entry-point")
            """
        )
    )
    dist = tmp_path / "dictnet_cam-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dictnet-cam\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[cam_plugin.adapters]\ndictnet = dictnet_cam:register\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    saved = list(registry._REGISTRY)
    try:
        model = randomize_head(DictNet()).eval()
        res = cp.CAM(model)(images(2, 8), targets="all")
        assert "dictnet-entry-point" in cp.registered_adapters()
        assert res.maps.shape == (2, 4, 8, 8)
        scale = max(1.0, float(res.logits.abs().max()))
        assert float(res.identity_residual().abs().max()) <= 1e-4 * scale
    finally:
        registry._REGISTRY[:] = saved


def test_explicit_adapter_and_output_fn() -> None:
    model = randomize_head(DictNet()).eval()
    adapter = cp.Adapter(
        feature_module=model.body,
        head=[model.fc],
        input_size=(3, 8, 8),
        output_fn=lambda out: out["logits"],
    )
    res = cp.CAM(model, adapter=adapter)(images(3, 8), topk=2)
    assert res.classes.shape == (3, 2)
    with torch.no_grad():
        torch.testing.assert_close(res.logits, model(images(3, 8))["logits"])


def test_probe_restores_train_mode_and_rng() -> None:
    model = randomize_head(TinyResNet(num_classes=4))
    model.train()
    bn = model.stem[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
    stats = bn.running_mean.clone()
    rng = torch.get_rng_state()
    adapter = cp.resolve(model, input_size=(3, 16, 16))  # probe runs in eval mode, restores
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(bn.running_mean, stats)
    assert torch.equal(torch.get_rng_state(), rng)
    assert adapter.feature_name == "layer2"


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
        assert isinstance(m, Net)
        calls.append(m)
        return cp.Adapter(feature_module=m.features, head=[("fc", m.fc)], input_size=(3, 8, 8))

    cp.register_adapter(Net, factory, name="test-net")
    try:
        res = cp.CAM(model)(images(2, 8), targets="all")
        assert calls and "test-net" in cp.registered_adapters()
        assert_identity(res)
    finally:
        registry._REGISTRY[:] = [e for e in registry._REGISTRY if e.name != "test-net"]


def test_model_adapter_method_comes_first() -> None:
    class Own(TinyCNN):
        def __cam_adapter__(self) -> cp.Adapter:
            return cp.Adapter(feature_module=self.features, head=[("fc", self.fc)], name="own")

    assert cp.resolve(Own().eval(), allow_probe=False).name == "own"


def test_resolve_refuses_what_is_not_a_model_or_an_example() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        cp.resolve("resnet18")  # type: ignore[arg-type]
    with pytest.raises(cp.CAMInputError, match="example must be a tensor"):
        cp.resolve(TinyCNN(), example=[[0.0]])  # type: ignore[arg-type]


def test_a_torch_model_loads_no_integration() -> None:
    """A plain torch model resolves through the generic reading: no integration module (and
    no framework) is imported for it."""
    code = (
        "import sys, torch, cam_plugin as cp\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),\n"
        "                        torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()\n"
        "r = cp.CAM(m)(torch.randn(1, 3, 12, 12))\n"
        "loaded = sorted(n for n in sys.modules if n.startswith('cam_plugin.integrations'))\n"
        "heavy = {n.split('.')[0] for n in sys.modules} & {'timm', 'torchvision', 'captum'}\n"
        "print(loaded, sorted(heavy), tuple(r.maps.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[] [] (1, 1, 10, 10)"
