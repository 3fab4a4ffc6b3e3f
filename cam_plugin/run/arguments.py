"""The command-line options of ``cam-plugin run`` and ``cam-plugin evaluate``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .compute import TARGET_MODES
from .datasets import DATA_KINDS
from .engines import ENGINES

__all__ = ["add_evaluate_parser", "add_run_parser"]

RUN_EPILOG = (
    "exit status: 0 every image has its maps; 3 the run finished and some inputs could not "
    "be read (status 'failed' in manifest.parquet); 2 a usage mistake (one line on stderr); "
    "1 an unexpected error; 130 interrupted. Rerunning the same command resumes; another "
    "model or configuration into the same --out is refused. Multi-process: torchrun "
    "--nproc-per-node N -m cam_plugin run ...; Ray: --engine ray."
)


def add_run_parser(sub: Any, add_model_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """The ``run`` sub-command."""
    p = sub.add_parser(
        "run",
        help="maps, classes and boxes for a whole data set (sharded, resumable)",
        epilog=RUN_EPILOG,
    )
    p.add_argument(
        "--data",
        required=True,
        help="folder, glob, list file, COCO JSON, "
        "wsolevaluation metadata folder, or module:function returning a Dataset",
    )
    p.add_argument(
        "--data-format",
        default="auto",
        choices=DATA_KINDS,
        help="force the kind of --data (imagefolder: class = folder name)",
    )
    p.add_argument("--data-root", default=None, help="folder the annotation paths are under")
    p.add_argument("--out", required=True, help="run folder (created; resumed if it exists)")
    add_model_options(p)
    p.add_argument(
        "--targets",
        default="auto",
        help=f"{', '.join(TARGET_MODES)} or class "
        "indices '3,5' (auto: topk+gt when the data has labels, else topk)",
    )
    p.add_argument("--topk", type=int, default=1, help="top classes with maps (default 1)")
    p.add_argument("--threshold", type=float, default=0.2, help="box threshold (of the max)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (0: in this one)")
    p.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    p.add_argument("--float16", action="store_true", help="store the maps as float16")
    p.add_argument(
        "--overlays",
        type=int,
        default=0,
        help="PNG overlays (original size) for the first N images; -1 for all",
    )
    p.add_argument("--input-size", type=int, default=None, help="square input size override")
    p.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction override")
    p.add_argument(
        "--engine",
        default="auto",
        choices=ENGINES,
        help="auto (torchrun when WORLD_SIZE > 1, else local), local, torchrun, ray",
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local)")
    p.add_argument("--concurrency", type=int, default=1, help="Ray actors (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per Ray actor")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--channels-last", action="store_true", help="channels_last model/images")
    add_unit_options(p)
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the forward (pays off on long runs)"
    )


def add_evaluate_parser(sub: Any) -> None:
    """The ``evaluate`` sub-command."""
    p = sub.add_parser(
        "evaluate",
        help="WSOL metrics of a run's saved maps (no model run)",
        epilog="exit status: 0 metrics written; 2 a usage mistake; 1 an unexpected error",
    )
    p.add_argument("run_dir", help="the --out folder of a finished cam-plugin run")
    p.add_argument(
        "--gt",
        default=None,
        help="wsolevaluation metadata folder, COCO instances "
        "JSON or ImageFolder root (default: the run's --data)",
    )
    p.add_argument("--gt-format", default="auto", choices=DATA_KINDS, help="force its kind")
    p.add_argument("--data-root", default=None, help="image folder of the ground truth")
    p.add_argument("--cam-curve-interval", type=float, default=0.01, help="threshold step")
    p.add_argument("--worst", type=int, default=8, help="worst examples drawn in the report")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def add_unit_options(p: argparse.ArgumentParser) -> None:
    """``--units`` and its options (paper Sec. 5; :mod:`cam_plugin.run.units`)."""
    p.add_argument(
        "--units",
        type=int,
        default=0,
        help="per-unit top patches: for each drawn class its N top units by weight W'_ck, "
        "each with its top patches over the data set, in OUT/units/ (default 0: off)",
    )
    p.add_argument("--unit-patches", type=int, default=8, help="top patches per unit (8)")
    p.add_argument(
        "--unit-classes",
        default="auto",
        help="classes drawn with --units: '3,5', or auto (the --targets list, else the "
        "8 most frequent top-1 classes)",
    )
    p.add_argument("--unit-span", type=float, default=2.0, help="patch side in feature cells")
