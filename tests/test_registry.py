"""Adapter resolution: lazy integrations, entry points, explicit adapters."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from helpers import images, randomize_head
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


def test_timm_integration_loads_lazily_by_class_module() -> None:
    code = (
        "import sys, timm, cam_plugin as cp, torch\n"
        "assert 'cam_plugin.integrations.timm' not in sys.modules\n"
        "m = timm.create_model('resnet18', num_classes=3).eval()\n"
        "a = cp.resolve(m)\n"
        "assert 'cam_plugin.integrations.timm' in sys.modules\n"
        "assert 'cam_plugin.integrations.torchvision' not in sys.modules\n"
        "print(a.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("timm:resnet18")


def test_layout_grid_error_is_clear() -> None:
    layout = cp.FeatureLayout("tokens", num_prefix_tokens=1, grid=(3, 3))
    try:
        layout.to_nchw(torch.zeros(1, 11, 4))
    except cp.CAMInputError as err:
        assert "10 patch tokens" in str(err) and "grid" in str(err)
    else:  # pragma: no cover
        raise AssertionError("expected CAMInputError")
