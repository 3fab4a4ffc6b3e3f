"""The figures: a grid of every method's map on a few images (``docs/assets/compare/``) and,
per photo, CAM next to Captum's methods drawn by Captum's own visualizer
(``docs/assets/captum/``, shown on ``docs/cam-vs-captum.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

#: the methods of the Captum figures and the sign Captum's visualizer shows for each
CAPTUM_SIGNS = {
    "CAM": "positive",
    "LayerGradCam": "positive",
    "IntegratedGradients": "all",
    "Saliency": "absolute_value",
    "InputXGradient": "all",
    "Occlusion": "positive",
}


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _unit(m: np.ndarray) -> np.ndarray:
    """Min-max to ``[0, 1]`` (a constant map -> zeros)."""
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _palette(path: Path) -> None:
    """Re-save a PNG with a 256-colour palette (about a third of the size)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def grid(
    crops: Sequence[np.ndarray],
    titles: Sequence[str],
    maps: dict[str, Tensor],
    ms: dict[str, float],
    path: Path,
) -> None:
    """Rows: images; columns: the image, then every method's map (min-max normalized per
    map, ``jet``, over the image); each column titled with the method and its ms / image."""
    plt = _pyplot()
    rows, cols = len(crops), 1 + len(maps)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows + 0.3), squeeze=False)
    for r, crop in enumerate(crops):
        axes[r, 0].imshow(crop)
        axes[r, 0].set_title(titles[r], fontsize=6)
        for c, (name, m) in enumerate(maps.items(), start=1):
            axes[r, c].imshow(crop)
            axes[r, c].imshow(_unit(m[r].numpy()), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title(f"{name}\n{ms[name]:.0f} ms", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.01, top=0.9, wspace=0.03, hspace=0.12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    _palette(path)


def captum_figure(
    crop: np.ndarray, maps: dict[str, Tensor], ms: dict[str, float], title: str, path: Path
) -> None:
    """One photo and CAM / Captum's maps side by side, each drawn by Captum's
    ``visualize_image_attr`` (``blended_heat_map`` with the sign of :data:`CAPTUM_SIGNS`)."""
    from captum.attr import visualization as viz

    plt = _pyplot()
    names = [n for n in CAPTUM_SIGNS if n in maps]
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(1.75 * (1 + len(names)), 2.1))
    viz.visualize_image_attr(  # the attribution is unused by "original_image"
        np.ones_like(crop),
        crop,
        "original_image",
        plt_fig_axis=(fig, axes[0]),
        use_pyplot=False,
        title=title,
    )
    for ax, name in zip(axes[1:], names):
        viz.visualize_image_attr(
            maps[name].numpy()[:, :, None],
            crop,
            "blended_heat_map",
            sign=CAPTUM_SIGNS[name],
            plt_fig_axis=(fig, ax),
            use_pyplot=False,
            alpha_overlay=0.6,
            title=f"{name}\n{ms[name]:.0f} ms / image",
        )
    for ax in axes:
        ax.title.set_fontsize(7)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.01, top=0.8, wspace=0.03)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
