"""``cam-plugin run`` and ``explain`` on a HuggingFace transformers classifier (issue 15):
a tiny random ResNet saved with ``save_pretrained`` and its ``ConvNextImageProcessor``,
loaded through the one model loader (``--model hf:DIR`` or the directory itself), its
processor recorded in run.json / results.json and used for the input; the saved maps equal
CAM on the same image through that processor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("zarr")

from cam_plugin.cli import main  # noqa: E402

transformers.logging.set_verbosity_error()
SIZES = [(60, 100), (80, 64), (64, 64), (50, 90)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny ResNet (6 classes) with its image processor, and a folder of photos."""
    root = tmp_path_factory.mktemp("hf-run")
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=6
    )
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config).eval()
    with torch.no_grad():  # a non-trivial head: different maps per class
        model.classifier[1].weight.normal_(0, 1.0)
        model.classifier[1].bias.normal_(0, 0.5)
    model.save_pretrained(root / "model")
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    processor.save_pretrained(root / "model")
    (root / "photos").mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "photos" / f"{i}.png")
    return root


def _model(hf_dir: Path) -> Any:
    return transformers.AutoModelForImageClassification.from_pretrained(hf_dir / "model").eval()


def test_run_on_an_hf_directory_equals_cam_through_its_processor(hf_dir: Path) -> None:
    import cam_plugin as cp
    from cam_plugin.run import read_maps

    out = hf_dir / "run"
    args = ["run", "--data", str(hf_dir / "photos"), "--out", str(out), "--workers", "0"]
    assert main([*args, "--model", f"hf:{hf_dir / 'model'}", "--targets", "all"]) == 0
    assert (out / "boxes.json").is_file() and (out / "manifest.parquet").is_file()
    meta = json.loads((out / "run.json").read_text())
    pre = meta["preprocessing"]
    assert pre["processor"]["image_processor_type"] == "ConvNextImageProcessor"
    assert pre["input_size"] == [3, 64, 64] and "preprocessor_config.json" in pre["source"]
    assert meta["model"]["weights"] == "pretrained"
    assert meta["model"]["adapter"].startswith("transformers:ResNetForImageClassification")
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * len(SIZES)
    processor = transformers.AutoImageProcessor.from_pretrained(hf_dir / "model")
    cam = cp.CAM(_model(hf_dir))
    for row in rows:
        photo = Image.open(hf_dir / "photos" / Path(row["name"]).name).convert("RGB")
        x = processor(images=photo, return_tensors="pt")["pixel_values"]
        res = cam(x, targets=torch.tensor([row["map_classes"]]))
        saved = torch.from_numpy(read_maps(out, row))
        torch.testing.assert_close(saved, res.maps[0], rtol=1e-4, atol=1e-4)
        assert row["top_classes"][0] == int(res.logits.argmax())
        assert (row["height"], row["width"]) == (photo.height, photo.width)
    boxes = json.loads((out / "boxes.json").read_text())
    assert boxes and all(len(b["bbox"]) == 4 for b in boxes)


def test_explain_on_an_hf_directory(hf_dir: Path) -> None:
    """``explain`` with the directory itself as the model (it holds a config.json)."""
    import cam_plugin as cp

    out = hf_dir / "explain"
    photos = [str(hf_dir / "photos" / f"{i}.png") for i in range(2)]
    assert main(["explain", *photos, "--model", str(hf_dir / "model"), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["preprocessing"]["processor"]["size"] == {"shortest_edge": 64}
    assert results["counts"]["explained"] == 2
    processor = transformers.AutoImageProcessor.from_pretrained(hf_dir / "model")
    model = _model(hf_dir)
    cam: Any = cp.CAM(model, preprocess=processor)
    res = cam([Image.open(p) for p in photos], topk=1)
    records = results["images"]
    for record, cls in zip(records, res.classes[:, 0].tolist()):
        assert record["topk"][0]["class"] == cls
        assert record["original_size"] == list(Image.open(record["path"]).size[::-1])
    assert (out / "0.png").is_file()


def test_hf_model_spec_mistakes_are_one_line(
    hf_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["explain", str(hf_dir / "photos" / "0.png"), "--out", str(hf_dir / "bad")]
    assert main([*args, "--model", f"hf:{hf_dir / 'photos'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transformers cannot load an image classifier" in err[0], err


def test_a_warping_processor_maps_boxes_back_per_axis(hf_dir: Path) -> None:
    """A ViT-style processor resizes every photo to 64 x 64 (the aspect ratio changes): the
    manifest's boxes are the input boxes scaled back by w0 / 64 in x and h0 / 64 in y."""
    import shutil

    from cam_plugin.run import image_placement, maps_on_image, read_maps, run_placement

    model_dir = hf_dir / "warp-model"
    shutil.copytree(hf_dir / "model", model_dir, dirs_exist_ok=True)
    (model_dir / "preprocessor_config.json").unlink()
    vit = transformers.ViTImageProcessor(size={"height": 64, "width": 64})
    vit.save_pretrained(model_dir)
    out = hf_dir / "warp-run"
    args = ["run", "--data", str(hf_dir / "photos"), "--out", str(out), "--workers", "0"]
    assert main([*args, "--model", f"hf:{model_dir}"]) == 0
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    placement = run_placement(out)
    for row in rows:
        h0, w0 = row["height"], row["width"]
        assert row["scale"] == pytest.approx(64 / w0) and row["scale_y"] == pytest.approx(64 / h0)
        for (x0, y0, x1, y1), box in zip(row["boxes_input"], row["boxes"]):
            by_hand = [x0 * w0 / 64, y0 * h0 / 64, (x1 + 1) * w0 / 64, (y1 + 1) * h0 / 64]
            np.testing.assert_allclose(box, by_hand, atol=0.01)
        # on the original image, cell i is centred at (o + s·i + 0.5)·w0/64 − 0.5 (y: h0)
        where = image_placement(placement, row["scale"], row["left"], row["top"], row["scale_y"])
        (oy, ox), (sy, sx) = placement.offset, placement.stride
        assert where.offset == pytest.approx(
            ((oy + 0.5) * h0 / 64 - 0.5, (ox + 0.5) * w0 / 64 - 0.5)
        )
        assert where.stride == pytest.approx((sy * h0 / 64, sx * w0 / 64))
        maps = read_maps(out, row)
        assert tuple(maps_on_image(maps, row, placement).shape) == (len(maps), h0, w0)


def test_class_names_and_count_come_from_the_hf_config(hf_dir: Path) -> None:
    from cam_plugin.models import class_names, model_num_classes

    model = _model(hf_dir)
    assert model_num_classes(model) == 6
    assert class_names(6, model) == [str(i) for i in range(6)]  # LABEL_i placeholders
    model.config.id2label = {i: name for i, name in enumerate("abcdef")}
    assert class_names(6, model) == list("abcdef")
    assert class_names(5, model) == [str(i) for i in range(5)]  # not this model's table
