"""The whole run: photos, digits, bridge; then figures, the JSON copy and the docs."""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from . import figures, report
from .config import ROOT, Config, parse_args
from .digits import digit_methods, digits_dataset
from .photos import photo_dataset, photo_methods
from .scoreboard import Dataset, run


def _summary(ds: Dataset, rows: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The JSON-able part of a data set's result."""
    info = {k: v for k, v in ds.extra.items() if k != "crops"}
    return dict(info, rows=rows, methods=names, random_n=ds.random_n, captum_n=ds.captum_n)


def _photos(cfg: Config, out_dir: Path) -> dict[str, Any]:
    ds = photo_dataset(cfg)
    names = photo_methods(cfg)
    rows, maps = run(ds, names, cfg)
    ms = {n: rows[n]["ms"] for n in names}
    keep = [i for i, p in enumerate(cfg.photos) if p in cfg.figures]
    crops = [ds.extra["crops"][i] for i in keep]
    titles = [f"{im['photo']}: {im['class'].split(',')[0]}" for im in ds.extra["images"]]
    picked = {n: maps[n][keep] for n in names}
    places = [out_dir] + ([ROOT / "docs" / "assets" / "compare"] if cfg.docs else [])
    for place in places:
        figures.grid(crops, [titles[i] for i in keep], picked, ms, place / "photos.png")
    captum_dirs = [out_dir / "captum"] + ([ROOT / "docs" / "assets" / "captum"] if cfg.docs else [])
    for i in keep:
        one = {n: m[i] for n, m in maps.items()}
        for place in captum_dirs:
            path = place / f"{cfg.photos[i]}.png"
            figures.captum_figure(ds.extra["crops"][i], one, ms, titles[i], path)
    return _summary(ds, rows, names)


def _digits(cfg: Config, out_dir: Path) -> Optional[dict[str, Any]]:
    ds = digits_dataset(cfg)
    if ds is None:
        return None
    names = digit_methods()
    rows, maps = run(ds, names, cfg)
    ms = {n: rows[n]["ms"] for n in names}
    k = min(4, ds.images.shape[0])
    crops = ds.extra["crops"][:k]
    titles = [f"digit {int(c)}" for c in ds.classes[:k]]
    picked: dict[str, Tensor] = {n: maps[n][:k] for n in names}
    places = [out_dir] + ([ROOT / "docs" / "assets" / "compare"] if cfg.docs else [])
    for place in places:
        figures.grid(crops, titles, picked, ms, place / "digits.png")
    return _summary(ds, rows, names)


def main(argv: Optional[list[str]] = None) -> int:
    """Run everything the configuration asks for and write the outputs."""
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    out_dir = ROOT / cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"config": asdict(cfg)}
    result["photos"] = _photos(cfg, out_dir)
    result["digits"] = _digits(cfg, out_dir) if cfg.digits else None
    if cfg.bridge:
        from .bridge import run_bridge

        result["bridge"] = run_bridge(cfg)
    args = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    result["meta"] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine(),
        "versions": report.versions(),
        "command": ("python -m benchmarks.compare " + args).strip(),
        "seconds": time.perf_counter() - t0,
    }
    text = json.dumps(strict_json(result), indent=1, default=float, allow_nan=False)
    (out_dir / "compare.json").write_text(text)
    if cfg.json_out:
        (ROOT / cfg.json_out).write_text(text)
    report.write(result, cfg, out_dir)
    print(f"total {result['meta']['seconds']:.0f} s; outputs in {out_dir}")
    return 0


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (an undefined score) as ``None``, so that the
    file is strict JSON (``null``), readable by any parser."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return strict_json(value.item())
    return value
