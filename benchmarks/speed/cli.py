"""The command line: the parent (default) or one child (``--worker``, internal)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from .methods import GROUPS, METHODS
from .orchestrate import ALLOCATORS, ROOT, run_parent
from .report import render_markdown, write_outputs

DESCRIPTION = (
    "Speed and memory of cam-plugin's CAM against a plain forward pass, torchcam, "
    "pytorch-grad-cam and Captum, plus the bulk fast path (channels_last, torch.compile, "
    "ONNX Runtime). Run from the repository root as `python -m benchmarks.speed`."
)


def _add_parent_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--models",
        nargs="+",
        default=["resnet50", "lite0"],
        help="resnet50, lite0 (the real EfficientNet-Lite0), tiny, timm:<name>",
    )
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument(
        "--allocators", nargs="+", default=["default", "mmap_max_0"], choices=list(ALLOCATORS)
    )
    p.add_argument(
        "--fast-allocators", nargs="+", default=["default", "keep_freed"], choices=list(ALLOCATORS)
    )
    p.add_argument(
        "--allocator-models",
        nargs="+",
        default=None,
        help="models timed with every allocator setting (default: the first model; the "
        "others with the first setting only)",
    )
    p.add_argument(
        "--rss-batches",
        nargs="+",
        type=int,
        default=None,
        help="batch sizes whose peak RSS is measured, a child per method (default: largest)",
    )
    p.add_argument(
        "--rss-forward-repeats",
        type=int,
        default=3,
        help="children measuring the plain forward's RSS (their spread is the noise band)",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--budget",
        type=float,
        default=150.0,
        help="stop a child's rounds after this many seconds (at least 3 rounds)",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="per child, seconds")
    p.add_argument(
        "--memory-methods",
        nargs="+",
        default=[m for m in METHODS if m != "captum_given"],
        choices=METHODS,
    )
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-fast", dest="fast", action="store_false")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    p.add_argument("--fast-batch", type=int, default=16)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, batch 2, two rounds, two memory children, no compile",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="write speed.json and benchmarks.md here instead of the repository",
    )
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "speed.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks.md")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parent options, plus the hidden child options (``--worker`` and what it measures)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=DESCRIPTION)
    _add_parent_options(p)
    p.add_argument(
        "--worker",
        choices=["time", "memory", "tensors", "fast", "breakdown"],
        help=argparse.SUPPRESS,
    )
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--group", choices=list(GROUPS), default="inference", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke and args.worker is None:
        args.models, args.batches, args.fast_batch = ["tiny"], [2], 2
        args.warmup, args.repeats, args.budget = 1, 2, 20.0
        args.allocators = args.fast_allocators = ["default"]
        args.memory_methods = ["forward", "cam_upsampled"]
        args.rss_forward_repeats = 1
        args.no_compile = args.no_onnx = True
    if args.out_dir is not None:
        args.json = args.out_dir / "speed.json"
        args.md = args.out_dir / "benchmarks.md"
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Run the parent (every child, then the table and the JSON) or, with ``--worker``, one
    child measurement printed as an ``@@RESULT`` line. Exit 1 when any child failed."""
    args = parse_args(argv)
    if args.worker is not None:
        from .workers import WORKERS

        out = WORKERS[args.worker](args)
        print("@@RESULT " + json.dumps(out, default=str), flush=True)
        return 0
    if "torch" in sys.modules:  # children must start from an interpreter without torch
        print("warning: torch is already imported in the parent", file=sys.stderr)
    report = run_parent(args)
    write_outputs(report, args.json, args.md)
    print(render_markdown(report))
    print(f"wrote {args.json} and {args.md}")
    failed = [r for r in report["timing"] + report["memory"] + report["fast"] if "error" in r]
    for r in failed:
        print("FAILED:", str(r["error"])[:500], file=sys.stderr)
    return 1 if failed else 0
