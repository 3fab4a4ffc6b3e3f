"""The settings of one scoreboard run: every field of :class:`Config` is a command-line flag.

``python -m benchmarks.compare`` runs :data:`FULL` (the numbers on ``docs/cam-vs-others.md``),
``--quick`` runs :data:`QUICK` (a smoke run that writes no docs, used by the tests).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]

#: every method of the scoreboard, in table order (see :mod:`benchmarks.compare.methods`)
METHODS = (
    "CAM",
    "GradCAM",
    "GradCAM++",
    "ScoreCAM",
    "LayerCAM",
    "LayerGradCam",
    "IntegratedGradients",
    "Saliency",
    "InputXGradient",
    "Occlusion",
    "centre Gaussian",
    "brightness",
)

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "motorcycle")


@dataclass(frozen=True)
class Config:
    """One run. Sizes are pixels; ``*_steps`` / ``*_samples`` are counts."""

    photos: tuple[str, ...] = ("chelsea", "coffee", "astronaut")
    size: int = 224
    photo_skip: tuple[str, ...] = ("ScoreCAM",)
    figures: tuple[str, ...] = ("chelsea", "coffee", "astronaut")
    ig_steps: int = 8
    occlusion_window: int = 32
    occlusion_stride: int = 32
    scorecam_batch: int = 128
    # faithfulness metrics (cam_plugin.evaluate)
    di_steps: int = 16
    road_percentiles: tuple[float, ...] = (20.0, 40.0, 60.0, 80.0)
    random_layers: tuple[str, ...] = ("classifier", "conv_head", "blocks.6")
    random_photos: int = 1
    # Captum's metrics (photos)
    infid_samples: int = 4
    noise_std: float = 0.1
    square: int = 48
    sens_samples: int = 2
    sens_radius: float = 0.02
    sens_photos: int = 1
    # cluttered digits
    digits: bool = True
    digits_recipe: str = "full"
    digits_steps: int = 0
    digits_train: int = 0
    digits_test: int = 50
    digits_batch: int = 20
    digits_checkpoint: str = "outputs/compare/digits_gap_model.pt"
    digits_occlusion_window: int = 16
    digits_occlusion_stride: int = 8
    digits_random_layers: tuple[str, ...] = (
        "fc",
        "neck",
        "backbone.model.layer2",
    )
    digits_random_images: int = 8
    pointing_tolerance: float = 4.0
    # the rest
    bridge: bool = True
    threads: int = 2
    seed: int = 0
    out_dir: str = "outputs/compare"
    json_out: Optional[str] = "benchmarks/results/compare.json"
    docs: bool = True


FULL = Config()

QUICK = Config(
    photos=("coffee",),
    size=64,
    figures=("coffee",),
    ig_steps=2,
    occlusion_window=32,
    occlusion_stride=32,
    di_steps=2,
    road_percentiles=(50.0,),
    random_layers=("classifier",),
    infid_samples=2,
    sens_samples=1,
    digits_steps=2,
    digits_train=64,
    digits_test=4,
    digits_batch=4,
    digits_occlusion_window=32,
    digits_occlusion_stride=32,
    digits_checkpoint="outputs/compare/quick_digits.pt",
    digits_random_layers=("fc",),
    digits_random_images=2,
    bridge=False,
    json_out=None,
    docs=False,
)


def parse_args(argv: Optional[list[str]] = None) -> Config:
    """The configuration of the command line: ``--quick`` picks :data:`QUICK`, every other
    flag overrides one field (``--no-docs``, ``--photos chelsea coffee``, ...)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="CAM vs the others: maps, faithfulness, localization and time per image.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (small settings)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif kind.startswith("tuple"):
            parser.add_argument(flag, nargs="*", default=None)
        elif kind == "float":
            parser.add_argument(flag, type=float, default=None)
        elif kind == "int":
            parser.add_argument(flag, type=int, default=None)
        else:
            parser.add_argument(flag, default=None)
    args = vars(parser.parse_args(argv))
    cfg = QUICK if args.pop("quick") else FULL
    over: dict[str, Any] = {}
    for f in fields(Config):
        value = args.get(f.name)
        if value is None:
            continue
        if str(f.type).startswith("tuple[float"):
            value = tuple(float(v) for v in value)
        elif str(f.type).startswith("tuple"):
            value = tuple(value)
        over[f.name] = value
    return replace(cfg, **over)
