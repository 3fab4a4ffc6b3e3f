"""The digits table: the cluttered-digits model of the localization benchmark
(``benchmarks/wsol_digits.py``: a timm ResNet-18 cut at ``layer2``, converted to GAP + linear
with :mod:`cam_plugin.convert`), trained here with that benchmark's recipe and code, on
held-out images of its generator, for each image's ground-truth class."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Optional

import torch

from .config import METHODS, ROOT, Config
from .digits_model import digits_config, digits_model, load_wsol, no_inplace_relu
from .methods import Settings, freeze
from .photos import to_pixels
from .scoreboard import Dataset


def digits_dataset(cfg: Config) -> Optional[Dataset]:
    """The held-out digits, their labels and the trained model; ``None`` when the
    localization modules are not installed."""
    import cam_plugin as cp

    wsol = load_wsol()
    if wsol is None:
        return None
    wcfg = digits_config(wsol, cfg)
    t0 = time.perf_counter()
    test = wsol.render("test", wcfg.test_size, wcfg)
    model, stats = digits_model(wsol, wcfg, ROOT / cfg.digits_checkpoint)
    model = freeze(no_inplace_relu(model.eval()))
    images = wsol.normalize_images(test["image"])
    labels = test["label"]
    with torch.no_grad():
        preds = model(images).argmax(1)
    adapter = cp.resolve(model, example=images[:1])
    settings = Settings(
        layer=adapter.feature_name,
        ig_steps=cfg.ig_steps,
        window=cfg.digits_occlusion_window,
        stride=cfg.digits_occlusion_stride,
        scorecam_batch=cfg.scorecam_batch,
        pixels=to_pixels,  # wsol_digits.normalize_images is the same (x - 0.5) / 0.5
    )
    with torch.no_grad():
        feats = cp.CAM(model)(images[:1], targets=labels[:1, None]).maps
    info: dict[str, Any] = {
        "layer": adapter.feature_name,
        "map_size": f"{feats.shape[-2]}x{feats.shape[-1]}",
        "accuracy": float((preds == labels).float().mean() * 100),
        "recipe": cfg.digits_recipe,
        "wsol_config": asdict(wcfg),
        "train_seconds": stats.get("train_seconds"),
        "final_loss": stats.get("final_loss"),
        "loaded": stats.get("loaded", ""),
        "checkpoint": cfg.digits_checkpoint,
        "setup_seconds": time.perf_counter() - t0,
        "crops": [img.permute(1, 2, 0).numpy() for img in test["image"][:4]],
    }
    return Dataset(
        name="digits",
        model=model,
        images=images,
        classes=labels,
        settings=settings,
        batch=cfg.digits_batch,
        random_n=min(cfg.digits_random_images, images.shape[0]),
        random_layers=cfg.digits_random_layers,
        boxes=list(test["boxes"]),
        masks=test["mask"],
        ids=[int(i) for i in test["index"]],
        extra=info,
    )


def digit_methods() -> list[str]:
    """Every method runs on the digits (ScoreCAM too: 128 channels at 64x64)."""
    return list(METHODS)
