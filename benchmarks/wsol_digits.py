"""Weakly supervised localization on cluttered digits: CAM vs baselines, Choe et al.'s metrics.

A timm backbone is converted with :func:`cam_plugin.convert` (GAP head, and the paper's GMP
variant trained the same way), trained with image-level labels only for a fixed number of
steps on :class:`cam_plugin.data.ClutteredDigits`, then evaluated on held-out images:

* classification accuracy, Top-1 Loc, GT-known Loc, MaxBoxAcc, MaxBoxAccV2, PxAP
  (:class:`cam_plugin.metrics.WSOLMetrics`, Choe et al., CVPR 2020);
* for the CAM of the GAP model and of the GMP model, each upsampled two ways —
  ``res.upsample()``, the default, which centres every cell on its receptive field (the
  placement traced by :mod:`cam_plugin.tracing`; rows "centred"), and
  ``res.upsample(placement="bilinear")``, plain bilinear (rows "bilinear") — and two maps
  that learn nothing: a centred Gaussian and the raw image brightness.

Everything is seeded and the training length is a step count, so two runs print the same
table. Writes ``docs/wsol.md`` (between the ``wsol-table`` markers), a JSON report and a PNG
grid of maps with ground-truth and predicted boxes.

    python benchmarks/wsol_digits.py               # full run (make bench-wsol)
    python benchmarks/wsol_digits.py --quick       # the short version the tests run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- wsol-table:start -->", "<!-- wsol-table:end -->"
_OFF = object()  # "--flag none" on the command line: turn an optional output off


@dataclass
class Config:
    """One benchmark run (every field is a command-line flag)."""

    model: str = "resnet18"
    model_kwargs: str = '{"channels": [32, 64, 128, 256], "stem_width": 32}'
    stage: int = 2
    extra_conv: Optional[int] = 128
    pretrained_lite0: bool = False
    canvas: int = 64
    fragments: int = 4
    strokes: int = 3
    train_size: int = 16000
    test_size: int = 1000
    steps: int = 500
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup: int = 25
    seed: int = 0
    threads: int = 2
    eval_batch: int = 250
    cam_curve_interval: float = 0.01
    grid: int = 8
    out_md: Optional[str] = "docs/wsol.md"
    out_png: Optional[str] = "docs/assets/wsol/wsol_digits.png"
    out_json: Optional[str] = "docs/assets/wsol/wsol_digits.json"
    methods: tuple[str, ...] = field(
        default=("gap", "gmp", "gaussian", "brightness"), metadata={"help": "what to run"}
    )


#: the short version run by the tests: the same model, one pass over 3584 images of the same
#: generator with lighter clutter (no digit fragments, one stroke), so that a network trained
#: from scratch for 112 steps already localizes (with the full clutter it needs thousands more)
QUICK = Config(
    fragments=0,
    strokes=1,
    train_size=3584,
    test_size=200,
    steps=112,
    batch=32,
    warmup=8,
    eval_batch=200,
    cam_curve_interval=0.02,
    grid=4,
    out_md=None,
    out_png=None,
    out_json=None,
    methods=("gap", "gaussian"),
)


# ------------------------------------------------------------------------ data


def render(split: str, n: int, cfg: Config) -> dict[str, Any]:
    """Every sample of a split as stacked tensors (rendered once; deterministic)."""
    from cam_plugin.data import ClutteredDigits

    ds = ClutteredDigits(
        split,  # type: ignore[arg-type]
        n,
        canvas_size=cfg.canvas,
        num_fragments=cfg.fragments,
        num_strokes=cfg.strokes,
        seed=cfg.seed,
    )
    items = [ds[i] for i in range(n)]
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
        "boxes": [it["boxes"] for it in items],
        "mask": torch.stack([it["mask"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
    }


def normalize_images(images: Tensor) -> Tensor:
    """Grey digits in ``[0, 1]`` -> roughly zero-mean unit-scale network input."""
    return (images - 0.5) / 0.5


# ------------------------------------------------------------------------ model


def build(cfg: Config, pool: str) -> torch.nn.Module:
    """The converted classifier (same initialisation for GAP and GMP: seeded)."""
    import timm

    import cam_plugin as cp

    torch.manual_seed(cfg.seed)
    if cfg.pretrained_lite0:
        from cam_plugin.integrations.timm import efficientnet_lite0_pretrained

        backbone = efficientnet_lite0_pretrained()
    else:
        kwargs = json.loads(cfg.model_kwargs) if cfg.model_kwargs else {}
        for key, value in kwargs.items():
            if isinstance(value, list):
                kwargs[key] = tuple(value)
        backbone = timm.create_model(cfg.model, pretrained=False, **kwargs)
    return cp.convert(
        backbone,
        10,
        stage=cfg.stage,
        extra_conv=cfg.extra_conv,
        pool=pool,  # type: ignore[arg-type]
        input_size=(3, cfg.canvas, cfg.canvas),
        copy=False,
    )


def train(model: torch.nn.Module, data: dict[str, Any], cfg: Config) -> dict[str, float]:
    """AdamW + linear warm-up + cosine decay, fixed steps, seeded batches."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + float(np.cos(np.pi * t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n = data["image"].shape[0]
    order = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    t0 = time.perf_counter()
    losses = []
    for _ in range(cfg.steps):
        if pos + cfg.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + cfg.batch]
        pos += cfg.batch
        x = normalize_images(data["image"][idx])
        loss = F.cross_entropy(model(x), data["label"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return {"train_seconds": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-20:]))}


# ------------------------------------------------------------------------ evaluation


def cam_maps(
    model: Any, images: Tensor, labels: Tensor, cfg: Config
) -> tuple[dict[str, Tensor], Tensor]:
    """Ground-truth-class CAMs at image size — ``upsample()`` (the default: the traced
    placement, key ``"centred"``) and ``upsample(placement="bilinear")`` — and the logits."""
    import cam_plugin as cp

    adapter = model.cam_adapter(allow_inexact=True)
    out: dict[str, list[Tensor]] = {"bilinear": [], "centred": []}
    logits = []
    with cp.CAM(model, adapter=adapter) as cam:
        for i in range(0, images.shape[0], cfg.eval_batch):
            x = normalize_images(images[i : i + cfg.eval_batch])
            res = cam(x, targets=labels[i : i + cfg.eval_batch])
            logits.append(res.logits)
            default = res.upsample()
            if default.upsampled_with != "traced":
                raise RuntimeError(f"upsample() did not place the cells: {default.upsampled_with}")
            out["bilinear"].append(res.upsample(placement="bilinear").normalize().maps[:, 0])
            out["centred"].append(default.normalize().maps[:, 0])
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(logits)


def score(
    maps: Tensor, test: dict[str, Any], preds: Optional[Tensor], cfg: Config
) -> dict[str, float]:
    from cam_plugin.metrics import WSOLMetrics

    metric = WSOLMetrics(cam_curve_interval=cfg.cam_curve_interval)
    for i in range(0, maps.shape[0], cfg.eval_batch):
        sl = slice(i, i + cfg.eval_batch)
        metric.update(
            maps[sl],
            test["boxes"][sl],
            labels=test["label"][sl] if preds is not None else None,
            pred_classes=preds[sl] if preds is not None else None,
            gt_masks=test["mask"][sl],
            sample_ids=test["index"][sl],
        )
    return metric.compute()


def run(cfg: Config) -> dict[str, Any]:
    """Train, evaluate, and return the report (rows of the table and the maps to draw)."""
    from cam_plugin.baselines import brightness_baseline_maps, centered_gaussian_maps

    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    train_data = render("train", cfg.train_size, cfg)
    test = render("test", cfg.test_size, cfg)
    render_s = time.perf_counter() - t_start
    rows: list[dict[str, Any]] = []
    drawn: dict[str, Tensor] = {}
    timings: dict[str, float] = {"render_seconds": render_s}
    gap_preds: Optional[Tensor] = None
    models: dict[str, Any] = {}
    for pool in ("gap", "gmp"):
        if pool not in cfg.methods:
            continue
        model = build(cfg, "avg" if pool == "gap" else "max")
        stats = train(model, train_data, cfg)
        timings[f"{pool}_train_seconds"] = stats["train_seconds"]
        t0 = time.perf_counter()
        maps, logits = cam_maps(model, test["image"], test["label"], cfg)
        preds = logits.argmax(1)
        acc = float((preds == test["label"]).float().mean() * 100)
        if pool == "gap":
            gap_preds = preds
        models[pool] = model
        placement = model.placement((cfg.canvas, cfg.canvas))
        for how in ("centred", "bilinear"):
            m = score(maps[how], test, preds, cfg)
            rows.append(
                {
                    "method": f"CAM, {'GAP' if pool == 'gap' else 'GMP'} ({how})",
                    "key": f"{pool}_{how}",
                    "accuracy": acc,
                    "final_loss": stats["final_loss"],
                    **m,
                }
            )
        drawn[pool] = maps["centred"]
        timings[f"{pool}_eval_seconds"] = time.perf_counter() - t0
        timings[f"{pool}_placement"] = {  # type: ignore[assignment]
            "stride": placement.stride,
            "offset": placement.offset,
            "source": placement.source,
            "bilinear_offset": ((placement.stride[0] - 1) / 2, (placement.stride[1] - 1) / 2),
            "map_size": model.info.map_size,
        }
    size = (cfg.test_size, cfg.canvas, cfg.canvas)
    baselines = {
        "gaussian": ("Centred Gaussian (no learning)", centered_gaussian_maps(size)),
        "brightness": ("Image brightness (no learning)", brightness_baseline_maps(test["image"])),
    }
    for key, (label, maps_b) in baselines.items():
        if key not in cfg.methods:
            continue
        m = score(maps_b, test, gap_preds, cfg)
        rows.append({"method": label, "key": key, "accuracy": float("nan"), **m})
        drawn[key] = maps_b
    timings["total_seconds"] = time.perf_counter() - t_start
    timings["cpu_seconds"] = time.process_time() - cpu_start
    info = models["gap"].info if "gap" in models else None
    return {
        "config": {k: v for k, v in asdict(cfg).items()},
        "rows": rows,
        "timings": timings,
        "backbone": {
            "model": "tf_efficientnet_lite0 (ImageNet)" if cfg.pretrained_lite0 else cfg.model,
            "stage": info.stage_name if info else None,
            "map_size": info.map_size if info else None,
            "channels": info.channels if info else None,
        },
        "_maps": drawn,
        "_test": test,
    }


# ------------------------------------------------------------------------ output


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if v != v else f"{v:.1f}"
    return str(v)


def table(report: dict[str, Any]) -> str:
    cols = [
        ("Cls acc", "accuracy"),
        ("Top-1 Loc", "Top-1 Loc"),
        ("GT-known Loc", "GT-known Loc"),
        ("MaxBoxAcc", "MaxBoxAcc"),
        ("MaxBoxAccV2", "MaxBoxAccV2"),
        ("V2 @30 / 50 / 70", None),
        ("PxAP", "PxAP"),
    ]
    lines = [
        "| method | " + " | ".join(c for c, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for row in report["rows"]:
        cells = []
        for _, key in cols:
            if key is None:
                cells.append(" / ".join(_fmt(row[f"MaxBoxAccV2@{d}"]) for d in (30, 50, 70)))
            else:
                cells.append(_fmt(row.get(key, float("nan"))))
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    rows = {r["key"]: r for r in report["rows"]}
    cfg = report["config"]
    t = report["timings"]
    bb = report["backbone"]
    parts = [
        table(report),
        "",
        f"Backbone: `{bb['model']}` (timm, `{cfg.get('model_kwargs') or '{}'}`) cut at "
        f"`{bb['stage']}` (map {bb['map_size'][0]}x"
        f"{bb['map_size'][1]}, {bb['channels']} channels) on {cfg['canvas']}x{cfg['canvas']} "
        f"canvases with {cfg.get('fragments', 4)} digit fragments and "
        f"{cfg.get('strokes', 3)} strokes of clutter; trained from "
        f"{'ImageNet weights' if cfg['pretrained_lite0'] else 'scratch'}"
        f" for {cfg['steps']} steps of {cfg['batch']} images ({cfg['train_size']} training "
        f"images), evaluated on {cfg['test_size']} test images (digits never seen in "
        f"training), seed {cfg['seed']}, threshold step {cfg['cam_curve_interval']}."
        if bb["map_size"]
        else "",
    ]
    if "gap_placement" in t:
        p = t["gap_placement"]
        parts.append(
            f"Placement of the CAM cells (traced): stride {p['stride'][0]:g}, cell 0 centred "
            f"at pixel {p['offset'][0]:g}; plain bilinear assumes {p['bilinear_offset'][0]:g}."
        )
    if "gap_centred" in rows:
        best_base = max(
            (rows[k]["MaxBoxAccV2"] for k in ("gaussian", "brightness") if k in rows),
            default=float("nan"),
        )
        parts.append(
            f"MaxBoxAccV2 margin of CAM (GAP, centred) over the best non-learned baseline: "
            f"{rows['gap_centred']['MaxBoxAccV2'] - best_base:+.1f} points."
        )
    deltas = []
    for pool, label in (("gap", "GAP"), ("gmp", "GMP")):
        c, b = rows.get(f"{pool}_centred"), rows.get(f"{pool}_bilinear")
        if c and b:
            deltas.append(
                f"{label} MaxBoxAccV2 {c['MaxBoxAccV2'] - b['MaxBoxAccV2']:+.1f} "
                f"(IoU 0.7: {c['MaxBoxAccV2@70'] - b['MaxBoxAccV2@70']:+.1f}), "
                f"MaxBoxAcc {c['MaxBoxAcc'] - b['MaxBoxAcc']:+.1f}, "
                f"PxAP {c['PxAP'] - b['PxAP']:+.1f}"
            )
    if deltas:
        parts.append(
            "Centred (traced: the default of `upsample()`) minus bilinear placement: "
            + "; ".join(deltas)
            + "."
        )
    if "gap_centred" in rows and "gmp_centred" in rows:
        parts.append(
            "GAP minus GMP (centred), MaxBoxAccV2: "
            f"{rows['gap_centred']['MaxBoxAccV2'] - rows['gmp_centred']['MaxBoxAccV2']:+.1f} "
            "points."
        )
    secs = ", ".join(
        f"{k.replace('_seconds', '')} {v:.0f} s"
        for k, v in t.items()
        if k.endswith("_seconds") and k != "cpu_seconds" and isinstance(v, float)
    )
    parts.append(
        f"Wall time ({cfg['threads']} threads): {secs} (CPU time of the process "
        f"{t['cpu_seconds']:.0f} s; on a busy machine wall time is longer)."
    )
    return "\n\n".join(p for p in parts if p)


def picture(report: dict[str, Any], path: Path, count: int) -> None:
    """Grid: image with the ground-truth box; each method's map with its boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from cam_plugin.localize import contour_boxes

    test = report["_test"]
    maps = report["_maps"]
    best = {r["key"].split("_")[0]: r["best_threshold"] for r in report["rows"]}
    names = {
        "gap": "CAM (GAP)",
        "gmp": "CAM (GMP)",
        "gaussian": "centred Gaussian",
        "brightness": "brightness",
    }
    keys = [k for k in ("gap", "gmp", "gaussian", "brightness") if k in maps]
    n = min(count, test["image"].shape[0])
    fig, axes = plt.subplots(
        1 + len(keys), n, figsize=(1.25 * n, 1.3 * (1 + len(keys))), squeeze=False
    )

    def box(ax: Any, b: Any, color: str, style: str = "-") -> None:
        x0, y0, x1, y1 = (float(v) for v in b)
        ax.add_patch(
            Rectangle(
                (x0 - 0.5, y0 - 0.5),
                x1 - x0 + 1,
                y1 - y0 + 1,
                fill=False,
                edgecolor=color,
                linewidth=1.2,
                linestyle=style,
            )
        )

    for j in range(n):
        img = test["image"][j, 0].numpy()
        axes[0, j].imshow(img, cmap="gray", vmin=0, vmax=1)
        for b in test["boxes"][j]:
            box(axes[0, j], b, "lime")
        for r, key in enumerate(keys, start=1):
            ax = axes[r, j]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.imshow(maps[key][j].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            for b in test["boxes"][j]:
                box(ax, b, "lime")
            pred = contour_boxes(maps[key][j], [best.get(key, 0.2)])[0].boxes[0]
            box(ax, pred, "red", "--")
    for r, key in enumerate(["image"] + keys):
        axes[r, 0].set_ylabel(names.get(key, key), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "green: ground truth, red dashed: largest contour at the best threshold", fontsize=7
    )
    fig.tight_layout(pad=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=80)
    plt.close(fig)
    from PIL import Image

    # the noisy canvases compress badly as 24-bit PNG: a 128-colour palette keeps it small
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)


def write_docs(report: dict[str, Any], md_path: Path) -> None:
    block = f"{START}\n{summary(report)}\n{END}"
    text = (
        md_path.read_text()
        if md_path.exists()
        else f"# WSOL on cluttered digits\n\n{START}\n{END}\n"
    )
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md_path.write_text(text)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short version run by tests")
    for f in Config.__dataclass_fields__.values():
        if f.name == "methods":
            parser.add_argument("--methods", nargs="+", default=None)
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif "int" in str(f.type) and "Optional" in str(f.type):
            parser.add_argument(flag, type=lambda v: _OFF if v == "none" else int(v), default=None)
        elif "str" in str(f.type):
            parser.add_argument(flag, type=lambda v: _OFF if v == "none" else v, default=None)
        else:
            kind = float if "float" in str(f.type) else int
            parser.add_argument(flag, type=kind, default=None)
    args = vars(parser.parse_args(argv))
    cfg = QUICK if args.pop("quick") else Config()
    overrides = {k: (None if v is _OFF else v) for k, v in args.items() if v is not None}
    if "methods" in overrides:
        overrides["methods"] = tuple(overrides["methods"])
    cfg = replace(cfg, **overrides)
    report = run(cfg)
    print(summary(report))
    if cfg.out_png:
        picture(report, ROOT / cfg.out_png, cfg.grid)
        print(f"wrote {cfg.out_png}")
    if cfg.out_json:
        path = ROOT / cfg.out_json
        path.parent.mkdir(parents=True, exist_ok=True)
        public = {k: v for k, v in report.items() if not k.startswith("_")}
        path.write_text(json.dumps(public, indent=1, default=float))
        print(f"wrote {cfg.out_json}")
    if cfg.out_md:
        write_docs(report, ROOT / cfg.out_md)
        print(f"wrote {cfg.out_md}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.exit(main())
