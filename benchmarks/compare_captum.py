"""CAM next to Captum's attributions: maps, wall time, infidelity, sensitivity, localization.

Three parts, each writing a table into the docs between markers:

1. **Photos** (``docs/cam-vs-captum.md``): the real pretrained EfficientNet-Lite0 on the
   scikit-image photos, top-1 class. CAM (``ClassActivationMap``), ``LayerGradCam``,
   ``IntegratedGradients``, ``Saliency``, ``InputXGradient`` and ``Occlusion``: one figure
   per image with every map (Captum's ``visualize_image_attr``), the wall time of each
   method per image (same run, same thread count), ``captum.metrics.infidelity`` under two
   perturbations (Gaussian noise; a random square set to the baseline) and
   ``captum.metrics.sensitivity_max`` -- the same perturbations for every method (seeded).
   ``GuidedGradCam`` is left out here: Captum guides only ``nn.ReLU`` modules and
   EfficientNet-Lite uses ReLU6, so it would silently be Grad-CAM x plain gradients.
2. **Digits** (same page): the cluttered-digits model of the localization benchmark
   (``benchmarks/wsol_digits.py``: a converted timm ResNet-18 cut at ``layer2``), trained here
   with that benchmark's recipe, then every method above plus ``GuidedGradCam`` (the network
   is built from ``nn.ReLU``) for the ground-truth class of held-out images, scored with
   MaxBoxAccV2 and PxAP (:class:`cam_plugin.metrics.WSOLMetrics`). Skipped, with a note, when
   the localization modules are not installed.
3. **Bridge** (``docs/captum.md``): ``CAM == h·w · LayerGradCam`` on GAP + linear heads, and
   how far the two are apart through a LayerNorm head (ConvNeXt, avg-pooled ViT), with the
   closed form of the difference checked numerically.

    python benchmarks/compare_captum.py             # full run (make compare)
    python benchmarks/compare_captum.py --quick     # a smoke run: 1 photo, small settings
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
TABLE_MARKERS = ("<!-- compare-table:start -->", "<!-- compare-table:end -->")
DIGITS_MARKERS = ("<!-- compare-digits:start -->", "<!-- compare-digits:end -->")
BRIDGE_MARKERS = ("<!-- bridge-table:start -->", "<!-- bridge-table:end -->")
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "motorcycle")
METHODS = ("CAM", "LayerGradCam", "IntegratedGradients", "Saliency", "InputXGradient", "Occlusion")


@dataclass
class Config:
    """One run (every field is a command-line flag)."""

    photos: tuple[str, ...] = PHOTOS
    size: int = 224
    ig_steps: int = 16
    occlusion_window: int = 32
    occlusion_stride: int = 32
    infid_samples: int = 8
    noise_std: float = 0.1
    square: int = 48
    sens_samples: int = 3
    sens_radius: float = 0.02
    sens_photos: int = 2
    figures: tuple[str, ...] = ("chelsea", "coffee", "astronaut")
    threads: int = 2
    seed: int = 0
    digits: bool = True
    digits_steps: int = 0
    digits_train: int = 0
    digits_test: int = 100
    digits_checkpoint: str = "outputs/wsol_digits/gap_model.pt"
    digits_occlusion_window: int = 16
    digits_occlusion_stride: int = 8
    bridge: bool = True
    out_dir: str = "outputs/compare_captum"
    docs: bool = True


QUICK = Config(
    photos=("coffee",),
    size=160,
    ig_steps=4,
    infid_samples=2,
    sens_samples=2,
    sens_photos=1,
    figures=("coffee",),
    digits_steps=4,
    digits_train=128,
    digits_test=16,
    digits_checkpoint="outputs/compare_captum/quick_digits.pt",
    docs=False,
)


# ------------------------------------------------------------------------ shared


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as ``(H, W, 3)`` uint8."""
    from skimage import data

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def preprocess(img: np.ndarray, size: int) -> tuple[Tensor, np.ndarray]:
    """Resize the short side to ``size * 256 / 224`` (bicubic), centre-crop ``size``;
    returns the network input (mean = std = 0.5) and the crop in ``[0, 1]`` for display."""
    from PIL import Image

    pil = Image.fromarray(img)
    short = round(size * 256 / 224)
    w, h = pil.size
    scale = short / min(w, h)
    pil = pil.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
    w, h = pil.size
    left, top = (w - size) // 2, (h - size) // 2
    crop = np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    x = torch.from_numpy(crop).permute(2, 0, 1)[None]
    return (x - 0.5) / 0.5, crop


def timed(fn: Callable[[], Tensor], budget: float = 1.0, most: int = 5) -> tuple[Tensor, float]:
    """The result of ``fn()`` and its wall time: the fastest of at least 2 calls, and of 3
    to ``most`` calls (while their total stays under 3 x ``budget``) for a method faster than
    ``budget`` seconds. On a shared machine single calls stall now and then (threads
    descheduled at a barrier: ten times slower for a second or more); the minimum filters
    that out, as ``timeit`` does."""
    best, spent, calls = float("inf"), 0.0, 0
    out: Optional[Tensor] = None
    while calls < most and (calls < 2 or (best < budget and (calls < 3 or spent < 3 * budget))):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best, spent, calls = min(best, dt), spent + dt, calls + 1
    assert out is not None
    return out.detach(), best


def to_input_shape(attr: Tensor, x: Tensor) -> Tensor:
    """Layer maps (``N x 1 x h x w``) -> input shape: bilinear to ``H x W``, then the same
    value in every channel (what ``captum.metrics.infidelity`` requires)."""
    if attr.shape[-2:] != x.shape[-2:]:
        attr = F.interpolate(attr, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return attr.expand_as(x)


def no_inplace_relu(model: nn.Module) -> nn.Module:
    """Captum's guided / modified-ReLU methods hook ``nn.ReLU``; in-place ReLUs break those
    backward hooks. Same function, not in place."""
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


def fmt(v: float) -> str:
    """Three significant digits; "—" for NaN."""
    return "—" if v != v else f"{v:.3g}"


def as_explanation(fn: Callable[..., Tensor]) -> Callable[..., Any]:
    """``f(x, target)`` as an explanation function for ``captum.metrics.sensitivity_max``,
    which passes the inputs as a tuple and expects a tuple back (Captum's convention)."""

    def explain(inputs: Any, target: Any = None) -> Any:
        if isinstance(inputs, tuple):  # contiguous: sensitivity_max .view()s the result
            return (fn(inputs[0], target).contiguous(),)
        return fn(inputs, target).contiguous()

    return explain


def replace_block(path: Path, markers: tuple[str, str], body: str, title: str) -> None:
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


# ------------------------------------------------------------------------ 1. photos


def attribution_methods(
    model: nn.Module, cfg: Config, occlusion: tuple[int, int], guided: bool
) -> dict[str, Callable[..., Tensor]]:
    """``name -> f(x, target)`` returning the attribution as Captum gives it."""
    from cam_plugin.integrations.captum import ClassActivationMap
    from captum.attr import (
        GuidedGradCam,
        InputXGradient,
        IntegratedGradients,
        LayerGradCam,
        Occlusion,
        Saliency,
    )

    cam = ClassActivationMap(model)
    gradcam = LayerGradCam(model, cam.layer)
    ig = IntegratedGradients(model)
    window, stride = occlusion

    def grad_cam(x: Tensor, target: Any) -> Tensor:
        attr = gradcam.attribute(x, target=target)
        return gradcam.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")

    def integrated(x: Tensor, target: Any) -> Tensor:
        return ig.attribute(
            x,
            baselines=0.0,
            target=target,
            n_steps=cfg.ig_steps,
            internal_batch_size=cfg.ig_steps * x.shape[0],
        )

    def occlude(x: Tensor, target: Any) -> Tensor:
        return Occlusion(model).attribute(
            x,
            target=target,
            sliding_window_shapes=(x.shape[1], window, window),
            strides=(x.shape[1], stride, stride),
            baselines=0.0,
            perturbations_per_eval=16,
        )

    methods: dict[str, Callable[..., Tensor]] = {
        "CAM": lambda x, target: cam.attribute(x, target=target, upsample=True),  # type: ignore[misc]
        "LayerGradCam": grad_cam,
        "IntegratedGradients": integrated,
        "Saliency": lambda x, target: Saliency(model).attribute(x, target=target),
        "InputXGradient": lambda x, target: InputXGradient(model).attribute(x, target=target),
        "Occlusion": occlude,
    }
    if guided:
        ggc = GuidedGradCam(model, cam.layer)
        methods["GuidedGradCam"] = lambda x, target: ggc.attribute(x, target=target)
    return methods


#: Captum visualizer sign per method: positive evidence for the class-map methods, both signs
#: for the signed input attributions, magnitude for Saliency (|gradient| by default)
SIGNS = {
    "CAM": "positive",
    "LayerGradCam": "positive",
    "IntegratedGradients": "all",
    "Saliency": "absolute_value",
    "InputXGradient": "all",
    "Occlusion": "positive",
    "GuidedGradCam": "all",
}


def figure(
    crop: np.ndarray, attrs: dict[str, Tensor], times: dict[str, float], title: str, path: Path
) -> None:
    """The photo and every method's map side by side, each drawn by Captum's visualizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from captum.attr import visualization as viz

    n = 1 + len(attrs)
    fig, axes = plt.subplots(1, n, figsize=(1.75 * n, 2.1))
    viz.visualize_image_attr(  # the attribution is unused by "original_image"
        np.ones_like(crop),
        crop,
        "original_image",
        plt_fig_axis=(fig, axes[0]),
        use_pyplot=False,
        title=title,
    )
    for ax, (name, attr) in zip(axes[1:], attrs.items()):
        heat = attr[0].permute(1, 2, 0).cpu().numpy()  # (H, W, C): the documented conversion
        viz.visualize_image_attr(
            heat,
            crop,
            "blended_heat_map",
            sign=SIGNS.get(name, "all"),
            plt_fig_axis=(fig, ax),
            use_pyplot=False,
            alpha_overlay=0.6,
            title=f"{name}\n{times[name] * 1000:.0f} ms (median)",
        )
    for ax in axes:
        ax.title.set_fontsize(7)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.01, top=0.8, wspace=0.03)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def run_photos(cfg: Config) -> dict[str, Any]:
    from cam_plugin.integrations.timm import efficientnet_lite0_pretrained, imagenet_class_names
    from captum.metrics import infidelity, infidelity_perturb_func_decorator, sensitivity_max

    model = efficientnet_lite0_pretrained()
    names = imagenet_class_names()
    methods = attribution_methods(
        model, cfg, (cfg.occlusion_window, cfg.occlusion_stride), guided=False
    )
    out_dir = ROOT / cfg.out_dir
    rows: dict[str, dict[str, list[float]]] = {
        m: {"time": [], "infid_noise": [], "infid_square": [], "sens": []} for m in methods
    }
    per_image: list[dict[str, Any]] = []
    drawn: list[tuple[str, np.ndarray, dict[str, Tensor], str]] = []
    # one untimed call of every method first (allocator, oneDNN primitives, autograd warm-up)
    warm, _ = preprocess(photo(cfg.photos[0]), cfg.size)
    for fn in methods.values():
        fn(warm, [0])
    for i, name in enumerate(cfg.photos):
        x, crop = preprocess(photo(name), cfg.size)
        with torch.no_grad():
            logits = model(x)
        top1 = int(logits.argmax(1))
        prob = float(logits.softmax(1)[0, top1])
        target = [top1]
        attrs: dict[str, Tensor] = {}
        times: dict[str, float] = {}
        for m, fn in methods.items():
            attrs[m], times[m] = timed(partial(fn, x, target))
            rows[m]["time"].append(times[m])

        # infidelity: the same perturbations for every method (seeded per image)
        @infidelity_perturb_func_decorator(multiply_by_inputs=False)
        def noise(inputs: Tensor, seed: int = cfg.seed + i) -> Tensor:
            gen = torch.Generator().manual_seed(seed)
            return inputs - cfg.noise_std * torch.randn(inputs.shape, generator=gen)

        @infidelity_perturb_func_decorator(multiply_by_inputs=False)
        def square(inputs: Tensor, seed: int = cfg.seed + i) -> Tensor:
            gen = torch.Generator().manual_seed(seed)
            n, _, h, w = inputs.shape
            s = min(cfg.square, h, w)
            ys = torch.randint(0, h - s + 1, (n,), generator=gen)
            xs = torch.randint(0, w - s + 1, (n,), generator=gen)
            rows_ = torch.arange(h)[None, :, None]
            cols_ = torch.arange(w)[None, None, :]
            inside = (
                (rows_ >= ys[:, None, None])
                & (rows_ < ys[:, None, None] + s)
                & (cols_ >= xs[:, None, None])
                & (cols_ < xs[:, None, None] + s)
            )
            return inputs * (~inside)[:, None].to(inputs.dtype)  # the square -> baseline 0

        for m in methods:
            full = to_input_shape(attrs[m], x)
            for key, fn in (("infid_noise", noise), ("infid_square", square)):
                value = infidelity(
                    model,
                    fn,
                    x,
                    full,
                    target=target,
                    n_perturb_samples=cfg.infid_samples,
                    normalize=True,
                )
                rows[m][key].append(float(value[0]))
        if i < cfg.sens_photos:
            for m, fn in methods.items():
                torch.manual_seed(cfg.seed + i)  # the same perturbations for every method
                sens = sensitivity_max(
                    as_explanation(fn),
                    x,
                    target=target,
                    n_perturb_samples=cfg.sens_samples,
                    perturb_radius=cfg.sens_radius,
                    max_examples_per_batch=1,
                )
                rows[m]["sens"].append(float(sens[0]))
        per_image.append(
            {
                "photo": name,
                "class": names[top1],
                "prob": prob,
                "ms": {m: t * 1000 for m, t in times.items()},
            }
        )
        title = f"{name}: {names[top1].split(',')[0]} ({prob:.2f})"
        drawn.append((name, crop, attrs, title))
        print(
            f"[photos] {name}: {names[top1]} ({prob:.2f}) "
            + ", ".join(f"{m} {t * 1000:.0f} ms" for m, t in times.items()),
            flush=True,
        )
    # the figures, each panel titled with the method's median time over the photos (single
    # timings on a shared machine stall now and then; the median is what the table reports)
    median = {m: float(np.median(r["time"])) for m, r in rows.items()}
    for name, crop, attrs, title in drawn:
        figure(crop, attrs, median, title, out_dir / f"{name}.png")
        if cfg.docs and name in cfg.figures:
            figure(crop, attrs, median, title, ROOT / "docs" / "assets" / "captum" / f"{name}.png")
    return {"rows": rows, "images": per_image}


def photos_table(report: dict[str, Any], cfg: Config) -> str:
    rows = report["rows"]
    cam_ms = float(np.median(rows["CAM"]["time"])) * 1000
    lines = [
        "| method | ms / image (median) | × CAM | infidelity, noise ↓ | infidelity, square ↓ "
        "| sensitivity_max ↓ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m, r in rows.items():
        ms = float(np.median(r["time"])) * 1000
        lines.append(
            f"| {m} | {ms:.0f} | {ms / cam_ms:.1f} | {fmt(float(np.mean(r['infid_noise'])))} | "
            f"{fmt(float(np.mean(r['infid_square'])))} | "
            f"{fmt(float(np.mean(r['sens'])) if r['sens'] else float('nan'))} |"
        )
    classes = ", ".join(f"{im['photo']} → {im['class'].split(',')[0]}" for im in report["images"])
    lines += [
        "",
        f"Model: `tf_efficientnet_lite0` with its real ImageNet weights, {cfg.size}x{cfg.size} "
        f"centre crops of {len(cfg.photos)} scikit-image photos, top-1 class ({classes}). "
        f"Wall time on {cfg.threads} CPU threads, median over the photos, measured in this run "
        f"after one untimed warm-up call of each method, as the fastest of 2 calls (of 3 to "
        f"5 calls for a method faster than 1 s). The machine was shared "
        f"with other jobs: read ratios, not absolute times. IntegratedGradients: "
        f"{cfg.ig_steps} steps from a zero (mid-grey) baseline; Occlusion: {cfg.occlusion_window}x"
        f"{cfg.occlusion_window} window, stride {cfg.occlusion_stride}, zero baseline; Saliency: "
        "Captum's default absolute gradient.",
        "",
        f"Infidelity (Yeh et al., 2019; `normalize=True`, so it does not depend on the scale of "
        f"a map; mean over the photos, {cfg.infid_samples} perturbations each): *noise* "
        f"subtracts Gaussian noise of std {cfg.noise_std} (inputs are in [-1, 1]); *square* "
        f"sets a random {cfg.square}x{cfg.square} square to the zero baseline. CAM and "
        "LayerGradCam are upsampled (bilinear) and repeated over the 3 channels to get the "
        "input's shape, which infidelity requires. sensitivity_max: "
        f"{cfg.sens_samples} uniform perturbations of radius {cfg.sens_radius} on the first "
        f"{min(cfg.sens_photos, len(cfg.photos))} photos, Frobenius norm, mean of the per-photo "
        "maxima. The perturbations are seeded and identical for every method.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------ 2. digits


def _load_wsol() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import wsol_digits

        from cam_plugin import data, metrics  # noqa: F401  (the localization modules)
    except ImportError as err:
        print(f"[digits] skipped: {err}")
        return None
    finally:
        sys.path.pop(0)
    return wsol_digits


def localization_map(name: str, attr: Tensor) -> Tensor:
    """``(B, H, W)`` in ``[0, 1]`` for the WSOL metrics: class maps (CAM, LayerGradCam,
    Occlusion) as they are, signed; input attributions as ``|Σ_channels attr|`` (the
    magnitude Captum's visualizer shows with ``sign="absolute_value"``); then min-max."""
    from cam_plugin import minmax_normalize

    signed = name in ("CAM", "LayerGradCam", "Occlusion")
    m = attr.sum(1) if signed else attr.sum(1).abs()
    return minmax_normalize(m.float())


#: fields of the localization benchmark's config that do not change the trained model
#: (evaluation and output); every other field is part of the checkpoint's recipe
_NOT_RECIPE = frozenset(
    {
        "test_size",
        "threads",
        "eval_batch",
        "cam_curve_interval",
        "grid",
        "out_md",
        "out_png",
        "out_json",
        "methods",
    }
)


def recipe_of(wcfg: Any) -> dict[str, Any]:
    """The training recipe of a ``wsol_digits.Config`` (JSON-compatible, for the cache key)."""
    return json.loads(
        json.dumps({k: v for k, v in asdict(wcfg).items() if k not in _NOT_RECIPE}, default=str)
    )


def _digits_model(wsol: Any, wcfg: Any, path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The benchmark's GAP model: loaded from ``path`` when it was trained with the same
    recipe, else trained with ``wsol_digits``' own ``build`` / ``train`` and saved there."""
    recipe = recipe_of(wcfg)
    model = wsol.build(wcfg, "avg")
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(saved, dict) and saved.get("recipe") == recipe:
            model.load_state_dict(saved["state_dict"])
            print(f"[digits] loaded the trained model from {path}", flush=True)
            return model.eval(), dict(saved.get("stats", {}), loaded=str(path))
    train_data = wsol.render("train", wcfg.train_size, wcfg)
    stats = wsol.train(model, train_data, wcfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"recipe": recipe, "state_dict": model.state_dict(), "stats": stats}, path)
    print(f"[digits] trained {wcfg.steps} steps in {stats['train_seconds']:.0f} s -> {path}")
    return model.eval(), stats


def run_digits(cfg: Config) -> Optional[dict[str, Any]]:
    wsol = _load_wsol()
    if wsol is None:
        return None
    from cam_plugin.metrics import WSOLMetrics

    base = wsol.Config()
    wcfg = replace(base, test_size=cfg.digits_test, seed=cfg.seed, threads=cfg.threads)
    if cfg.digits_steps:
        wcfg = replace(wcfg, steps=cfg.digits_steps, warmup=min(base.warmup, cfg.digits_steps))
    if cfg.digits_train:
        wcfg = replace(wcfg, train_size=cfg.digits_train)
    t0 = time.perf_counter()
    test = wsol.render("test", wcfg.test_size, wcfg)
    model, stats = _digits_model(wsol, wcfg, ROOT / cfg.digits_checkpoint)
    model = no_inplace_relu(model.eval())
    methods = attribution_methods(
        model, cfg, (cfg.digits_occlusion_window, cfg.digits_occlusion_stride), guided=True
    )
    x_all = wsol.normalize_images(test["image"])
    labels = test["label"]
    with torch.no_grad():
        preds = model(x_all).argmax(1)
    from cam_plugin.integrations.captum import ClassActivationMap

    cam_map = ClassActivationMap(model).attribute(x_all[:1], target=labels[:1])
    map_size = f"{cam_map.shape[-2]}x{cam_map.shape[-1]}"
    acc = float((preds == labels).float().mean() * 100)
    batch = 20
    for fn in methods.values():  # one untimed warm-up call each, as for the photos
        fn(x_all[:batch], labels[:batch])
    results: dict[str, dict[str, Any]] = {}
    for name, fn in methods.items():
        metric = WSOLMetrics()
        seconds = 0.0
        for i in range(0, x_all.shape[0], batch):
            sl = slice(i, i + batch)
            attr, dt = timed(partial(fn, x_all[sl], labels[sl]))
            seconds += dt
            metric.update(
                localization_map(name, to_input_shape(attr, x_all[sl])),
                test["boxes"][sl],
                gt_masks=test["mask"][sl],
                sample_ids=test["index"][sl],
            )
        scores = metric.compute()
        scores["ms"] = seconds / x_all.shape[0] * 1000
        results[name] = scores
        print(
            f"[digits] {name}: MaxBoxAccV2 {scores['MaxBoxAccV2']:.1f}, "
            f"PxAP {scores['PxAP']:.1f}, {scores['ms']:.1f} ms/image",
            flush=True,
        )
    return {
        "results": results,
        "accuracy": acc,
        "map_size": map_size,
        "config": asdict(wcfg),
        "final_loss": stats.get("final_loss"),
        "train_seconds": stats.get("train_seconds"),
        "loaded": stats.get("loaded", ""),
        "checkpoint": cfg.digits_checkpoint,
        "seconds": time.perf_counter() - t0,
    }


def digits_table(report: Optional[dict[str, Any]], cfg: Config) -> str:
    if report is None:
        return (
            "The localization modules (`cam_plugin.data`, `cam_plugin.metrics`, "
            "`benchmarks/wsol_digits.py`) were not available in this run, so this part was "
            "skipped."
        )
    results = report["results"]
    cam_ms = results["CAM"]["ms"]
    lines = [
        "| method | MaxBoxAccV2 ↑ | V2 @30 / 50 / 70 | PxAP ↑ | ms / image | × CAM |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        per = " / ".join(f"{r[f'MaxBoxAccV2@{d}']:.1f}" for d in (30, 50, 70))
        lines.append(
            f"| {name} | {r['MaxBoxAccV2']:.1f} | {per} | {r['PxAP']:.1f} | {r['ms']:.1f} | "
            f"{r['ms'] / cam_ms:.1f} |"
        )
    c = report["config"]
    lines += [
        "",
        f"Model: the localization benchmark's `{c['model']}`"
        + (f" (`{c['model_kwargs']}`)" if c.get("model_kwargs") else "")
        + f" converted with `cam_plugin.convert` (cut at stage {c['stage']}"
        + (f", extra {c['extra_conv']}-unit conv" if c.get("extra_conv") else "")
        + f", GAP + linear; CAM map {report.get('map_size', '?')}), trained with that "
        f"benchmark's own recipe and code for {c['steps']} steps of {c['batch']} images "
        f"({c['train_size']} training images; trained once and kept in "
        f"`{report['checkpoint']}`); classification accuracy {report['accuracy']:.1f}% on the "
        f"{c['test_size']} held-out images scored here. Maps of the ground-truth "
        "class, upsampled to 64x64; CAM, LayerGradCam and Occlusion as signed maps, the "
        "input attributions as |sum over channels|, each min-max normalized. "
        "GuidedGradCam runs here because the network is built from `nn.ReLU`. "
        f"IntegratedGradients: {cfg.ig_steps} steps; Occlusion: "
        f"{cfg.digits_occlusion_window}x{cfg.digits_occlusion_window} window, stride "
        f"{cfg.digits_occlusion_stride}. Time: batches of 20 images after a warm-up call, "
        "each batch timed as for the photos, divided by 20. "
        f"Metrics: Choe et al. (CVPR 2020) via "
        "`cam_plugin.metrics.WSOLMetrics`.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------ 3. bridge


def _random_timm(name: str, **kwargs: Any) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _grad_cam_tokens(model: nn.Module, adapter: Any, x: Tensor, classes: Tensor) -> Tensor:
    """Grad-CAM on the patch tokens (B, N, K) with autograd: α_k = mean over patches of
    ∂S_c/∂t_k, map = Σ_k α_k t_k on the patch grid. Captum's LayerGradCam averages the
    gradient over the *last* dims, which for tokens is the channel dim, so it does not apply."""
    from cam_plugin import FeatureCapture

    with FeatureCapture(adapter.feature_module, adapter.capture, detach=False) as cap:
        logits = model(x)
        tokens = cap.value
    assert tokens is not None
    grads = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), tokens)[0]
    feats = adapter.features(tokens.detach(), tuple(x.shape[-2:]))
    g = adapter.features(grads, tuple(x.shape[-2:]))
    alpha = g.mean(dim=(2, 3), keepdim=True)
    return (alpha * feats).sum(1, keepdim=True)


def _closed_form(head: Any, feats: Tensor, classes: Tensor) -> Tensor:
    """h·w · Grad-CAM through one LayerNorm head, in closed form. With p = mean_xy f,
    n = (p − μ)/σ and u = W'_c / σ: ∂S_c/∂p = u − mean(u) − (u·n) n / K, so
    h·w · GradCAM(x, y) = Σ_k (u_k − mean(u) − (u·n) n_k / K) f_k(x, y)."""
    mu, sigma = head.norm_stats(feats)
    p = feats.mean(dim=(2, 3))
    n = (p - mu) / sigma
    u = head.weight[classes] / sigma
    k = feats.shape[1]
    grad = u - u.mean(1, keepdim=True) - (u * n).sum(1, keepdim=True) * n / k
    return torch.einsum("bk,bkhw->bhw", grad, feats)[:, None]


def run_bridge(cfg: Config) -> list[dict[str, Any]]:
    from cam_plugin.integrations.captum import ClassActivationMap
    from cam_plugin.integrations.timm import efficientnet_lite0_pretrained
    from captum.attr import LayerGradCam

    x = torch.cat([preprocess(photo(p), cfg.size)[0] for p in cfg.photos])
    models: list[tuple[str, str, Callable[[], nn.Module]]] = [
        ("timm resnet18 (random init)", "GAP → Linear", partial(_random_timm, "resnet18")),
        ("timm regnety_002 (random init)", "GAP → Linear", partial(_random_timm, "regnety_002")),
        ("tf_efficientnet_lite0 (ImageNet)", "GAP → Linear", efficientnet_lite0_pretrained),
        (
            "timm convnext_atto (random init)",
            "GAP → LayerNorm → Linear",
            partial(_random_timm, "convnext_atto"),
        ),
        (
            "timm vit_tiny_patch16_224, global_pool='avg' (random init)",
            "token mean → LayerNorm → Linear",
            partial(_random_timm, "vit_tiny_patch16_224", global_pool="avg", img_size=cfg.size),
        ),
    ]
    rows = []
    for label, head_desc, make in models:
        model = make()
        cam = ClassActivationMap(model)
        with torch.no_grad():
            logits = model(x)
        classes = logits.argmax(1)
        attr = cam.attribute(x, target=classes)
        h, w = attr.shape[-2:]
        tokens = cam.adapter.layout.kind == "tokens"
        if tokens:
            grad_cam = _grad_cam_tokens(model, cam.adapter, x, classes)
        else:
            grad_cam = LayerGradCam(model, cam.layer).attribute(x, target=classes)
        scaled = grad_cam.detach() * (h * w)
        head = cam.adapter.fold()
        head.weight, head.bias = head.weight.detach(), head.bias.detach()
        row = {
            "model": label,
            "head": head_desc,
            "layer": cam.adapter.feature_name,
            "map": f"{h}x{w}",
            "grad_cam": "autograd on tokens" if tokens else "Captum LayerGradCam",
            "max_abs_diff": float((attr - scaled).abs().max()),
            "max_abs_cam": float(attr.abs().max()),
            "mean_cam_plus_bias_minus_logit": float(
                (
                    attr.mean((2, 3))[:, 0]
                    + head.bias[classes]
                    - logits.gather(1, classes[:, None])[:, 0]
                )
                .abs()
                .max()
            ),
            "max_abs_mean_gradcam_hw": float(scaled.mean((2, 3)).abs().max()),
            "mean_abs_logit_minus_bias": float(
                (logits.gather(1, classes[:, None])[:, 0] - head.bias[classes]).abs().mean()
            ),
        }
        if head.norm_eps is not None and head.pre_weight is None:
            feats = cam.adapter.features(_capture(model, cam.adapter, x), tuple(x.shape[-2:]))
            row["closed_form_err"] = float(
                (_closed_form(head, feats, classes) - scaled).abs().max()
            )
        rows.append(row)
        print(
            f"[bridge] {label}: max|CAM - hw*GradCAM| {row['max_abs_diff']:.3g} "
            f"(max|CAM| {row['max_abs_cam']:.3g})",
            flush=True,
        )
    return rows


def _capture(model: nn.Module, adapter: Any, x: Tensor) -> Tensor:
    from cam_plugin import FeatureCapture

    with torch.no_grad(), FeatureCapture(adapter.feature_module, adapter.capture) as cap:
        model(x)
        value = cap.value
    assert value is not None
    return value


def bridge_table(rows: list[dict[str, Any]], cfg: Config) -> str:
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
    closed = [r for r in rows if "closed_form_err" in r]
    lines += [
        "",
        f"Inputs: the same {len(cfg.photos)} scikit-image photos ({cfg.size}x{cfg.size}), each "
        "model's top-1 class; random-init models are seeded (`torch.manual_seed(0)`) with "
        "timm's default initialisation. Grad-CAM is Captum's `LayerGradCam` on the layer "
        "`ClassActivationMap` uses; for the ViT (tokens) it is computed with autograd on the "
        "patch tokens, because `LayerGradCam` averages gradients over the last dimensions, "
        "which for a `(B, N, K)` token tensor is the channel dimension.",
    ]
    if closed:
        worst = max(r["closed_form_err"] for r in closed)
        lines.append(
            "",
        )
        lines.append(
            f"The closed form of the LayerNorm case (below) reproduces Grad-CAM to {fmt(worst)} "
            "on these models."
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (small settings)")
    for f in Config.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if "bool" in kind:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif "tuple" in kind:
            parser.add_argument(flag, nargs="+", default=None)
        elif "float" in kind:
            parser.add_argument(flag, type=float, default=None)
        elif "int" in kind:
            parser.add_argument(flag, type=int, default=None)
        else:
            parser.add_argument(flag, default=None)
    parser.add_argument(
        "--tables-from",
        default=None,
        metavar="JSON",
        help="rewrite the docs tables from a saved compare_captum.json (no computation)",
    )
    args = vars(parser.parse_args(argv))
    tables_from = args.pop("tables_from")
    if tables_from:
        report = json.loads(Path(tables_from).read_text())
        write_tables(
            report,
            Config(
                **{k: (tuple(v) if isinstance(v, list) else v) for k, v in report["config"].items()}
            ),
        )
        return 0
    cfg = QUICK if args.pop("quick") else Config()
    overrides = {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if v is not None
    }
    cfg = replace(cfg, **overrides)
    torch.set_num_threads(cfg.threads)
    out_dir = ROOT / cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"config": asdict(cfg), "torch": torch.__version__}
    report["photos"] = run_photos(cfg)
    report["digits"] = run_digits(cfg) if cfg.digits else None
    report["bridge"] = run_bridge(cfg) if cfg.bridge else []
    report["seconds"] = time.perf_counter() - t0
    (out_dir / "compare_captum.json").write_text(json.dumps(report, indent=1, default=float))
    write_tables(report, cfg)
    print(f"total {report['seconds']:.0f} s; outputs in {cfg.out_dir}")
    return 0


def write_tables(report: dict[str, Any], cfg: Config) -> None:
    """Print the three tables and, with ``cfg.docs``, write them between their markers."""
    text_photos = photos_table(report["photos"], cfg)
    digits = report.get("digits")
    text_digits = digits_table(digits, cfg) if cfg.digits else ""
    bridge = report.get("bridge") or []
    text_bridge = bridge_table(bridge, cfg) if bridge else ""
    trained = (
        f"the digits model was trained in this run ({digits['train_seconds']:.0f} s)"
        if digits and not str(digits.get("loaded", ""))
        else "the digits model was loaded from its checkpoint"
    )
    footer = (
        f"\n\nWhole run (`make compare`): {report['seconds'] / 60:.1f} min on {cfg.threads} "
        f"threads, torch {report.get('torch', torch.__version__)}; {trained}."
    )
    print("\n\n".join(t for t in (text_photos, text_digits, text_bridge) if t))
    if cfg.docs:
        page = ROOT / "docs" / "cam-vs-captum.md"
        replace_block(page, TABLE_MARKERS, text_photos + footer, "CAM vs Captum")
        if cfg.digits:
            replace_block(page, DIGITS_MARKERS, text_digits, "CAM vs Captum")
        if bridge:
            replace_block(ROOT / "docs" / "captum.md", BRIDGE_MARKERS, text_bridge, "Captum")
        print("wrote docs/cam-vs-captum.md, docs/captum.md")


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    # Captum notes, for every gradient method, that it set requires_grad on the inputs
    warnings.filterwarnings("ignore", message="Input Tensor .* did not already require grad")
    sys.exit(main())
