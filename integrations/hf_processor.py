"""HuggingFace image processors as cam-plugin preprocessing, with their geometry.

A transformers image processor (``ConvNextImageProcessor``, ``ViTImageProcessor``, ...)
turns a picture into ``pixel_values``; :class:`ProcessorPreprocess` runs the processor
itself for the model's input (so the tensor is exactly what the processor gives) and
computes where each pixel of that input came from, so maps and boxes go back to the
original picture (:meth:`cam_plugin.preprocess.Prepared.to_original`).

The geometry of an ``h0 × w0`` picture (:func:`processor_geometry`), as the processors
compute it:

* ``ConvNextImageProcessor`` (ResNet, RegNet, ConvNeXt checkpoints), ``size =
  {"shortest_edge": e}``, ``crop_pct`` ``p``: for ``e < 384`` the short side is resized to
  ``int(e / p)`` and the long side to ``int(int(e / p) · long / short)``, then a centre
  crop ``e × e``; for ``e ≥ 384`` a plain resize to ``e × e`` (no crop);
* the others listed in :data:`GENERIC` (ViT / DeiT / BEiT / Swin, BiT / DINOv2, CLIP,
  MobileNet, MobileViT, EfficientNet, PVT, and the ``*Fast`` processors whose resize is the
  base class's): ``size = {"height", "width"}`` is a plain resize to that size,
  ``{"shortest_edge": e}`` resizes the short side to ``e`` and the long side to
  ``int(e · long / short)``; then, with ``do_center_crop``, a centre crop to ``crop_size``;
* the crop's offset is ``(resized − crop) // 2`` per axis (negative: zero padding), or
  ``int(round((resized − crop) / 2))`` for the torchvision-based ``*Fast`` processors.

A resized pixel ``(x, y)`` sits at ``((x + 0.5) / s_x − 0.5, (y + 0.5) / s_y − 0.5)`` with
``s_x = resized_w / w0`` and ``s_y = resized_h / h0`` (Pillow's and torchvision's pixel-centre
convention). Processors whose resize does something else (LeViT, PoolFormer,
EfficientFormer, ...) are refused with what to do instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import transformers
from PIL import Image

from cam_plugin.errors import CAMInputError
from cam_plugin.images import DecodedImage
from cam_plugin.preprocess import DataConfig, Prepared

__all__ = [
    "CONVNEXT",
    "GENERIC",
    "Geometry",
    "ProcessorPreprocess",
    "data_config",
    "load_processor",
    "override",
    "processor_geometry",
    "processor_of_model",
]

#: the processor whose resize crops by ``crop_pct`` (module doc)
CONVNEXT = "ConvNextImageProcessor"
#: processors whose resize is the plain ``height/width`` or ``shortest_edge`` resize
GENERIC = frozenset(
    {
        "ViTImageProcessor",
        "DeiTImageProcessor",
        "BeitImageProcessor",
        "BitImageProcessor",
        "CLIPImageProcessor",
        "SiglipImageProcessor",
        "MobileNetV1ImageProcessor",
        "MobileNetV2ImageProcessor",
        "MobileViTImageProcessor",
        "EfficientNetImageProcessor",
        "PvtImageProcessor",
        "ViTHybridImageProcessor",
    }
)
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class Geometry:
    """Where the processor puts an ``h0 × w0`` picture: ``resized`` ``(h, w)`` after the
    resize, ``output`` ``(h, w)`` of ``pixel_values``, and the crop's ``top`` / ``left``
    offsets in the resized picture (negative when it pads)."""

    resized: tuple[int, int]
    output: tuple[int, int]
    top: int
    left: int


def _field(size: Any, key: str) -> Optional[int]:
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return int(value) if value is not None else None


def _short_side(h0: int, w0: int, edge: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)``."""
    if w0 <= h0:
        return int(edge * h0 / w0), edge
    return edge, int(edge * w0 / h0)


def _offset(resized: int, crop: int, fast: bool) -> int:
    if fast and resized >= crop:
        return int(round((resized - crop) / 2.0))
    if fast:
        return -((crop - resized) // 2)
    return (resized - crop) // 2


def _kind(processor: Any) -> tuple[str, bool]:
    """``(class name without Fast, is a Fast processor)``; refuses unknown resizes."""
    cls = type(processor)
    name = cls.__name__
    fast = name.endswith("Fast")
    base = name[: -len("Fast")] if fast else name
    if base == CONVNEXT or base in GENERIC:
        return base, fast
    owner = next((c.__name__ for c in cls.__mro__ if "resize" in vars(c)), "")
    if fast and owner == "BaseImageProcessorFast":
        return base, fast
    raise CAMInputError(
        f"{name}: cam-plugin does not know where this processor's resize and crop put each "
        f"pixel (supported: {CONVNEXT}, {', '.join(sorted(GENERIC))} and their Fast "
        "versions); pass preprocess=cam_plugin.preprocess.DataConfig(...) or a callable "
        "DecodedImage -> Prepared"
    )


def processor_geometry(processor: Any, h0: int, w0: int) -> Geometry:
    """The resize and centre crop of ``processor`` on an ``h0 × w0`` picture (module doc).

    Raises:
        CAMInputError: a processor whose geometry is not modelled here, or a size that
            names neither ``height``/``width`` nor ``shortest_edge``.
    """
    base, fast = _kind(processor)
    size = getattr(processor, "size", None) or {}
    edge, height, width = (_field(size, k) for k in ("shortest_edge", "height", "width"))
    crop: Optional[tuple[int, int]] = None
    if not getattr(processor, "do_resize", True):
        resized = (h0, w0)
    elif base == CONVNEXT and edge is not None:
        if edge < 384:
            resized = _short_side(h0, w0, int(edge / float(processor.crop_pct)))
            crop = (edge, edge)
        else:
            resized = (edge, edge)
    elif height is not None and width is not None:
        resized = (height, width)
    elif edge is not None and _field(size, "longest_edge") is None:
        resized = _short_side(h0, w0, edge)
    else:
        raise CAMInputError(
            f"{type(processor).__name__}: size {dict(size) if isinstance(size, Mapping) else size}"
            " names neither height/width nor shortest_edge alone; cam-plugin cannot place "
            "its pixels (pass preprocess= a DataConfig or a callable)"
        )
    if base != CONVNEXT and getattr(processor, "do_center_crop", False):
        crop_size = getattr(processor, "crop_size", None) or {}
        crop = (int(_field(crop_size, "height") or 0), int(_field(crop_size, "width") or 0))
    if crop is None:
        return Geometry(resized, resized, 0, 0)
    top, left = (_offset(r, c, fast) for r, c in zip(resized, crop))
    return Geometry(resized, crop, top, left)


def _rgb_picture(image: DecodedImage) -> Image.Image:
    """The picture as 8-bit RGB (what the processor reads; deeper sources rounded)."""
    if isinstance(image.data, Image.Image):
        return image.data.convert("RGB") if image.data.mode != "RGB" else image.data
    values = image.data if image.data.ndim == 3 else np.repeat(image.data[:, :, None], 3, axis=2)
    return Image.fromarray((np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


class ProcessorPreprocess:
    """``ProcessorPreprocess(processor)(decoded) -> Prepared``: ``pixel_values`` from the
    processor itself, the picture and the geometry from :func:`processor_geometry`
    (``scale`` = ``s_x``, ``scale_y`` = ``s_y``)."""

    def __init__(self, processor: Any) -> None:
        _kind(processor)
        self.processor = processor
        resample = getattr(processor, "resample", None)
        self.resample = Image.Resampling(int(resample)) if resample is not None else None

    def __call__(self, image: DecodedImage) -> Prepared:
        h0, w0 = image.size
        geo = processor_geometry(self.processor, h0, w0)
        picture = _rgb_picture(image)
        pixels = self.processor(images=picture, return_tensors="pt")["pixel_values"][0].float()
        if tuple(pixels.shape[-2:]) != geo.output:
            raise CAMInputError(
                f"{type(self.processor).__name__} gave pixel_values of {tuple(pixels.shape)} "
                f"for a {h0}x{w0} picture, not the {geo.output} cam-plugin expected from its "
                "size and crop_size; pass preprocess= a DataConfig or a callable"
            )
        (rh, rw), (oh, ow) = geo.resized, geo.output
        shown = picture.resize((rw, rh), self.resample or Image.Resampling.BILINEAR)
        crop = np.asarray(shown.crop((geo.left, geo.top, geo.left + ow, geo.top + oh)))
        return Prepared(
            pixels.contiguous(),
            np.ascontiguousarray(crop),
            (h0, w0),
            rw / w0,
            geo.left,
            geo.top,
            scale_y=rh / h0,
        )


def load_processor(config: Mapping[str, Any]) -> Any:
    """The image processor described by ``config`` (the content of a
    ``preprocessor_config.json``: its ``image_processor_type`` names the class)."""
    name = config.get("image_processor_type")
    cls = getattr(transformers, str(name), None) if name else None
    if cls is None:
        raise CAMInputError(
            f"{PROCESSOR_FILE}: image_processor_type {name!r} is not a transformers image "
            f"processor class (transformers {transformers.__version__})"
        )
    return cls.from_dict(dict(config))


def _json_dict(processor: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(processor.to_json_string())
    out.setdefault("image_processor_type", type(processor).__name__)
    return out


def data_config(processor: Any, source: str) -> DataConfig:
    """A :class:`DataConfig` that carries ``processor`` (as its JSON dict, so a run's
    ``run.json`` rebuilds it) and describes it: the output size, the crop fraction of the
    short side, the resampling filter, mean and std."""
    _kind(processor)
    geo = processor_geometry(processor, 1000, 1000)
    normalize = getattr(processor, "do_normalize", True)
    mean = tuple(float(v) for v in processor.image_mean) if normalize else (0.0,) * 3
    std = tuple(float(v) for v in processor.image_std) if normalize else (1.0,) * 3
    crop_pct = min(1.0, min(geo.output) / max(1, min(geo.resized)))
    resample = getattr(processor, "resample", None)
    return DataConfig(
        input_size=(3, *geo.output),
        crop_pct=round(crop_pct, 6),
        interpolation=_RESAMPLE_NAMES.get(int(resample) if resample is not None else 2, "bilinear"),
        mean=mean,
        std=std,
        source=source,
        processor=_json_dict(processor),
    )


def processor_of_model(model: Any) -> Optional[DataConfig]:
    """The :func:`data_config` of the image processor saved with ``model``: the
    ``preprocessor_config.json`` of the directory it was loaded from (``model.name_or_path``),
    or, for a Hub id, the one in transformers' local cache (nothing is downloaded); ``None``
    when there is none."""
    where = str(getattr(model, "name_or_path", None) or "")
    if not where:
        return None
    path = Path(where) / PROCESSOR_FILE
    if path.is_file():
        processor = load_processor(json.loads(path.read_text()))
        return data_config(processor, f"{path} ({type(processor).__name__})")
    if Path(where).exists():
        return None
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None
    return data_config(processor, f"image processor of {where} ({type(processor).__name__})")


def override(
    config: Mapping[str, Any], input_size: Optional[int], crop_pct: Optional[float]
) -> dict[str, Any]:
    """The processor dict ``config`` with a square output of ``input_size`` and / or a
    crop of ``crop_pct`` (``--input-size`` / ``--crop-pct``).

    * ConvNeXt: ``size = {"shortest_edge": input_size}`` and ``crop_pct``;
    * with a centre crop: ``crop_size = input_size × input_size`` (default: the current
      crop's height), and ``size`` is ``round(crop / crop_pct)`` (``shortest_edge``, or
      square ``height`` / ``width``) when ``crop_pct`` is given, else scaled by
      ``input_size / old crop height``;
    * without one: ``size`` is ``input_size`` (``shortest_edge``, or square ``height`` /
      ``width``); ``crop_pct`` is refused (nothing is cropped).

    Raises:
        CAMInputError: ``crop_pct`` for a processor that does not crop.
    """
    out = dict(config)
    if str(out.get("image_processor_type", "")).removesuffix("Fast") == CONVNEXT:
        if input_size is not None:
            out["size"] = {"shortest_edge": int(input_size)}
        if crop_pct is not None:
            out["crop_pct"] = float(crop_pct)
        return out
    size = {k: int(v) for k, v in dict(out.get("size") or {}).items() if v is not None}
    by_edge = "shortest_edge" in size

    def sized(value: int) -> dict[str, int]:
        return {"shortest_edge": value} if by_edge else {"height": value, "width": value}

    if not out.get("do_center_crop"):
        if crop_pct is not None:
            raise CAMInputError(
                f"--crop-pct: {out.get('image_processor_type')} does not centre-crop "
                "(do_center_crop is off); use --input-size only"
            )
        if input_size is not None:
            out["size"] = sized(int(input_size))
        return out
    old = int(dict(out.get("crop_size") or {}).get("height") or 0)
    side = int(input_size) if input_size is not None else old
    out["crop_size"] = {"height": side, "width": side}
    if crop_pct is not None:
        out["size"] = sized(int(round(side / crop_pct)))
    elif old and side != old:
        out["size"] = {k: int(round(v * side / old)) for k, v in size.items()}
    return out
