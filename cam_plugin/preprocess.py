"""Evaluation preprocessing of a classifier: resize, centre crop, normalize, and the way back.

For a :class:`DataConfig` with input size ``(C, H, W)``, ``crop_pct`` ``p``, mean ``μ`` and
std ``σ``, an image of ``h0 × w0`` pixels with values ``v`` in ``[0, 1]`` becomes

    s = round(min(H, W) / p) / min(h0, w0)             (resize factor)
    resized to (max(W, round(w0 s)), max(H, round(h0 s)))
    left = (resized_w − W) // 2,  top = (resized_h − H) // 2      (centre crop)
    x = (v − μ) / σ                                      (per channel)

so a pixel ``(x, y)`` of the crop sits at ``((x + left) / s, (y + top) / s)`` in the
original image (:meth:`Prepared.to_original`). This is timm's evaluation transform for
``crop_mode="center"`` (Pillow resampling; 8-bit sources are resized as 8-bit RGB, deeper
sources per channel in float32, so nothing is rounded to 8 bits before the model sees it).

A HuggingFace image processor is preprocessing too: a ``DataConfig`` may carry one
(``processor``, the JSON dict of its ``preprocessor_config.json``; :meth:`DataConfig.for_model`
reads it for a transformers model loaded from a directory), and then :class:`Preprocess` runs
that processor, with its own resize / crop geometry
(:mod:`cam_plugin.integrations.hf_processor`; its resize may scale the two axes differently:
``Prepared.scale_y``). :func:`as_transform` turns any accepted ``preprocess`` (a
``DataConfig``, an image processor object, a callable) into ``DecodedImage -> Prepared``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .errors import CAMInputError
from .images import DecodedImage

__all__ = [
    "DataConfig",
    "Prepared",
    "Preprocess",
    "as_transform",
    "box_to_original",
    "is_image_processor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's "L"


@dataclass(frozen=True)
class DataConfig:
    """What the model expects: ``input_size`` ``(C, H, W)``, ``crop_pct``, ``interpolation``
    (a Pillow filter name), ``mean`` and ``std`` (one per channel, for values in ``[0, 1]``),
    and where these came from (``source``). ``processor``: the JSON dict of a HuggingFace
    image processor (``preprocessor_config.json``) that does the preprocessing instead (the
    other fields then describe it), or ``None``."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    source: str = field(default="ImageNet defaults", compare=False)
    processor: Optional[dict[str, Any]] = field(default=None, hash=False)

    def __post_init__(self) -> None:
        c = self.input_size[0]
        if len(self.input_size) != 3 or c not in (1, 3):
            raise CAMInputError(f"input_size must be (1 or 3, H, W), got {self.input_size}")
        if len(self.mean) != c or len(self.std) != c or min(self.std) <= 0:
            raise CAMInputError(
                f"mean {self.mean} and std {self.std} need {c} values each (std > 0)"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise CAMInputError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @classmethod
    def for_model(cls, model: nn.Module) -> DataConfig:
        """timm's ``resolve_data_config`` for models that carry a ``pretrained_cfg`` (when
        timm is installed); for a transformers model loaded from a directory with a
        ``preprocessor_config.json``, that image processor; an mmengine
        ``data_preprocessor``'s mean / std; otherwise ImageNet defaults at 224 px."""
        if type(model).__module__.startswith("transformers."):
            from cam_plugin.integrations.hf_processor import processor_of_model

            own = processor_of_model(model)
            if own is not None:
                return own
        if getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None):
            try:
                from timm.data import resolve_data_config
            except ImportError:  # pragma: no cover - depends on the environment
                return cls()
            cfg = resolve_data_config({}, model=model)
            return cls(
                input_size=tuple(int(v) for v in cfg["input_size"]),  # type: ignore[arg-type]
                crop_pct=float(cfg.get("crop_pct") or 1.0),
                interpolation=str(cfg.get("interpolation") or "bilinear"),
                mean=tuple(float(v) for v in cfg["mean"]),
                std=tuple(float(v) for v in cfg["std"]),
                source="timm data config of the model",
            )
        pre = getattr(model, "data_preprocessor", None)
        mean, std = getattr(pre, "mean", None), getattr(pre, "std", None)
        if isinstance(mean, Tensor) and isinstance(std, Tensor) and mean.numel() == 3:
            # mmpretrain / mmengine: mean and std in 0..255 pixel units, as buffers
            return cls(
                mean=tuple(round(float(v) / 255.0, 6) for v in mean.flatten()),
                std=tuple(round(float(v) / 255.0, 6) for v in std.flatten()),
                source="data_preprocessor of the model (mmengine)",
            )
        return cls()

    def with_overrides(
        self, input_size: int | None = None, crop_pct: float | None = None
    ) -> DataConfig:
        """This config with a square ``input_size`` and / or another ``crop_pct``
        (``--input-size`` / ``--crop-pct``)."""
        from dataclasses import replace

        if input_size is not None and input_size < 8:
            raise CAMInputError(f"--input-size must be >= 8, got {input_size}")
        if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
            raise CAMInputError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if self.processor is not None and (input_size is not None or crop_pct is not None):
            from cam_plugin.integrations.hf_processor import data_config, load_processor, override

            changed = load_processor(override(self.processor, input_size, crop_pct))
            return data_config(changed, f"{self.source}, overridden on the command line")
        out = self
        if input_size is not None:
            if input_size < 8:
                raise CAMInputError(f"--input-size must be >= 8, got {input_size}")
            out = replace(out, input_size=(out.input_size[0], input_size, input_size))
        if crop_pct is not None:
            out = replace(out, crop_pct=crop_pct)
        if out is not self:
            out = replace(out, source=f"{self.source}, overridden on the command line")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``processor`` only when there is one)."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if out["processor"] is None:
            del out["processor"]
        return out


@dataclass(frozen=True)
class Prepared:
    """One preprocessed image: ``tensor`` ``(C, H, W)`` float32 for the model, ``picture``
    ``(H, W, 3)`` uint8 (the crop as a person sees it), ``original_size`` ``(h0, w0)`` and the
    crop's geometry: ``scale`` (horizontal: resized width / ``w0``), ``left``, ``top``, and
    ``scale_y`` (vertical, resized height / ``h0``; ``None``: the same as ``scale``)."""

    tensor: Tensor
    picture: np.ndarray
    original_size: tuple[int, int]
    scale: float
    left: int
    top: int
    scale_y: Optional[float] = None

    @property
    def scales(self) -> tuple[float, float]:
        """``(s_y, s_x)``: resized / original size along each axis."""
        return (self.scale if self.scale_y is None else self.scale_y), self.scale

    def to_original(self, box: Sequence[float]) -> list[float]:
        """An ``(x0, y0, x1, y1)`` box of the crop in original-image pixels (``(x + left)
        / s_x``, ``(y + top) / s_y``, rounded to 0.1; :func:`box_to_original`)."""
        sy, sx = self.scales
        out = box_to_original(box, sx, self.left, self.top, scale_y=sy)
        return [round(float(v), 1) for v in out]


def box_to_original(
    boxes: Any, scale: float, left: float, top: float, scale_y: Optional[float] = None
) -> np.ndarray:
    """Continuous boxes ``(..., 4)`` ``(x0, y0, x1, y1)`` of the model's input on the original
    picture: ``x → (x + left) / s_x``, ``y → (y + top) / s_y`` with ``s_x = scale`` and
    ``s_y = scale_y`` (default ``scale``): the inverse of the preprocessing's resize by
    ``(s_y, s_x)`` then crop at ``(left, top)`` (:class:`Prepared`). float64, not clipped."""
    b = np.asarray(boxes, dtype=np.float64)
    sy = float(scale if scale_y is None else scale_y)
    shift = np.asarray([left, top, left, top], dtype=np.float64)
    factor = np.asarray([scale, sy, scale, sy], dtype=np.float64)
    return (b + shift) / factor


def is_image_processor(value: Any) -> bool:
    """True for a HuggingFace ``transformers`` image processor object."""
    module = type(value).__module__
    return module.startswith("transformers.") and callable(getattr(value, "preprocess", None))


def as_transform(preprocess: Any) -> Callable[[DecodedImage], Prepared]:
    """``DecodedImage -> Prepared`` for a ``preprocess`` argument: a :class:`DataConfig`
    (:class:`Preprocess`), a transformers image processor
    (:class:`cam_plugin.integrations.hf_processor.ProcessorPreprocess`), or a callable that
    already is one."""
    if isinstance(preprocess, DataConfig):
        return Preprocess(preprocess)
    if is_image_processor(preprocess):
        from cam_plugin.integrations.hf_processor import ProcessorPreprocess

        return ProcessorPreprocess(preprocess)
    if callable(preprocess):
        return preprocess  # type: ignore[no-any-return]
    raise CAMInputError(
        "preprocess must be 'auto', None, a cam_plugin.preprocess.DataConfig, a transformers "
        f"image processor or a callable DecodedImage -> Prepared; got {type(preprocess).__name__}"
    )


class Preprocess:
    """``Preprocess(config)(decoded) -> Prepared``: the module's resize, crop and normalize
    (or, when ``config.processor`` is set, that HuggingFace image processor)."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.processor: Optional[Callable[[DecodedImage], Prepared]] = None
        if config.processor is not None:
            from cam_plugin.integrations.hf_processor import ProcessorPreprocess, load_processor

            self.processor = ProcessorPreprocess(load_processor(config.processor))
        self.resample = _RESAMPLE.get(config.interpolation, Image.Resampling.BILINEAR)
        self.mean = np.asarray(config.mean, dtype=np.float32)
        self.std = np.asarray(config.std, dtype=np.float32)

    def geometry(self, h0: int, w0: int) -> tuple[float, tuple[int, int], int, int]:
        """``(scale, (resized_w, resized_h), left, top)`` for an ``h0 × w0`` image."""
        _, height, width = self.config.input_size
        short = int(round(min(height, width) / self.config.crop_pct))
        scale = short / min(w0, h0)
        size = (max(width, round(w0 * scale)), max(height, round(h0 * scale)))
        return scale, size, (size[0] - width) // 2, (size[1] - height) // 2

    def __call__(self, image: DecodedImage) -> Prepared:
        if self.processor is not None:
            return self.processor(image)
        h0, w0 = image.size
        _, height, width = self.config.input_size
        scale, size, left, top = self.geometry(h0, w0)
        box = (left, top, left + width, top + height)
        if isinstance(image.data, Image.Image):  # 8-bit L / RGB
            crop = np.asarray(image.data.resize(size, self.resample).crop(box))
            values = crop.astype(np.float32) / 255.0
        else:  # deeper than 8 bits: resize each channel in float32
            pixels = image.data
            chans = pixels[:, :, None] if pixels.ndim == 2 else pixels
            values = np.stack(
                [
                    np.asarray(
                        Image.fromarray(np.ascontiguousarray(chans[:, :, c], dtype=np.float32))
                        .resize(size, self.resample)
                        .crop(box)
                    )
                    for c in range(chans.shape[2])
                ],
                axis=2,
            ).clip(0.0, 1.0)  # bicubic overshoot only; the source is already in [0, 1]
            crop = (values * 255.0 + 0.5).astype(np.uint8)
        values = values[:, :, None] if values.ndim == 2 else values
        crop = crop[:, :, None] if crop.ndim == 2 else crop
        if self.config.input_size[0] == 1 and values.shape[2] == 3:
            values = (values @ _LUMA)[:, :, None]
        elif self.config.input_size[0] == 3 and values.shape[2] == 1:
            values = np.repeat(values, 3, axis=2)
        picture = np.repeat(crop, 3, axis=2) if crop.shape[2] == 1 else crop
        tensor = torch.from_numpy(((values - self.mean) / self.std).transpose(2, 0, 1).copy())
        return Prepared(tensor, np.ascontiguousarray(picture), (h0, w0), scale, left, top)
