"""``cam-plugin run`` / ``evaluate`` on generated digits-in-clutter files (issue 12).

Most runs call :func:`cam_plugin.cli.main` in this process (a run of 200 images at 64 px
with the tiny ``module:function`` CNN takes about a second); the kill / torchrun tests start
real processes. Files come from :mod:`test_run_data` (one session folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_run_data import NUM_IMAGES, run_data

from cam_plugin.cli import main

pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("zarr")

SMALL = ["--input-size", "64", "--crop-pct", "1.0", "--model", "tinynets:tiny"]


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (tmp_path_factory.getbasetemp() / "run-data").mkdir(exist_ok=True)
    return run_data(tmp_path_factory)


@pytest.fixture(autouse=True)
def _importable(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.chdir(root)
    (root / "list40.txt").write_text("".join(f"images/{i:04d}.jpg\n" for i in range(40)))


def cli_run(data: str, out: Path, *extra: str) -> int:
    args = ["run", "--data", data, "--out", str(out), *SMALL, "--workers", "0", *extra]
    return main(args)


def rows(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


@pytest.fixture(scope="session")
def coco_run(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco-run") / "out"
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(root))
    mp.chdir(root)
    try:
        assert cli_run("coco.json", out, "--shard-size", "64", "--batch-size", "16") == 0
    finally:
        mp.undo()
    return out


# -- outputs ----------------------------------------------------------------------------------
def test_mixed_folder_records_failures_and_keeps_every_name(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = cli_run(
        "mixed",
        out,
        "--workers",
        "2",
        "--overlays",
        "-1",
        "--float16",
        "--shard-size",
        "5",
        "--batch-size",
        "2",
        "--topk",
        "2",
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "2 of 15 inputs could not be read" in err and "exit status 3" in err
    table = {r["name"]: r for r in rows(out)}
    assert len(table) == 15 and [r["index"] for r in rows(out)] == list(range(15))
    failed = {n for n, r in table.items() if r["status"] == "failed"}
    assert failed == {"odd/corrupt.jpg", "odd/text.png"}
    assert all(table[n]["reason"] and table[n]["maps_row"] == -1 for n in failed)
    assert {"a/same.jpg", "b/same.jpg"} <= set(table)
    assert table["a/same.jpg"]["top_logits"] != table["b/same.jpg"]["top_logits"]
    assert json.loads(table["odd/deep16.png"]["decode"])["bits"] == 16
    ok = [r for r in table.values() if r["status"] == "ok"]
    overlays = {r["overlay"] for r in ok}
    assert len(overlays) == len(ok) and all((out / o).is_file() for o in overlays)
    for r in ok:
        assert len(r["box_classes"]) == 2 and r["box_classes"] == r["top_classes"][:2]
        for x0, y0, x1, y1 in r["boxes"]:
            assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]
    meta = json.loads((out / "run.json").read_text())
    assert meta["counts"] == {
        "images": 15,
        "ok": 13,
        "failed": 2,
        "shards": 3,
        "shards_computed_now": 3,
        "images_computed_now": 15,
    }
    assert meta["maps"]["dtype"] == "float16" and meta["status"] == "complete"
    import zarr

    arr = zarr.open_array(str(out / ok[0]["maps_store"]), mode="r")
    assert arr.dtype == np.float16 and arr.shape[1:] == (2, 8, 8)


def test_boxes_json_is_read_by_pycocotools(root: Path, coco_run: Path) -> None:
    coco = pytest.importorskip("pycocotools.coco")
    from pycocotools.cocoeval import COCOeval

    gt = coco.COCO(str(root / "coco.json"))
    dt = gt.loadRes(str(coco_run / "boxes.json"))
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    assert len(dt.getAnnIds()) == NUM_IMAGES * 2  # top-1 and ground-truth boxes
    assert set(dt.getCatIds()) <= set(range(1, 11))
    own = coco.COCO(str(coco_run / "boxes_coco.json"))  # the tables with the same boxes
    ev = COCOeval(own, own.loadRes(str(coco_run / "boxes.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_saved_maps_placed_with_the_metadata_equal_cam(root: Path, coco_run: Path) -> None:
    from tinynets import tiny  # type: ignore[import-not-found]

    from cam_plugin import CAM
    from cam_plugin.images import decode_image
    from cam_plugin.placement import place_maps
    from cam_plugin.preprocess import DataConfig, Preprocess
    from cam_plugin.run import maps_on_image, read_maps, run_placement

    meta = json.loads((coco_run / "run.json").read_text())
    pre = Preprocess(
        DataConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()}
        )
    )
    placement = run_placement(coco_run)
    model = tiny().eval()
    cam = CAM(model, placement=True)
    for row in rows(coco_run)[::37]:
        image = pre(decode_image(root / row["name"])).tensor[None]
        res = cam(image, targets=torch.tensor([row["map_classes"]]))
        saved = torch.from_numpy(read_maps(coco_run, row))
        torch.testing.assert_close(saved, res.maps[0], rtol=1e-5, atol=1e-5)
        up = res.upsample().maps[0]
        torch.testing.assert_close(place_maps(saved, (64, 64), placement), up, atol=1e-5, rtol=1e-5)
        # the image is the crop here (64 px, crop 1.0): the original frame is the same
        torch.testing.assert_close(maps_on_image(saved, row, placement), up, atol=1e-5, rtol=1e-5)
        assert row["top_classes"][0] == int(res.logits.argmax())


def test_every_input_kind(root: Path, coco_run: Path, tmp_path: Path) -> None:
    (root / "list.txt").write_text(
        "# ten images\n" + "".join(f"images/{i:04d}.jpg\n" for i in range(10))
    )
    ref = {Path(r["name"]).name: r for r in rows(coco_run)}
    kinds = {
        "folder": "images",
        "glob": "images/000*.jpg",
        "list": "list.txt",
        "wsol": "wsol",
        "imagefolder": "imagefolder",
        "dataset": "tinynets:digits",
    }
    for kind, spec in kinds.items():
        out = tmp_path / kind
        extra = ["--data-format", "imagefolder"] if kind == "imagefolder" else []
        extra += ["--data-root", str(root)] if kind == "wsol" else []
        assert cli_run(spec, out, *extra) == 0, kind
        got = rows(out)
        meta = json.loads((out / "run.json").read_text())
        assert meta["data"]["kind"] == kind
        want = {
            "folder": NUM_IMAGES,
            "glob": 10,
            "list": 10,
            "wsol": NUM_IMAGES,
            "imagefolder": 30,
            "dataset": 40,
        }[kind]
        assert len(got) == want, kind
        if kind == "dataset":
            assert got[0]["name"] == "0000000" and len(got[0]["labels"]) == 1
            continue
        for r in got[:: max(1, len(got) // 7)]:
            same = ref[Path(r["name"]).name]
            assert r["top_classes"] == same["top_classes"], (kind, r["name"])
            if kind in ("wsol", "imagefolder"):
                assert r["labels"] == same["labels"], kind
                assert r["map_classes"][-1] == same["labels"][0]
    assert rows(coco_run)[0]["image_id"] == 100  # COCO's own ids


def test_timm_checkpoint_and_torchvision_model(root: Path, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    (root / "four.txt").write_text("".join(f"images/{i:04d}.jpg\n" for i in range(4)))
    net = timm.create_model("resnet18", num_classes=10)
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}},
        tmp_path / "ckpt.pth",
    )
    base = ["run", "--data", "four.txt", "--input-size", "64", "--workers", "0"]
    code = main(
        [
            *base,
            "--out",
            str(tmp_path / "timm"),
            "--model",
            "resnet18",
            "--num-classes",
            "10",
            "--checkpoint",
            str(tmp_path / "ckpt.pth"),
        ]
    )
    assert code == 0
    got = rows(tmp_path / "timm")
    logits = net.eval()(torch.zeros(1, 3, 64, 64))
    assert logits.shape[1] == 10 and all(max(r["top_classes"]) < 10 for r in got)
    assert (
        json.loads((tmp_path / "timm" / "run.json").read_text())["model"]["weights"] == "checkpoint"
    )
    code = main(
        [
            *base,
            "--out",
            str(tmp_path / "tv"),
            "--model",
            "torchvision:resnet18",
            "--num-classes",
            "7",
        ]
    )
    assert code == 0
    assert all(max(r["top_classes"]) < 7 for r in rows(tmp_path / "tv"))


# -- resume and refusal ---------------------------------------------------------------------
def test_rerun_recomputes_nothing_and_other_settings_are_refused(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert cli_run("images/00[0-3]*.jpg", out, "--shard-size", "10") == 0
    markers = sorted((out / "shards").glob("*/DONE.json"))
    stamps = [m.stat().st_mtime_ns for m in markers]
    capsys.readouterr()
    assert cli_run("images/00[0-3]*.jpg", out, "--shard-size", "10") == 0
    assert "computed 0 now" in capsys.readouterr().out
    assert [m.stat().st_mtime_ns for m in sorted(markers)] == stamps
    assert cli_run("images/00[0-3]*.jpg", out, "--shard-size", "10", "--topk", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (topk: 1 -> 3)" in err[0]
    # a shard folder without its marker (a crash mid-rename) is recomputed
    (out / "shards" / "00001" / "DONE.json").unlink()
    shutil.rmtree(out / "shards" / "00001" / "maps.zarr")
    assert cli_run("images/00[0-3]*.jpg", out, "--shard-size", "10") == 0
    assert "computed 10 now" in capsys.readouterr().out


def test_compile_and_channels_last_give_the_plain_runs_maps(root: Path, tmp_path: Path) -> None:
    from cam_plugin.run import read_maps

    plain, fast = tmp_path / "plain", tmp_path / "fast"
    assert cli_run("images/000*.jpg", plain, "--batch-size", "4") == 0
    assert (
        cli_run("images/000*.jpg", fast, "--batch-size", "4", "--compile", "--channels-last") == 0
    )
    assert json.loads((fast / "run.json").read_text())["speed"] == {
        "channels_last": True,
        "compile": True,
    }
    a, b = rows(plain), rows(fast)
    assert [r["name"] for r in a] == [r["name"] for r in b] and len(a) == 10
    for ra, rb in zip(a, b):
        assert ra["map_classes"] == rb["map_classes"]
        np.testing.assert_allclose(read_maps(fast, rb), read_maps(plain, ra), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "no/such/folder"], "no such file or folder"),
        (["--data", "broken.json"], "cannot read the annotation file"),
        (["--data", "coco.json", "--num-classes", "5"], "outside the model's 5 classes"),
        (["--data", "images", "--targets", "gt"], "needs ground-truth classes"),
        (["--data", "wsol", "--data-root", "nowhere"], "pass --data-root"),
    ],
)
def test_user_mistakes_are_one_line(
    root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    needle: str,
) -> None:
    (root / "broken.json").write_text("{not json")
    code = main(["run", *args, "--out", str(tmp_path / "o"), *SMALL, "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_unwritable_out_is_refused_before_the_model_loads(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_run("images", blocker / "out") == 2
    assert "not a writable folder" in capsys.readouterr().err


# -- evaluate ---------------------------------------------------------------------------------
def test_evaluate_equals_evaluate_wsol_on_the_same_maps(root: Path, coco_run: Path) -> None:
    from cam_plugin.metrics import evaluate_wsol
    from cam_plugin.result import minmax_normalize
    from cam_plugin.run import maps_on_image, read_maps, run_placement

    for gt in ("coco.json", "wsol"):
        extra = ["--data-root", str(root)] if gt == "wsol" else []
        assert main(["evaluate", str(coco_run), "--gt", gt, "--worst", "3", *extra]) == 0
        got = json.loads((coco_run / "evaluation" / "metrics.json").read_text())
        placement = run_placement(coco_run)
        coco = json.loads((root / "coco.json").read_text())
        masks_by_image = {a["image_id"]: a["segmentation"] for a in coco["annotations"]}
        maps, boxes, labels, preds, top5, masks = [], [], [], [], [], []
        lines = (root / "wsol" / "localization.txt").read_text().splitlines()
        box_of = {ln.split(",")[0]: [int(v) for v in ln.split(",")[1:]] for ln in lines}
        for r in rows(coco_run):
            slot = r["map_classes"].index(r["labels"][0])
            m = maps_on_image(read_maps(coco_run, r)[slot : slot + 1], r, placement)
            maps.append(minmax_normalize(m)[0])
            boxes.append(np.asarray([box_of[r["name"]]]))
            labels.append(r["labels"][0])
            preds.append(r["top_classes"][0])
            top5.append(r["top_classes"][:5])
            from pycocotools import mask as cocomask

            masks.append(cocomask.decode(masks_by_image[r["image_id"]]))
        want = evaluate_wsol(
            torch.stack(maps),
            boxes,
            labels=labels,
            pred_classes=preds,
            top5_classes=np.asarray(top5),
            gt_masks=np.stack(masks) if gt == "coco.json" else None,
        )
        assert got["metrics"].pop("Top-1 Cls (all samples)") == pytest.approx(want["Top-1 Cls"])
        assert got["metrics"] == pytest.approx(want), gt
        assert got["counts"]["samples"] == NUM_IMAGES
        assert len(list((coco_run / "evaluation" / "worst").glob("*.png"))) == 3
        report = (coco_run / "evaluation" / "report.md").read_text()
        assert "| MaxBoxAccV2 |" in report and "worst/00.png" in report


def test_full_disk_keeps_finished_shards_and_the_rerun_resumes(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from cam_plugin.run.outputs import ShardBuffer

    write = ShardBuffer.write

    def full_at_shard_2(self: ShardBuffer, *args: Any) -> Any:
        if self.shard == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, *args)

    monkeypatch.setattr(ShardBuffer, "write", full_at_shard_2)
    out = tmp_path / "out"
    assert cli_run("list40.txt", out, "--shard-size", "8") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "resume" in err[0]
    assert sorted(p.parent.name for p in out.glob("shards/*/DONE.json")) == ["00000", "00001"]
    assert not list((out / ".tmp").iterdir())
    monkeypatch.setattr(ShardBuffer, "write", write)
    assert cli_run("list40.txt", out, "--shard-size", "8") == 0
    assert "computed 24 now" in capsys.readouterr().out
    assert len(rows(out)) == 40


def test_evaluate_with_imagefolder_labels_gives_classification_only(
    root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert cli_run("imagefolder", out, "--data-format", "imagefolder", "--targets", "gt") == 0
    assert main(["evaluate", str(out)]) == 0
    got = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert list(got["metrics"]) == ["Top-1 Cls (all samples)"]
    assert got["counts"]["samples"] == 30
    right = [r["top_classes"][0] == r["labels"][0] for r in rows(out)]
    assert got["metrics"]["Top-1 Cls (all samples)"] == pytest.approx(100 * np.mean(right))
