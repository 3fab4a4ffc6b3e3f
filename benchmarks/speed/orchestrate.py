"""The parent: which children run, in which environment, and the report they add up to.

The parent never imports torch (a child must start from an interpreter without it, so that
its allocator settings take effect and its peak RSS is its own). Each child is
``python -m benchmarks.speed --worker ...`` run from the repository root; it prints its
result as one ``@@RESULT <json>`` line.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from .methods import GROUPS

ROOT = Path(__file__).resolve().parents[2]
ALLOCATORS = {
    "default": {},
    "mmap_max_0": {"MALLOC_MMAP_MAX_": "0"},
    # what cam_plugin.export.keep_freed_memory() sets at run time
    "keep_freed": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)},
}
Log = Callable[[str], None]


def child(argv: list[str], env_extra: dict[str, str], threads: int, timeout: float) -> Any:
    """Run one worker child and return its ``@@RESULT`` (or ``{"error": ...}``)."""
    env = dict(os.environ)
    env.update(env_extra)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONWARNINGS": "ignore",
            "TQDM_DISABLE": "1",
        }
    )
    cmd = [sys.executable, "-m", "benchmarks.speed", *argv]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT ") :])
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {"error": f"child {' '.join(argv)} failed (rc {proc.returncode}): {tail}"}


def loadavg() -> Optional[list[float]]:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _new_report(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "smoke": args.smoke,
        "config": {
            "models": args.models,
            "batches": args.batches,
            "threads": args.threads,
            "device": args.device,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "allocators": args.allocators,
            "fast_allocators": args.fast_allocators,
            "allocator_models": args.allocator_models,
            "rss_batches": args.rss_batches,
            "rss_forward_repeats": args.rss_forward_repeats,
        },
        "load_before": loadavg(),
        "timing": [],
        "memory": [],
        "tensors": [],
        "fast": [],
        "breakdown": [],
    }


def _common(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--threads", str(args.threads)]


def _timing_row(
    args: argparse.Namespace, model: str, batch: int, alloc: str, log: Log
) -> dict[str, Any]:
    """The two timing children (``GROUPS``) of one (model, batch, allocator), merged: the
    autograd child's forward and CAM become its ``references``."""
    # small batches are quick and noisier: more rounds
    reps = args.repeats if batch >= 8 else 3 * args.repeats
    merged: dict[str, Any] = {"results": {}, "agreement": {}, "references": {}}
    for group in GROUPS:
        log(f"timing {model} batch {batch} allocator {alloc} ({group})")
        out = child(
            ["--worker", "time", "--group", group, "--model", model, "--batch", str(batch)]
            + ["--warmup", str(args.warmup), "--repeats", str(reps)]
            + ["--budget", str(args.budget), *_common(args)],
            ALLOCATORS[alloc],
            args.threads,
            args.timeout,
        )
        if "error" in out:
            merged.setdefault("errors", []).append(out["error"])
            continue
        merged["env"] = out["env"]
        merged["agreement"].update(out["agreement"])
        for name, res in out["results"].items():
            if group == "autograd" and name in GROUPS["inference"]:
                merged["references"][name] = res  # the in-child references
            else:
                merged["results"][name] = res
    if merged.get("errors") and not merged["results"]:
        merged = {"error": " | ".join(merged["errors"])}
    return {"model": model, "batch": batch, "allocator": alloc, "load": loadavg(), **merged}


def _memory_rows(
    args: argparse.Namespace, model: str, batch: int, log: Log
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The tensor-memory child of (model, batch) and, at the RSS batches, one RSS child per
    method (the forward's repeated for the noise band)."""
    log(f"tensor memory {model} batch {batch}")
    out = child(
        ["--worker", "tensors", "--model", model, "--batch", str(batch), *_common(args)]
        + ["--memory-methods", *args.memory_methods],
        {},
        args.threads,
        args.timeout,
    )
    tensors = {"model": model, "batch": batch, **out}
    rows: list[dict[str, Any]] = []
    if batch not in (args.rss_batches or [max(args.batches)]):
        return tensors, rows
    runs = [
        (m, i)
        for m in args.memory_methods
        for i in range(args.rss_forward_repeats if m == "forward" else 1)
    ]
    for method, repeat in runs:
        log(f"memory (RSS) {model} batch {batch} {method}")
        out = child(
            ["--worker", "memory", "--model", model, "--batch", str(batch)]
            + ["--method", method, *_common(args)],
            {},
            args.threads,
            args.timeout,
        )
        rows.append({"model": model, "batch": batch, "method": method, "repeat": repeat, **out})
    return tensors, rows


def _fast_row(args: argparse.Namespace, model: str, alloc: str, log: Log) -> dict[str, Any]:
    log(f"fast path {model} batch {args.fast_batch} allocator {alloc}")
    extra = (["--no-compile"] if args.no_compile else []) + (["--no-onnx"] if args.no_onnx else [])
    out = child(
        ["--worker", "fast", "--model", model, "--batch", str(args.fast_batch)]
        + ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        + ["--budget", str(args.budget), *extra, *_common(args)],
        ALLOCATORS[alloc],
        args.threads,
        args.timeout,
    )
    return {"model": model, "batch": args.fast_batch, "allocator": alloc, **out}


def run_parent(args: argparse.Namespace) -> dict[str, Any]:
    """Run every child the arguments ask for and collect the report (see ``report.py``)."""
    t_start = time.perf_counter()
    report = _new_report(args)
    allocators = args.allocators if args.device == "cpu" else ["default"]
    fast_allocators = args.fast_allocators if args.device == "cpu" else ["default"]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    for model in args.models:
        # the allocator variants (a process each) for the models asked for, by default the
        # first one (the targets are stated for it)
        variants = args.allocator_models or args.models[:1]
        model_allocs = allocators if model in variants else allocators[:1]
        model_fast_allocs = fast_allocators if model in variants else fast_allocators[:1]
        for batch in args.batches:
            for alloc in model_allocs:
                report["timing"].append(_timing_row(args, model, batch, alloc, log))
            if args.memory:
                tensors, rows = _memory_rows(args, model, batch, log)
                report["tensors"].append(tensors)
                report["memory"].extend(rows)
        if args.fast:
            for alloc in model_fast_allocs:
                report["fast"].append(_fast_row(args, model, alloc, log))
    if args.breakdown and args.models:
        for batch in args.batches:
            log(f"breakdown {args.models[0]} batch {batch}")
            out = child(
                ["--worker", "breakdown", "--model", args.models[0], "--batch", str(batch)]
                + _common(args),
                {},
                args.threads,
                args.timeout,
            )
            report["breakdown"].append({"model": args.models[0], "batch": batch, **out})
    report["load_after"] = loadavg()
    report["wall_s"] = time.perf_counter() - t_start
    report["env"] = next((t["env"] for t in report["timing"] if "env" in t), None)
    return report
