"""Decoding images into pixels in ``[0, 1]`` without losing their bit depth.

:func:`decode_image` reads a file (or takes an array) and returns a :class:`DecodedImage`
whose ``pixels`` are either ``uint8`` (8-bit sources, value ``v`` meaning ``v / 255``) or
``float32`` already in ``[0, 1]`` (deeper sources). The source's value ``v`` is scaled by the
full range of the type it was stored in, never clipped:

==========================================  ====================================================
source                                      value in ``[0, 1]``
==========================================  ====================================================
8-bit: ``1``, ``L``, ``P``, ``RGB``, ...    ``v / 255`` (kept as ``uint8``)
16-bit unsigned: ``I;16``, ``I;16B``,       ``v / 65535``
``I;16L``, 16-bit RGB(A) PNG / TIFF
16-bit signed (``I;16S``, ``int16``)        ``(v + 32768) / 65535``
32-bit int ``I``                            ``v / 65535`` when the decoder read 16 bits or every
                                            value lies in ``[0, 65535]`` (16-bit data held in
                                            32 bits, as older Pillow reads 16-bit PNGs);
                                            otherwise ``(v + 2^31) / (2^32 − 1)``
float ``F``                                 ``v`` when every value lies in ``[0, 1]``; otherwise
                                            min-max ``(v − lo) / (hi − lo)``, recorded in
                                            ``scaling``; NaN / inf are refused
==========================================  ====================================================

Colour: grayscale stays one channel (the preprocessing replicates it), palette images are
expanded, CMYK / YCbCr / LAB are converted to RGB, and alpha is dropped (as
``PIL.Image.convert("RGB")`` and timm's loader do). Multi-frame files give their first frame.
Pillow reads 16-bit colour PNG / TIFF at 8 bits; those are decoded again with OpenCV at 16.

8-bit sources stay Pillow images (a large photo is held once, as Pillow decoded it); deeper
ones become one float32 array. Anything that cannot be decoded raises
:class:`~cam_plugin.errors.CAMInputError` whose message is the reason only (the caller adds
the path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import CAMInputError

__all__ = ["DecodedImage", "ImageSource", "decode_array", "decode_image"]

#: a file path, or a zero-argument callable returning an array / PIL image (picklable
#: when DataLoader workers are used: a module-level function or ``functools.partial``)
ImageSource = Union[str, Path, Callable[[], Any]]

_TO_RGB = {"CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "P", "PA", "La"}
_UINT16_MAX = 65535.0


@dataclass(frozen=True)
class DecodedImage:
    """An image as read from its source.

    Attributes:
        data: an 8-bit ``L`` or ``RGB`` Pillow image (value ``v / 255``; kept as Pillow
            holds it, so a large photo is not copied), or a float32 ``(H, W)`` /
            ``(H, W, 3)`` array in ``[0, 1]`` (deeper sources).
        mode: the source's Pillow mode (or numpy dtype for arrays).
        bits: bits per sample of the source (1, 8, 16, 32).
        scaling: how source values became ``[0, 1]`` (e.g. ``"v / 65535"``).
    """

    data: Union[Image.Image, np.ndarray]
    mode: str
    bits: int
    scaling: str

    @property
    def pixels(self) -> np.ndarray:
        """``(H, W)`` or ``(H, W, 3)``: ``uint8`` for 8-bit sources, else float32 in ``[0, 1]``."""
        return np.asarray(self.data)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        if isinstance(self.data, Image.Image):
            return int(self.data.height), int(self.data.width)
        return int(self.data.shape[0]), int(self.data.shape[1])

    def info(self) -> dict[str, Any]:
        """``mode``, ``bits`` and ``scaling`` as a JSON-ready dict."""
        return {"mode": self.mode, "bits": self.bits, "scaling": self.scaling}


def decode_image(source: ImageSource) -> DecodedImage:
    """Read ``source`` (a path, or a callable returning an array / PIL image).

    Raises:
        CAMInputError: the file is missing, not an image, truncated, or holds values that
            cannot be put in ``[0, 1]`` (NaN / inf); the message gives the reason.
    """
    if callable(source):
        value = source()
        if isinstance(value, Image.Image):
            return _from_pil(value, None, None)
        return decode_array(value)
    path = Path(source)
    try:
        with Image.open(path) as im:
            decoder_bits = _decoder_bits(im)  # the decoder's tiles are gone after load()
            im.load()
            decoded = _from_pil(im, path, decoder_bits)
    except CAMInputError:
        raise
    except FileNotFoundError as err:
        raise CAMInputError("no such file") from err
    except IsADirectoryError as err:
        raise CAMInputError("is a folder, not an image file") from err
    except PermissionError as err:
        raise CAMInputError("permission denied") from err
    except UnidentifiedImageError as err:
        raise CAMInputError(
            "not an image Pillow can read (unknown format or not an image)"
        ) from err
    except Image.DecompressionBombError as err:
        raise CAMInputError(f"refused as a decompression bomb ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated / corrupt data
        raise CAMInputError(
            f"corrupt or truncated image data ({type(err).__name__}: {err})"
        ) from err
    return decoded


def decode_array(array: Any) -> DecodedImage:
    """An ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array (alpha dropped), scaled by its dtype
    as in the module's table (``bool`` is ``0`` / ``1``)."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[:, :, :3]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CAMInputError(f"an image array must be (H, W) or (H, W, 3), got {arr.shape}")
    if arr.dtype == np.bool_:
        return DecodedImage(Image.fromarray(arr.astype(np.uint8) * 255), "bool", 1, "v")
    return _scaled(arr, str(arr.dtype), decoder_bits=None)


def _from_pil(im: Image.Image, path: Path | None, decoder_bits: int | None) -> DecodedImage:
    mode = im.mode
    if mode in ("RGB", "RGBA") and decoder_bits == 16 and path is not None:
        deep = _read_16bit_colour(path)
        if deep is not None:
            return DecodedImage(deep, f"{mode};16", 16, "v / 65535")
    if mode == "1":
        im, mode_bits = im.convert("L"), 1
    elif mode in ("L", "RGB"):
        mode_bits = 8
    elif mode == "LA":
        im, mode_bits = im.getchannel("L"), 8
    elif mode == "RGBA":
        im, mode_bits = im.convert("RGB"), 8
    elif mode in _TO_RGB:
        im, mode_bits = im.convert("RGBA").convert("RGB"), 8
    elif mode.startswith(("I", "F")):
        return _scaled(np.asarray(im), mode, decoder_bits)
    else:
        raise CAMInputError(f"unsupported Pillow image mode {mode!r}")
    return DecodedImage(im, mode, mode_bits, "v / 255")


def _decoder_bits(im: Image.Image) -> int | None:
    """16 when Pillow's decoder reads 16-bit samples (raw mode ``...;16...``), else None."""
    for tile in getattr(im, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str) and ";16" in raw:
            return 16
    return None


def _read_16bit_colour(path: Path) -> np.ndarray | None:
    """``(H, W, 3)`` float32 of a 16-bit colour file read by OpenCV, or None if it cannot."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        return None
    return _unit(np.ascontiguousarray(arr[:, :, 2::-1]), 0.0, _UINT16_MAX)  # BGR(A) -> RGB


def _unit(arr: np.ndarray, offset: float, span: float) -> np.ndarray:
    """``(arr + offset) / span`` as float32, computed in place on one float32 copy."""
    out = arr.astype(np.float32)
    if offset:
        out += np.float32(offset)
    out *= np.float32(1.0 / span)
    return out


def _scaled(arr: np.ndarray, mode: str, decoder_bits: int | None) -> DecodedImage:
    """Scale an array by the full range of its type (the module's table)."""
    kind, itemsize = arr.dtype.kind, arr.dtype.itemsize
    if kind == "u" and itemsize == 1:
        if arr.ndim == 2 or arr.shape[2] == 3:
            return DecodedImage(Image.fromarray(np.ascontiguousarray(arr)), mode, 8, "v / 255")
        raise CAMInputError(f"unsupported array shape {arr.shape}")  # pragma: no cover
    if kind == "f":
        return _scaled_float(arr.astype(np.float32, copy=False), mode)
    if kind not in "ui":
        raise CAMInputError(f"unsupported pixel type {arr.dtype} (mode {mode!r})")
    if kind == "u" and itemsize == 2:
        return DecodedImage(_unit(arr, 0.0, _UINT16_MAX), mode, 16, "v / 65535")
    if kind == "i" and itemsize == 2:
        return DecodedImage(_unit(arr, 32768.0, _UINT16_MAX), mode, 16, "(v + 32768) / 65535")
    if mode.startswith("I") and (
        decoder_bits == 16 or (int(arr.min()) >= 0 and int(arr.max()) <= _UINT16_MAX)
    ):  # Pillow's 32-bit "I" holding 16-bit data
        return DecodedImage(_unit(arr, 0.0, _UINT16_MAX), mode, 16, "v / 65535")
    info = np.iinfo(arr.dtype)
    span = float(info.max) - float(info.min)
    pixels = ((arr.astype(np.float64) - float(info.min)) / span).astype(np.float32)
    return DecodedImage(pixels, mode, 8 * itemsize, f"(v - {info.min}) / {span:.0f}")


def _scaled_float(arr: np.ndarray, mode: str) -> DecodedImage:
    if not np.isfinite(arr).all():
        raise CAMInputError(f"float image (mode {mode!r}) holds NaN or inf values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return DecodedImage(np.ascontiguousarray(arr), mode, 32, "v")
    span = hi - lo
    pixels = _unit(arr, -lo, span) if span > 0 else np.zeros_like(arr)
    scaling = f"min-max: (v - {lo:g}) / {span:g} (float values outside [0, 1])"
    return DecodedImage(pixels, mode, 32, scaling)
