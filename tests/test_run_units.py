"""``cam-plugin run --units N``: per-unit top patches over a data set (paper Sec. 5, issue 14).

A folder of 10 non-square noise pictures and timm's ``test_resnet`` (random weights saved as
a checkpoint, so the test can rebuild the very model): the index must list, for each drawn
class, its top units by ``W'_ck`` and, for each unit, the images where its unit map peaks
highest, with the cell, the box on the input around the cell's traced centre and that box
in original-image pixels -- all checked against a direct computation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("zarr")

import cam_plugin as cp  # noqa: E402
from cam_plugin.cli import main  # noqa: E402
from cam_plugin.images import decode_image  # noqa: E402
from cam_plugin.preprocess import DataConfig, Preprocess  # noqa: E402
from cam_plugin.tracing import feature_placement  # noqa: E402
from cam_plugin.unit_patches import box_to_original, patch_boxes  # noqa: E402
from cam_plugin.units import class_units, unit_maps  # noqa: E402

NUM = 10
SIZE = 96


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("units-run")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(NUM):
        pic = rng.integers(0, 255, (80, 110, 3), dtype=np.uint8)
        pic[10 + 5 * i : 30 + 5 * i, 20 + 6 * i : 40 + 6 * i] = 255  # a bright square
        Image.fromarray(pic).save(root / "imgs" / f"{i:02d}.png")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    torch.nn.init.normal_(model.get_classifier().weight, std=0.5)
    torch.save(model.state_dict(), root / "w.pth")
    return root


def args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--data",
        str(root / "imgs"),
        "--out",
        str(out),
        "--model",
        "test_resnet",
        "--num-classes",
        "5",
        "--checkpoint",
        str(root / "w.pth"),
        "--input-size",
        str(SIZE),
        "--workers",
        "0",
        *extra,
    ]


UNITS = ["--units", "3", "--unit-patches", "4", "--unit-classes", "0,2"]


@pytest.fixture(scope="module")
def run_dir(folder: Path) -> Path:
    out = folder / "out"
    assert main(args(folder, out, *UNITS, "--shard-size", "4", "--batch-size", "3")) == 0
    return out


def test_index_matches_a_direct_computation(folder: Path, run_dir: Path) -> None:
    doc = json.loads((run_dir / "units" / "index.json").read_text())
    model = timm.create_model("test_resnet", num_classes=5)
    model.load_state_dict(torch.load(folder / "w.pth", weights_only=True))
    model.eval()
    config = DataConfig.for_model(model).with_overrides(SIZE, None)
    prep = [Preprocess(config)(decode_image(folder / "imgs" / f"{i:02d}.png")) for i in range(NUM)]
    x = torch.stack([p.tensor for p in prep])
    adapter = cp.resolve(model, example=x[:1])
    head = adapter.fold()
    with torch.no_grad():
        u = unit_maps(head, model.forward_features(x))  # (N, K, h, w)
    placement = feature_placement(model, (3, SIZE, SIZE), adapter=adapter)
    peak = u.flatten(2).amax(2)
    assert [c["class"] for c in doc["classes"]] == [0, 2]
    ranked = class_units(head, [0, 2], top=3).tolist()
    for entry, units in zip(doc["classes"], ranked):
        assert (run_dir / entry["picture"]).exists()
        assert [e["unit"] for e in entry["units"]] == units
        weights = [e["weight"] for e in entry["units"]]
        assert weights == sorted(weights, reverse=True)
        for e in entry["units"]:
            k = e["unit"]
            want = sorted(range(NUM), key=lambda i: (-float(peak[i, k]), i))[:4]
            assert [p["index"] for p in e["patches"]] == want
            for p in e["patches"]:
                i = p["index"]
                assert p["activation"] == pytest.approx(float(peak[i, k]), abs=1e-4)
                r, c = p["cell"]
                assert float(u[i, k, r, c]) == pytest.approx(float(peak[i, k]), abs=1e-5)
                box = patch_boxes(torch.tensor([[r, c]]), placement, 2.0)[0].tolist()
                assert p["box_input"] == pytest.approx(box)
                orig = box_to_original(box, prep[i].scale, prep[i].left, prep[i].top)
                assert p["box"] == pytest.approx(orig.tolist(), abs=0.01)
                assert p["name"] == f"{i:02d}.png"
    table = pq.read_table(run_dir / "units" / "patches.parquet")
    assert table.num_rows == 2 * 3 * 4
    assert set(table.column_names) >= {"class", "unit", "weight", "index", "path", "box", "cell"}
    picture = np.asarray(Image.open(run_dir / doc["classes"][0]["picture"]))
    assert picture.ndim == 3 and picture.shape[0] > 3 * 80
    run = json.loads((run_dir / "run.json").read_text())
    assert run["units"]["index"] == "units/index.json"
    assert (run_dir / "shards" / "00000" / "units.npz").exists()


def test_the_split_does_not_change_the_patches(folder: Path, run_dir: Path) -> None:
    one = folder / "one-shard"
    assert main(args(folder, one, *UNITS, "--shard-size", "64", "--batch-size", "8")) == 0
    a = json.loads((run_dir / "units" / "index.json").read_text())
    b = json.loads((one / "units" / "index.json").read_text())
    assert a["classes"] == b["classes"]


def test_redraw_on_resume_and_refusal_of_another_state(
    folder: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    again = [*UNITS[:1], "2", *UNITS[2:4], "--unit-classes", "1"]
    assert main(args(folder, run_dir, *again, "--shard-size", "4", "--batch-size", "3")) == 0
    doc = json.loads((run_dir / "units" / "index.json").read_text())
    assert [c["class"] for c in doc["classes"]] == [1]
    assert len(doc["classes"][0]["units"]) == 2
    auto = ["--units", "1", "--unit-patches", "4"]
    assert main(args(folder, run_dir, *auto, "--shard-size", "4", "--batch-size", "3")) == 0
    doc = json.loads((run_dir / "units" / "index.json").read_text())
    top1 = [
        r[0] for r in pq.read_table(run_dir / "manifest.parquet").column("top_classes").to_pylist()
    ]
    counts = np.bincount(top1)
    want = sorted(np.nonzero(counts)[0].tolist(), key=lambda c: (-counts[c], c))
    assert [c["class"] for c in doc["classes"]] == want  # auto: the most frequent top-1
    other = ["--units", "3", "--unit-patches", "5"]
    assert main(args(folder, run_dir, *other, "--shard-size", "4", "--batch-size", "3")) == 2
    assert "unit_patches" in capsys.readouterr().err


def test_bad_unit_options(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad, match in (
        (["--units", "-1"], "--units"),
        (["--units", "2", "--unit-patches", "0"], "--unit-patches"),
        (["--units", "2", "--unit-classes", "x"], "--unit-classes"),
        (["--units", "2", "--unit-classes", "7"], "not a class of the model"),
    ):
        assert main(args(folder, tmp_path / "bad", *bad)) == 2
        assert match in capsys.readouterr().err
