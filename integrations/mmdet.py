"""mmdet: CAM for detection backbones, and a CAM probe that trains inside a detection run.

A detector has no image classifier, so there is no class activation map to read from it
directly. Two ways to get one:

* **Convert the backbone.** An mmdet backbone built with ``mmdet.registry.MODELS.build``
  returns a tuple with one ``(B, K, h, w)`` map per ``out_indices`` entry;
  :func:`cam_plugin.convert` picks one (``stage`` is the position in that tuple), adds
  ``[3x3 conv] -> GAP -> Linear`` and the result is trained on image-level labels like any
  classifier: ``S_c = Σ_k w_ck mean_xy f_k + b_c`` and ``M_c = Σ_k w_ck f_k``, so
  ``mean_xy M_c + b_c = S_c`` exactly.
* **Probe a running detector.** :class:`CAMProbeHook` (registered in mmengine's root
  ``HOOKS``, so it builds under ``default_scope='mmdet'``) trains a multi-label
  GAP + linear probe on the detector's own backbone (or neck) features, captured during the
  run's own forward passes, on detached tensors and with its own optimizer: the detector's
  losses, gradients, parameters and RNG streams are exactly those of the run without it.
  At validation it reports the probe's multi-label mAP and draws, through the runner's
  visualizer, the CAM of every class present in an image, mapped back onto the original
  image (padding cropped, resize and flip undone).

For the probe, with the valid (unpadded) cells ``Ω`` of the captured map ``f`` of one image
(mmengine pads batches at the bottom and right; padded cells are left out):

    p_k = (1/|Ω|) Σ_{(x,y)∈Ω} f_k(x, y)            (masked global average pool)
    S_c = Σ_k w_ck p_k + b_c                        (multi-label logits, sigmoid / BCE)
    M_c(x, y) = Σ_k w_ck f_k(x, y)                  (the CAM)
    =>  S_c = mean_Ω M_c + b_c                       (the exactness identity)

Config::

    custom_imports = dict(imports=["cam_plugin.integrations.mmdet"], allow_failed_imports=False)
    custom_hooks = [dict(type="CAMProbeHook", feature="backbone", index=-1)]

Importing this module also registers :class:`ClutteredDigitsDetection` (mmengine's root
``DATASETS``): several handwritten digits per image in clutter, with boxes, as an
mmdet-style data set, and an adapter that makes ``cam_plugin.CAM(mmdet_model)`` fail with
a message naming the two routes above.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import math
import os
import os.path as osp
import random
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.dist import (
    all_reduce,
    broadcast_object_list,
    collect_results,
    get_world_size,
    is_main_process,
)
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import DATASETS, HOOKS, OPTIMIZERS
from mmengine.runner import BaseLoop
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cam_plugin.adapter import Adapter
from cam_plugin.errors import CAMInputError, UnsupportedHeadError
from cam_plugin.localize import threshold_boxes
from cam_plugin.registry import register_adapter
from cam_plugin.result import minmax_normalize
from cam_plugin.viz import draw_box, overlay

from .mmengine import ClutteredDigitsBase

__all__ = [
    "CAMProbe",
    "CAMProbeHook",
    "ClutteredDigitsDetection",
    "is_mmdet_model",
    "maps_to_original",
    "mmdet_adapter",
    "multilabel_average_precision",
    "valid_cell_mask",
]

PROBE_FORMAT = "cam_plugin.CAMProbe/1"


# ----------------------------------------------------------------------------- registry


def is_mmdet_model(model: nn.Module) -> bool:
    """True when the model's class comes from mmdet."""
    return type(model).__module__.split(".")[0] == "mmdet"


def mmdet_adapter(model: nn.Module) -> Optional[Adapter]:
    """Refuse mmdet models with a message naming what works.

    mmdet backbones and detectors end in no ``GAP -> affine`` image classifier, so no
    exact CAM exists for them as they are.

    Raises:
        UnsupportedHeadError: always, naming :func:`cam_plugin.convert` and
            :class:`CAMProbeHook`.
    """
    name = type(model).__name__
    raise UnsupportedHeadError(
        f"mmdet's {name} has no image classifier (global average pool -> linear layer), so "
        "it has no class activation map as it is. For a backbone: "
        "cam_plugin.convert(backbone, num_classes=..., stage=...) attaches a GAP + linear "
        "head to one of its stage maps; train it on image-level labels. Inside a detection "
        "run: add dict(type='CAMProbeHook') to custom_hooks (with custom_imports="
        "dict(imports=['cam_plugin.integrations.mmdet'])) to train a CAM probe on the "
        "detector's own features."
    )


register_adapter(is_mmdet_model, mmdet_adapter, name="mmdet")


# ----------------------------------------------------------------------------- the probe


class CAMProbe(nn.Module):
    """A multi-label GAP + linear classifier on a captured feature map.

    ``forward(f, mask)`` returns ``S = W · mean_Ω f + b`` (``Ω``: the cells where ``mask``
    is true, every cell when ``mask`` is ``None``); :meth:`maps` returns
    ``M_c = Σ_k W_ck f_k``, so ``mean_Ω M_c + b_c = S_c``. The weights start at zero (no
    random numbers are drawn: creating a probe never moves any RNG).

    Args:
        num_features: channels ``K`` of the feature map.
        num_classes: classes ``C``.
    """

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        for value, what in ((num_features, "num_features"), (num_classes, "num_classes")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CAMInputError(f"CAMProbe: {what} must be an int >= 1, got {value!r}")
        self.fc = nn.Linear(num_features, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.num_features = num_features
        self.num_classes = num_classes

    @staticmethod
    def pool(features: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Masked global average pool: ``(B, K, h, w)`` -> ``(B, K)``, fp32.

        Args:
            features: the feature map.
            mask: bool ``(B, h, w)`` of the valid cells, or ``None`` for all of them.
        """
        f = features.float()
        if mask is None:
            return f.mean(dim=(2, 3))
        m = mask.to(dtype=f.dtype, device=f.device)[:, None]
        return (f * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1.0)

    def forward(self, features: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Logits ``(B, C)`` of a feature map ``(B, K, h, w)`` (``mask`` as in :meth:`pool`)."""
        return self.fc(self.pool(features, mask))

    def maps(self, features: Tensor, classes: Optional[Tensor] = None) -> Tensor:
        """CAMs ``M_c = Σ_k W_ck f_k`` (no bias).

        Args:
            features: ``(B, K, h, w)``.
            classes: ``(B, n)`` class indices, or ``None`` for every class.

        Returns:
            ``(B, n, h, w)`` (``n = C`` without ``classes``), fp32.
        """
        f = features.float()
        weight = self.fc.weight.to(f.dtype)
        if classes is None:
            return torch.einsum("bkhw,ck->bchw", f, weight)
        return torch.einsum("bkhw,bnk->bnhw", f, weight[classes.long()])


def valid_cell_mask(
    img_shapes: Sequence[Optional[Sequence[int]]],
    input_hw: Sequence[int],
    feature_hw: Sequence[int],
    device: Union[torch.device, str, None] = None,
) -> Tensor:
    """Feature cells that see the image, not the padding: bool ``(B, h, w)``.

    mmengine's data preprocessors pad each image at the bottom and right up to the batch
    size ``(H, W)``; an image of ``img_shape = (h_i, w_i)`` covers the first
    ``ceil(h_i · h / H)`` rows and ``ceil(w_i · w / W)`` columns of an ``(h, w)`` map.
    An image without ``img_shape`` (``None``) counts as unpadded.

    Args:
        img_shapes: ``(h_i, w_i)`` per image (or ``None``).
        input_hw: ``(H, W)`` of the batch tensor.
        feature_hw: ``(h, w)`` of the feature map.
        device: device of the mask.
    """
    big_h, big_w = float(input_hw[0]), float(input_hw[1])
    h, w = int(feature_hw[0]), int(feature_hw[1])
    rows, cols = [], []
    for shape in img_shapes:
        if shape is None:
            rows.append(h)
            cols.append(w)
            continue
        rows.append(min(h, max(1, math.ceil(float(shape[0]) * h / big_h - 1e-6))))
        cols.append(min(w, max(1, math.ceil(float(shape[1]) * w / big_w - 1e-6))))
    r = torch.tensor(rows, device=device)
    c = torch.tensor(cols, device=device)
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    return (ys[None, :, None] < r[:, None, None]) & (xs[None, None, :] < c[:, None, None])


def multilabel_average_precision(scores: Tensor, targets: Tensor) -> tuple[float, Tensor]:
    """Mean average precision of multi-label scores (non-interpolated, per class).

    For class ``c``, rank the images by score (descending): ``AP_c = (1/P_c) Σ_i
    precision@i · rel_i`` with ``P_c`` positives; ``mAP`` is the mean over classes with at
    least one positive. Vectorised over classes.

    Args:
        scores: ``(N, C)`` scores (logits or probabilities: only the order matters).
        targets: ``(N, C)`` 0/1 labels.

    Returns:
        ``(mAP, AP)`` with ``AP`` ``(C,)`` (``nan`` for classes without positives); ``mAP``
        is ``nan`` when no class has a positive.
    """
    if scores.shape != targets.shape or scores.dim() != 2:
        raise CAMInputError(
            f"scores and targets must both be (N, C); got {tuple(scores.shape)} and "
            f"{tuple(targets.shape)}"
        )
    s = scores.double()
    t = (targets > 0).double()
    order = torch.argsort(s, dim=0, descending=True, stable=True)
    rel = torch.gather(t, 0, order)
    ranks = torch.arange(1, s.shape[0] + 1, dtype=torch.float64)[:, None]
    precision = rel.cumsum(dim=0) / ranks
    positives = t.sum(dim=0)
    ap = (precision * rel).sum(dim=0) / positives.clamp_min(1.0)
    ap = torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))
    valid = positives > 0
    mean = float(ap[valid].mean()) if bool(valid.any()) else float("nan")
    return mean, ap.float()


def _to_original(values: Tensor, input_hw: Sequence[int], metainfo: Mapping[str, Any]) -> Tensor:
    """``(n, h, w)`` over the padded batch tensor -> ``(n, H0, W0)`` over the original image."""
    size = (int(input_hw[0]), int(input_hw[1]))
    up = F.interpolate(values[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    img_shape = metainfo.get("img_shape")
    if img_shape is not None:
        up = up[:, : int(img_shape[0]), : int(img_shape[1])]
    if metainfo.get("flip", False):
        direction = metainfo.get("flip_direction", "horizontal")
        dims = {"horizontal": [-1], "vertical": [-2], "diagonal": [-2, -1]}.get(direction, [-1])
        up = up.flip(dims)
    ori = metainfo.get("ori_shape")
    if ori is None and metainfo.get("scale_factor") is not None and img_shape is not None:
        sx, sy = (float(v) for v in metainfo["scale_factor"][:2])
        ori = (round(int(img_shape[0]) / sy), round(int(img_shape[1]) / sx))
    if ori is not None and tuple(up.shape[-2:]) != (int(ori[0]), int(ori[1])):
        target = (int(ori[0]), int(ori[1]))
        up = F.interpolate(up[None], size=target, mode="bilinear", align_corners=False)[0]
    return up


def maps_to_original(maps: Tensor, input_hw: Sequence[int], metainfo: Mapping[str, Any]) -> Tensor:
    """Bring feature-resolution maps of one image to its original image, min-max normalized.

    The maps ``(n, h, w)`` cover the padded batch tensor ``(H, W)``: they are upsampled
    bilinearly to ``(H, W)``, cropped to ``img_shape`` (the resized image before padding),
    un-flipped (``flip`` / ``flip_direction``), resized to ``ori_shape`` (or to
    ``img_shape / scale_factor`` when ``ori_shape`` is absent), then scaled per map to
    ``[0, 1]``: ``(m - min) / (max - min)``.

    Args:
        maps: ``(n, h, w)``.
        input_hw: ``(H, W)`` of the batch tensor.
        metainfo: the data sample's metainfo.

    Returns:
        float32 ``(n, H0, W0)``.
    """
    if maps.dim() != 3:
        raise CAMInputError(f"maps must be (n, h, w), got {tuple(maps.shape)}")
    return minmax_normalize(_to_original(maps, input_hw, metainfo))


# ----------------------------------------------------------------------------- helpers


def _unwrap(model: nn.Module) -> nn.Module:
    while is_model_wrapper(model) or isinstance(
        model, (nn.DataParallel, nn.parallel.DistributedDataParallel)
    ):
        inner = model.module
        assert isinstance(inner, nn.Module)
        model = inner
    return model


def _no_autocast(device: torch.device) -> Any:
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast
        return contextlib.nullcontext()


@contextlib.contextmanager
def _rng_guard() -> Iterator[None]:
    """Leave the torch / numpy / python RNG streams exactly as they were."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _shape(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}[" + ", ".join(_shape(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "dict{" + ", ".join(f"{k!r}: {_shape(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def _gt_labels(sample: Any) -> Optional[Tensor]:
    """``gt_instances.labels`` of a data sample, ``None`` when it has none."""
    inst = getattr(sample, "gt_instances", None)
    if inst is None:
        return None
    labels = inst.get("labels", None) if hasattr(inst, "get") else None
    return labels if isinstance(labels, Tensor) else None


def _metainfo(sample: Any) -> Mapping[str, Any]:
    meta = getattr(sample, "metainfo", None)
    return meta if isinstance(meta, Mapping) else {}


def _caption(picture: np.ndarray, text: str) -> np.ndarray:
    pil = Image.fromarray(picture)
    draw = ImageDraw.Draw(pil)
    _, _, right, bottom = draw.textbbox((1, 0), text)
    draw.rectangle([0, 0, min(right + 1, pil.width - 1), bottom + 1], fill=(0, 0, 0))
    draw.text((1, 0), text, fill=(255, 255, 255))
    return np.asarray(pil)


def _safe_name(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value))[:80]


# ----------------------------------------------------------------------------- the hook


@HOOKS.register_module()
class CAMProbeHook(Hook):
    """Train a CAM probe on a detector's features during its own training run.

    Every training iteration the hook reads, from the detector's own forward pass, the
    feature map ``f`` of ``feature`` (a submodule of the detector: ``"backbone"``,
    ``"neck"``, ``"backbone.layer3"``, ...; output ``index`` when it returns a tuple, e.g.
    the FPN level of the neck) and the image-level labels (every class in the sample's
    ``gt_instances.labels``), then takes one optimizer step of its own probe
    (:class:`CAMProbe`: masked GAP + linear, multi-label binary cross-entropy summed over
    classes and averaged over images) on ``f.detach()``. Nothing flows back into the
    detector: its losses, gradients, parameters, modes and RNG streams are exactly those of
    the same run without the hook.

    At validation (and test) it records the probe's scores and reports its multi-label mAP
    as ``cam_probe/mAP`` (logged, and added to the metrics so ``save_best`` can use it), and
    every ``interval`` batches it draws, for the first ``num_images`` images, the CAM of each
    class present (up to ``max_classes``; the probe's top classes when the sample has no
    labels) over the original image, with the paper's box at ``threshold``, through
    ``runner.visualizer.add_image`` (and into ``out_dir`` when given).

    The probe's weights and optimizer state go to their own file,
    ``{work_dir}/cam_probe/iter_{n}.pth``, whenever the runner saves a checkpoint (never
    into the detector's checkpoint), and are loaded back when the runner resumes or loads
    the checkpoint of iteration ``n`` (or from ``load_from``).

    Forward hooks exist only for the detector's forward pass of an iteration: installed
    before it, removed when that forward ends, also when it raises (``always_call``).

    Everything that can be checked is checked before the first iteration: the feature
    module, the output index and that it is a 4-D map (one forward of a random image in
    eval mode, no autograd, RNG streams restored), the training set's labels (one sample
    through the pipeline, RNG streams restored), the number of classes.

    Args:
        feature: dotted path of the submodule whose output is probed.
        index: which output when the module returns a tuple / list (an int, negative counts
            from the end) or a dict (a key); ignored for a single tensor.
        num_classes: classes ``C``; default: the length of the data set's
            ``metainfo['classes']``, else the detector head's ``num_classes``.
        optimizer: the probe's optimizer config (built by mmengine's ``OPTIMIZERS``, e.g.
            ``dict(type='SGD', lr=0.1, momentum=0.9)``).
        interval: draw every ``interval``-th val / test batch.
        num_images: images drawn per drawn batch (0 draws nothing).
        max_classes: overlays per image.
        threshold: the paper's box threshold (fraction of the map's max); ``None``: no box.
        alpha: heat-map weight of the overlays.
        colormap: matplotlib colormap name.
        out_dir: also write the pictures as PNG files to ``{work_dir}/{out_dir}``.
        probe_input_size: ``(H, W)`` of the random image used for the checks (default: 224
            rounded up to the data preprocessor's ``pad_size_divisor``).
        load_from: a probe file to start from (otherwise the file saved with the loaded or
            resumed checkpoint, when it exists).
        max_keep: probe files kept in ``{work_dir}/cam_probe`` (``-1``: all).
        backend_args: mmengine file backend arguments for reading ``img_path``.
    """

    priority = "NORMAL"

    def __init__(
        self,
        feature: str = "backbone",
        index: Union[int, str] = -1,
        num_classes: Optional[int] = None,
        optimizer: Optional[Mapping[str, Any]] = None,
        interval: int = 1,
        num_images: int = 1,
        max_classes: int = 4,
        threshold: Optional[float] = 0.2,
        alpha: float = 0.5,
        colormap: str = "jet",
        out_dir: Optional[str] = None,
        probe_input_size: Optional[Sequence[int]] = None,
        load_from: Optional[str] = None,
        max_keep: int = -1,
        backend_args: Optional[dict] = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            valid = [p for p in inspect.signature(CAMProbeHook.__init__).parameters if p != "self"][
                :-1
            ]
            parts = []
            for key in unknown:
                close = difflib.get_close_matches(key, valid, n=1)
                parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise CAMInputError(
                f"CAMProbeHook got unknown option(s) {', '.join(parts)}; valid: {', '.join(valid)}"
            )
        if not isinstance(feature, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", feature):
            raise CAMInputError(
                f"CAMProbeHook: feature must be the dotted name of a submodule of the detector "
                f"('backbone', 'neck', 'backbone.layer3'), got {feature!r}"
            )
        if isinstance(index, bool) or not isinstance(index, (int, str)):
            raise CAMInputError(
                f"CAMProbeHook: index must be an int (position in the module's tuple output) "
                f"or a str (dict key), got {index!r}"
            )
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise CAMInputError(
                f"CAMProbeHook: num_classes must be an int >= 1, got {num_classes!r}"
            )
        optimizer = dict(optimizer) if optimizer is not None else dict(type="Adam", lr=1e-3)
        if "type" not in optimizer:
            raise CAMInputError(
                "CAMProbeHook: optimizer must be a config dict with a 'type', e.g. "
                f"dict(type='Adam', lr=1e-3); got {optimizer!r}"
            )
        if "params" in optimizer:
            raise CAMInputError(
                "CAMProbeHook: the optimizer config must not name 'params' (the probe's own "
                "parameters are used)"
            )
        for value, what, low in (
            (interval, "interval", 1),
            (num_images, "num_images", 0),
            (max_classes, "max_classes", 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise CAMInputError(f"CAMProbeHook: {what} must be an int >= {low}, got {value!r}")
        if isinstance(max_keep, bool) or not isinstance(max_keep, int) or max_keep == 0:
            raise CAMInputError(
                f"CAMProbeHook: max_keep must be -1 (keep all) or >= 1, got {max_keep!r}"
            )
        if threshold is not None and not (
            isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0
        ):
            raise CAMInputError(f"CAMProbeHook: threshold must be in [0, 1], got {threshold!r}")
        if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
            raise CAMInputError(f"CAMProbeHook: alpha must be in [0, 1], got {alpha!r}")
        import matplotlib

        if colormap not in matplotlib.colormaps:
            raise CAMInputError(f"CAMProbeHook: unknown matplotlib colormap {colormap!r}")
        size: Optional[tuple[int, int]] = None
        if probe_input_size is not None:
            dims = [int(v) for v in probe_input_size]
            if len(dims) != 2 or min(dims) < 8:
                raise CAMInputError(
                    f"CAMProbeHook: probe_input_size must be (H, W) >= 8, got {probe_input_size!r}"
                )
            size = (dims[0], dims[1])
        self.feature = feature
        self.index = index
        self.num_classes = num_classes
        self.optimizer_cfg = optimizer
        self.interval = interval
        self.num_images = num_images
        self.max_classes = max_classes
        self.threshold = None if threshold is None else float(threshold)
        self.alpha = float(alpha)
        self.colormap = colormap
        self.out_dir = out_dir
        self.probe_input_size = size
        self.load_from = load_from
        self.max_keep = max_keep
        self.backend_args = backend_args

        self.probe: Optional[CAMProbe] = None
        self.optim: Optional[torch.optim.Optimizer] = None
        self.classes: Optional[tuple[str, ...]] = None
        self.steps = 0
        self.last_loss: Optional[float] = None
        self.loaded_from: Optional[str] = None
        self._model: Optional[nn.Module] = None
        self._module: Optional[nn.Module] = None
        self._handles: list[RemovableHandle] = []
        self._token = 0
        self._batch: dict[str, Any] = {}
        self._records: list[tuple[np.ndarray, np.ndarray]] = []
        self._eval_without_labels = 0
        self._drawn = 0
        self._warned: set[str] = set()
        self._finalizer = weakref.finalize(self, CAMProbeHook._remove_handles, self._handles)

    # ------------------------------------------------------------------ set-up and checks

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            print_log(f"CAMProbeHook: {message}", logger="current", level=logging.WARNING)

    def _resolve_module(self, model: nn.Module) -> nn.Module:
        try:
            return model.get_submodule(self.feature)
        except AttributeError:
            pass
        parts = self.feature.split(".")
        cur: nn.Module = model
        done: list[str] = []
        for part in parts:
            children = dict(cur.named_children())
            if part not in children:
                where = ".".join(done) or type(model).__name__
                names = list(children)
                close = difflib.get_close_matches(part, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise CAMInputError(
                    f"CAMProbeHook: feature={self.feature!r}: {where} has no submodule "
                    f"'{part}'{hint}; its children are: {', '.join(names) or 'none'}"
                )
            cur, done = children[part], [*done, part]
        return cur

    def _select(self, output: Any) -> Any:
        """The probed tensor inside a module's output; raises CAMInputError when absent."""
        if isinstance(output, Tensor):
            return output
        if isinstance(output, Mapping):
            if self.index not in output:
                raise CAMInputError(
                    f"CAMProbeHook: {self.feature} returns a dict with keys {list(output)}; "
                    f"index={self.index!r} is not one of them"
                )
            return output[self.index]
        if isinstance(output, (tuple, list)):
            n = len(output)
            if not isinstance(self.index, int) or not -n <= self.index < n:
                raise CAMInputError(
                    f"CAMProbeHook: {self.feature} returns {n} outputs ({_shape(output)}); "
                    f"index={self.index!r} does not exist (valid: {-n}..{n - 1})"
                )
            return output[self.index]
        raise CAMInputError(
            f"CAMProbeHook: {self.feature} returns {_shape(output)}, not a feature map"
        )

    def _input_size(self, model: nn.Module) -> tuple[int, int, int]:
        pre = getattr(model, "data_preprocessor", None)
        mean = getattr(pre, "mean", None)
        if isinstance(mean, Tensor) and mean.numel() > 1:
            channels = int(mean.numel())
        else:
            conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
            channels = conv.in_channels if conv is not None else 3
        if self.probe_input_size is not None:
            return channels, *self.probe_input_size
        div = int(getattr(pre, "pad_size_divisor", 1) or 1)
        side = int(math.ceil(224 / div) * div)
        return channels, side, side

    def _probe_forward(self, model: nn.Module, module: nn.Module) -> Tensor:
        """One forward of a random image (eval mode, no autograd, RNG streams restored, every
        mode restored) to check the probed output and read its channel count."""
        c, h, w = self._input_size(model)
        ref = next(model.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
        gen = torch.Generator().manual_seed(0)
        x = torch.rand((1, c, h, w), generator=gen).to(device)
        seen: list[Any] = []
        handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad(), _rng_guard():
                extract = getattr(model, "extract_feat", None)
                if callable(extract):
                    extract(x)
                else:
                    model(x, mode="tensor")
        except CAMInputError:
            raise
        except Exception as err:
            raise CAMInputError(
                f"CAMProbeHook: a forward of a random {h}x{w} image through "
                f"{type(model).__name__}.extract_feat failed ({type(err).__name__}: {err}); "
                "set probe_input_size=(H, W) to a size the detector takes"
            ) from err
        finally:
            handle.remove()
            for m, mode in modes.items():
                m.training = mode
        if not seen:
            raise CAMInputError(
                f"CAMProbeHook: feature={self.feature!r} never runs when the detector extracts "
                "its features; probe the backbone or the neck (or a module inside them)"
            )
        value = self._select(seen[-1])
        if not isinstance(value, Tensor) or value.dim() != 4:
            raise CAMInputError(
                f"CAMProbeHook: the probed output of {self.feature!r} (index={self.index!r}) is "
                f"{_shape(value)}, not a 4-D (B, K, h, w) feature map; choose a backbone "
                "stage or neck level that returns one"
            )
        return value

    def _classes_from(self, runner: Any) -> Optional[tuple[str, ...]]:
        loops = [getattr(runner, "_train_loop", None), getattr(runner, "_val_loop", None)]
        loops.append(getattr(runner, "_test_loop", None))
        for loop in loops:
            if not isinstance(loop, BaseLoop):
                continue
            dataset = getattr(getattr(loop, "dataloader", None), "dataset", None)
            meta = getattr(dataset, "metainfo", None)
            if isinstance(meta, Mapping) and meta.get("classes"):
                return tuple(str(c) for c in meta["classes"])
        return None

    @staticmethod
    def _head_classes(model: nn.Module) -> Optional[int]:
        """``num_classes`` of the detector's box head (one- or two-stage)."""
        for name in ("bbox_head", "roi_head.bbox_head"):
            head: Any = model
            for part in name.split("."):
                head = getattr(head, part, None)
            if isinstance(head, (list, nn.ModuleList)):
                head = head[-1] if len(head) else None
            n = getattr(head, "num_classes", None)
            if isinstance(n, int) and n >= 1:
                return n
        return None

    def before_run(self, runner: Any) -> None:
        """Find the probed module, check its output with one forward, build the probe and
        its optimizer (and load ``load_from``)."""
        if self.probe is not None:
            return
        model = _unwrap(runner.model)
        module = self._resolve_module(model)
        value = self._probe_forward(model, module)
        self.classes = self._classes_from(runner)
        num_classes = self.num_classes
        if num_classes is None:
            num_classes = len(self.classes) if self.classes else self._head_classes(model)
        if num_classes is None:
            raise CAMInputError(
                "CAMProbeHook: cannot tell the number of classes (the data set has no "
                "metainfo['classes'] and the detector head no num_classes); set num_classes"
            )
        if self.classes is not None and len(self.classes) > num_classes:
            raise CAMInputError(
                f"CAMProbeHook: num_classes={num_classes} but the data set has "
                f"{len(self.classes)} classes; drop num_classes or raise it"
            )
        self.num_classes = num_classes
        self._model = model
        self._module = module
        with _rng_guard():
            probe = CAMProbe(int(value.shape[1]), num_classes).to(value.device)
            cfg = dict(self.optimizer_cfg, params=probe.parameters())
            try:
                self.optim = OPTIMIZERS.build(cfg)
            except Exception as err:
                raise CAMInputError(
                    f"CAMProbeHook: building the probe's optimizer {self.optimizer_cfg!r} failed "
                    f"({type(err).__name__}: {err})"
                ) from err
        self.probe = probe
        print_log(
            f"CAMProbeHook: probing {type(model).__name__}.{self.feature}[{self.index}] "
            f"({value.shape[1]} channels, {value.shape[-2]}x{value.shape[-1]} at "
            f"{self._input_size(model)[1]}x{self._input_size(model)[2]}) for {num_classes} "
            "classes",
            logger="current",
        )
        if self.load_from is not None:
            self.load(self.load_from)

    def before_train(self, runner: Any) -> None:
        """Check that training samples carry ``gt_instances.labels`` (one sample through the
        pipeline, RNG streams restored)."""
        dataset = runner.train_dataloader.dataset
        try:
            length = len(dataset)
        except TypeError:
            return
        if length == 0:
            raise CAMInputError("CAMProbeHook: the training set is empty")
        with _rng_guard():
            item = dataset[0]
        sample = item.get("data_samples") if isinstance(item, Mapping) else None
        labels = _gt_labels(sample)
        if labels is None:
            raise CAMInputError(
                f"CAMProbeHook: the samples of the training set ({type(dataset).__name__}) "
                "carry no gt_instances.labels, so there are no image-level labels to train "
                "the probe on. Give the data set annotations and put "
                "dict(type='LoadAnnotations', with_bbox=True) before PackDetInputs in the "
                "train pipeline"
            )
        infos = getattr(dataset, "get_data_info", None)
        if callable(infos):
            found = 0
            for i in range(min(length, 32)):
                info = infos(i)
                found += sum(
                    1
                    for inst in (info.get("instances") or [])
                    if isinstance(inst, Mapping) and inst.get("bbox_label") is not None
                )
            if found == 0 and int(labels.numel()) == 0:
                raise CAMInputError(
                    f"CAMProbeHook: the first {min(length, 32)} samples of the training set "
                    f"({type(dataset).__name__}) have no labelled instances; the probe needs "
                    "image-level labels from gt_instances.labels"
                )

    # ------------------------------------------------------------------ capture

    @staticmethod
    def _remove_handles(handles: list[RemovableHandle]) -> None:
        for handle in list(handles):
            handle.remove()
        handles.clear()

    def _install(self, keep_maps: bool) -> None:
        """Install the capture hooks for the next forward pass of the detector.

        Three hooks: a pre-hook on the detector (the batch's inputs and data samples), a
        forward hook on the probed module (its map, pooled at once), and a forward hook on
        the detector with ``always_call=True`` that removes all three when that forward ends,
        also when it raises. Hooks armed for a forward that never came are removed by the
        next call of this method, by :meth:`after_run`, or by the finalizer.
        """
        self._remove_handles(self._handles)
        self._batch = {"keep_maps": keep_maps}
        if self._model is None or self._module is None or self.probe is None:
            return
        self._token += 1
        token = self._token
        ref = weakref.ref(self)
        handles = self._handles

        def current() -> Optional[CAMProbeHook]:
            hook = ref()
            if hook is None or hook._token != token:
                CAMProbeHook._remove_handles(handles)
                return None
            return hook

        def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hook = current()
            if hook is not None:
                hook._on_call(args, kwargs)

        def on_feature(module: nn.Module, args: tuple, output: Any) -> None:
            hook = current()
            if hook is not None:
                hook._on_feature(output)

        def on_done(module: nn.Module, args: tuple, output: Any) -> None:
            CAMProbeHook._remove_handles(handles)

        handles.append(self._model.register_forward_pre_hook(on_call, with_kwargs=True))
        handles.append(self._module.register_forward_hook(on_feature))
        handles.append(self._model.register_forward_hook(on_done, always_call=True))

    def _uninstall(self) -> dict[str, Any]:
        self._remove_handles(self._handles)
        self._token += 1
        batch, self._batch = self._batch, {}
        return batch

    def _on_call(self, args: tuple, kwargs: dict) -> None:
        inputs = kwargs.get("inputs", args[0] if args else None)
        samples = kwargs.get("data_samples", args[1] if len(args) > 1 else None)
        if isinstance(inputs, Tensor) and inputs.dim() == 4:
            self._batch["input_hw"] = (int(inputs.shape[-2]), int(inputs.shape[-1]))
            if self._batch.get("keep_maps"):
                self._batch["inputs"] = inputs.detach()
        if isinstance(samples, (list, tuple)):
            self._batch["samples"] = list(samples)

    def _on_feature(self, output: Any) -> None:
        try:
            value = self._select(output)
        except CAMInputError as err:
            self._warn_once("select", f"{err}; this batch is skipped")
            return
        if not isinstance(value, Tensor) or value.dim() != 4:
            self._warn_once("dim", f"the probed output is {_shape(value)}; batch skipped")
            return
        with torch.no_grad(), _no_autocast(value.device):
            f = value.detach().float()
            samples = self._batch.get("samples")
            mask = None
            input_hw = self._batch.get("input_hw")
            if samples is not None and input_hw is not None and len(samples) == f.shape[0]:
                shapes = [_metainfo(s).get("img_shape") for s in samples]
                mask = valid_cell_mask(shapes, input_hw, f.shape[-2:], device=f.device)
            self._batch["pooled"] = CAMProbe.pool(f, mask)
            self._batch["mask"] = mask
            if self._batch.get("keep_maps"):
                self._batch["features"] = f.clone() if f is value else f

    def _targets(self, samples: Sequence[Any], device: torch.device) -> tuple[Tensor, Tensor]:
        """Multi-hot ``(B, C)`` image-level labels and which samples have labels ``(B,)``."""
        assert self.num_classes is not None
        c = self.num_classes
        has = torch.zeros(len(samples), dtype=torch.bool)
        rows, cols = [], []
        for i, sample in enumerate(samples):
            labels = _gt_labels(sample)
            if labels is None:
                continue
            has[i] = True
            lab = labels.reshape(-1).long().cpu()
            bad = (lab < 0) | (lab >= c)
            if bool(bad.any()):
                self._warn_once("range", f"labels outside [0, {c}) are ignored (num_classes={c})")
                lab = lab[~bad]
            rows.append(torch.full_like(lab, i))
            cols.append(lab)
        targets = torch.zeros(len(samples), c)
        if rows:
            targets[torch.cat(rows), torch.cat(cols)] = 1.0
        return targets.to(device), has.to(device)

    # ------------------------------------------------------------------ training

    def before_train_iter(
        self, runner: Any, batch_idx: int, data_batch: Optional[Any] = None
    ) -> None:
        """Arm the capture for this iteration's forward pass."""
        self._install(keep_maps=False)

    def after_train_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Optional[Any] = None,
        outputs: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Remove the capture and take one probe step on the captured (detached) features."""
        batch = self._uninstall()
        pooled, samples = batch.get("pooled"), batch.get("samples")
        if self.probe is None or self.optim is None or pooled is None or samples is None:
            return
        if len(samples) != pooled.shape[0]:
            self._warn_once("size", "features and data samples differ in batch size; skipped")
            return
        targets, has = self._targets(samples, pooled.device)
        if not bool(has.all()):
            self._warn_once("nolabel", "samples without gt_instances.labels are left out")
        n = int(has.sum())
        if n == 0:
            return
        self.probe.train()
        with torch.enable_grad(), _no_autocast(pooled.device):
            logits = self.probe.fc(pooled[has])
            loss = F.binary_cross_entropy_with_logits(logits, targets[has], reduction="sum") / n
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            if get_world_size() > 1:
                for p in self.probe.parameters():
                    if p.grad is not None:
                        all_reduce(p.grad, op="mean")
            self.optim.step()
        self.steps += 1
        self.last_loss = float(loss.detach())
        runner.message_hub.update_scalar("train/cam_probe_loss", self.last_loss)

    # ------------------------------------------------------------------ evaluation

    def before_val_epoch(self, runner: Any) -> None:
        """Start a new set of probe scores."""
        self._records = []
        self._eval_without_labels = 0

    before_test_epoch = before_val_epoch

    def before_val_iter(
        self, runner: Any, batch_idx: int, data_batch: Optional[Any] = None
    ) -> None:
        """Arm the capture (keeping the maps when this batch is drawn)."""
        self._install(keep_maps=self._draws(batch_idx))

    before_test_iter = before_val_iter

    def _draws(self, batch_idx: int) -> bool:
        return self.num_images > 0 and batch_idx % self.interval == 0

    def after_val_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Optional[Any] = None,
        outputs: Optional[Sequence[Any]] = None,
    ) -> None:
        """Score the batch with the probe and draw its CAMs."""
        self._evaluate_batch(runner, batch_idx, "val")

    def after_test_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Optional[Any] = None,
        outputs: Optional[Sequence[Any]] = None,
    ) -> None:
        """Score the batch with the probe and draw its CAMs."""
        self._evaluate_batch(runner, batch_idx, "test")

    def _evaluate_batch(self, runner: Any, batch_idx: int, mode: str) -> None:
        batch = self._uninstall()
        pooled, samples = batch.get("pooled"), batch.get("samples")
        if self.probe is None or pooled is None or samples is None:
            return
        if len(samples) != pooled.shape[0]:
            return
        with torch.no_grad(), _no_autocast(pooled.device):
            logits = self.probe.fc(pooled)
        targets, has = self._targets(samples, pooled.device)
        scores = logits.float().cpu().numpy()
        tgt = targets.cpu().numpy().astype(np.uint8)
        for i in range(len(samples)):
            if bool(has[i]):
                self._records.append((scores[i], tgt[i]))
            else:
                self._eval_without_labels += 1
        if batch.get("features") is not None and batch.get("input_hw") is not None:
            self._draw(runner, batch, logits, mode)

    def _picture(self, sample: Any, batch: dict[str, Any], index: int) -> np.ndarray:
        """The original image (``img_path``), else the network input un-padded and resized."""
        meta = _metainfo(sample)
        path = meta.get("img_path")
        if path:
            try:
                import cv2
                from mmengine.fileio import get

                buf = np.frombuffer(get(path, backend_args=self.backend_args), np.uint8)
                img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
                if img is not None:
                    return np.ascontiguousarray(img[:, :, ::-1])
            except Exception as err:  # a picture is never worth a crash
                self._warn_once("read", f"could not read {path} ({err}); drawing the input")
        inputs = batch.get("inputs")
        if inputs is None:
            h, w = meta.get("ori_shape", batch["input_hw"])
            return np.zeros((int(h), int(w), 3), np.uint8)
        img = _to_original(inputs[index].float(), batch["input_hw"], meta)
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo).clamp_min(1e-12)
        pic = (img.permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        pre = getattr(self._model, "data_preprocessor", None)
        if pic.shape[2] == 3 and not getattr(pre, "_channel_conversion", True):
            pic = pic[:, :, ::-1]  # mmcv loads BGR; without conversion the input is BGR
        if pic.shape[2] == 1:
            pic = np.repeat(pic, 3, axis=2)
        return np.ascontiguousarray(pic[:, :, :3])

    @staticmethod
    def _step(runner: Any) -> int:
        """The training iteration, without building a train loop in val / test-only runs."""
        loop = getattr(runner, "_train_loop", None)
        return int(runner.iter) if isinstance(loop, BaseLoop) else 0

    def _draw(self, runner: Any, batch: dict[str, Any], logits: Tensor, mode: str) -> None:
        assert self.probe is not None
        step = self._step(runner)
        features, samples = batch["features"], batch["samples"]
        probs = logits.sigmoid().cpu()
        names = self.classes
        for i in range(min(self.num_images, len(samples))):
            labels = _gt_labels(samples[i])
            if labels is not None and labels.numel():
                present = torch.unique(labels.reshape(-1).long().cpu())
                present = present[(present >= 0) & (present < probs.shape[1])]
                order = torch.argsort(probs[i, present], descending=True, stable=True)
                classes = present[order][: self.max_classes]
            else:
                classes = torch.argsort(probs[i], descending=True, stable=True)
                classes = classes[: self.max_classes]
            if classes.numel() == 0:
                continue
            meta = _metainfo(samples[i])
            with torch.no_grad():
                maps = self.probe.maps(features[i : i + 1], classes[None].to(features.device))[0]
                maps = maps_to_original(maps, batch["input_hw"], meta).cpu()
            base = self._picture(samples[i], batch, i)
            if base.shape[:2] != tuple(maps.shape[-2:]):
                pil = Image.fromarray(base).resize((maps.shape[-1], maps.shape[-2]))
                base = np.asarray(pil)
            boxes = threshold_boxes(maps, self.threshold) if self.threshold is not None else None
            scale = max(1, math.ceil(128 / max(1, min(base.shape[:2]))))
            panels = [self._enlarge(base, scale)]
            for j, cls in enumerate(classes.tolist()):
                pic = overlay(base, maps[j], alpha=self.alpha, colormap=self.colormap)
                pic = self._enlarge(pic, scale)
                if boxes is not None:
                    x0, y0, x1, y1 = (float(v) for v in boxes[j])
                    box = [x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1]
                    pic = draw_box(pic, box, color=(0, 255, 0), width=max(1, scale))
                name = names[cls] if names is not None and cls < len(names) else str(cls)
                panels.append(_caption(pic, f"{name} p={float(probs[i, cls]):.2f}"))
            sep = np.full((panels[0].shape[0], 2, 3), 255, np.uint8)
            strip = np.concatenate([p for panel in panels for p in (panel, sep)][:-1], axis=1)
            ident = meta.get("img_id", meta.get("sample_idx", f"{self._drawn}"))
            self._drawn += 1
            name = f"cam_probe_{mode}_{_safe_name(ident)}"
            runner.visualizer.add_image(name, strip, step=step)
            if self.out_dir is not None and is_main_process():
                import cv2

                folder = osp.join(runner.work_dir, self.out_dir)
                os.makedirs(folder, exist_ok=True)
                cv2.imwrite(osp.join(folder, f"{name}_{step}.png"), strip[:, :, ::-1])

    @staticmethod
    def _enlarge(picture: np.ndarray, scale: int) -> np.ndarray:
        if scale == 1:
            return picture
        return np.ascontiguousarray(picture.repeat(scale, axis=0).repeat(scale, axis=1))

    def _finish_epoch(self, runner: Any, metrics: Optional[dict], mode: str) -> None:
        if self.probe is None:
            return
        dataset = getattr(getattr(runner, f"{mode}_dataloader", None), "dataset", None)
        size = len(dataset) if dataset is not None else len(self._records)
        gathered = collect_results(self._records, size, "cpu")
        value = [float("nan")]
        if is_main_process() and gathered:
            scores = torch.from_numpy(np.stack([r[0] for r in gathered]))
            targets = torch.from_numpy(np.stack([r[1] for r in gathered]))
            value = [multilabel_average_precision(scores, targets)[0]]
        if get_world_size() > 1:
            broadcast_object_list(value)
        self._records = []
        if self._eval_without_labels:
            self._warn_once(
                f"{mode}-labels",
                f"{self._eval_without_labels} {mode} samples have no gt_instances.labels and "
                "are not counted in cam_probe/mAP",
            )
        if math.isnan(value[0]):
            return
        runner.message_hub.update_scalar(f"{mode}/cam_probe/mAP", value[0])
        if metrics is not None:
            metrics["cam_probe/mAP"] = value[0]

    def after_val_epoch(self, runner: Any, metrics: Optional[dict] = None) -> None:
        """Report the probe's multi-label mAP (``cam_probe/mAP``)."""
        self._finish_epoch(runner, metrics, "val")

    def after_test_epoch(self, runner: Any, metrics: Optional[dict] = None) -> None:
        """Report the probe's multi-label mAP (``cam_probe/mAP``)."""
        self._finish_epoch(runner, metrics, "test")

    def after_run(self, runner: Any) -> None:
        """Remove any capture hook still installed."""
        self._uninstall()

    # ------------------------------------------------------------------ saving

    def state_dict(self) -> dict[str, Any]:
        """The probe file's content: weights, optimizer state and what they were trained on."""
        if self.probe is None or self.optim is None:
            raise CAMInputError("CAMProbeHook: no probe yet (it is built in before_run)")
        return {
            "format": PROBE_FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in self.probe.state_dict().items()},
            "optimizer": self.optim.state_dict(),
            "meta": {
                "feature": self.feature,
                "index": self.index,
                "num_features": self.probe.num_features,
                "num_classes": self.probe.num_classes,
                "classes": list(self.classes) if self.classes else None,
                "steps": self.steps,
            },
        }

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` to ``path``."""
        os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
        torch.save(self.state_dict(), path)

    def load(self, path: str) -> None:
        """Load a probe file written by :meth:`save` (weights and optimizer state).

        Raises:
            CAMInputError: the file is not a probe file, or was trained on another feature
                shape or class count.
        """
        if self.probe is None or self.optim is None:
            raise CAMInputError("CAMProbeHook: no probe yet (it is built in before_run)")
        if not osp.isfile(path):
            raise CAMInputError(f"CAMProbeHook: no probe file at {path!r}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CAMInputError(
                f"CAMProbeHook: cannot read {path!r} as a probe file ({err})"
            ) from err
        if not isinstance(state, Mapping) or state.get("format") != PROBE_FORMAT:
            raise CAMInputError(f"CAMProbeHook: {path!r} is not a CAM probe file")
        meta = state.get("meta", {})
        want = (self.probe.num_features, self.probe.num_classes)
        got = (meta.get("num_features"), meta.get("num_classes"))
        if got != want:
            raise CAMInputError(
                f"CAMProbeHook: the probe in {path!r} has (features, classes) = {got}, but "
                f"{self.feature}[{self.index}] gives {want}; it was trained on another setup"
            )
        self.probe.load_state_dict(state["state_dict"])
        self.optim.load_state_dict(state["optimizer"])
        self.steps = int(meta.get("steps", 0))
        self.loaded_from = path
        print_log(f"CAMProbeHook: loaded the probe from {path}", logger="current")

    def _folder(self, runner: Any) -> str:
        return osp.join(runner.work_dir, "cam_probe")

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Save the probe next to the checkpoint, as ``cam_probe/iter_{n}.pth`` (own file)."""
        if self.probe is None or not is_main_process():
            return
        it = int(checkpoint.get("meta", {}).get("iter", runner.iter))
        folder = self._folder(runner)
        self.save(osp.join(folder, f"iter_{it}.pth"))
        if self.max_keep > 0:
            found = []
            for name in os.listdir(folder):
                m = re.fullmatch(r"iter_(\d+)\.pth", name)
                if m:
                    found.append((int(m.group(1)), name))
            for _, name in sorted(found)[: -self.max_keep]:
                os.remove(osp.join(folder, name))

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Load the probe saved with this checkpoint (resume / ``load_from``), if any."""
        if self.probe is None or self.load_from is not None:
            return
        it = checkpoint.get("meta", {}).get("iter")
        if it is None:
            return
        folders = [self._folder(runner)]
        source = runner.cfg.get("load_from") if getattr(runner, "cfg", None) else None
        if isinstance(source, str):
            folders.append(osp.join(osp.dirname(source), "cam_probe"))
        for folder in folders:
            path = osp.join(folder, f"iter_{int(it)}.pth")
            if osp.isfile(path):
                self.load(path)
                return
        self._warn_once(
            "resume",
            f"no probe file for iteration {it} in {' or '.join(folders)}; the probe starts "
            "from scratch",
        )


# ----------------------------------------------------------------------------- data set


@DATASETS.register_module()
class ClutteredDigitsDetection(ClutteredDigitsBase):
    """Several handwritten digits per image in clutter, as an mmdet-style detection set.

    Built on :class:`cam_plugin.data.ClutteredDigits` (``digits_per_image`` non-overlapping
    digits, bright clutter, known boxes). Each data info is what mmdet's transforms expect
    after image loading: ``img`` (HWC uint8, grey in three channels), ``img_shape`` /
    ``ori_shape`` ``(S, S)``, ``height`` / ``width``, ``img_id``, and ``instances`` with
    ``bbox`` (``[x1, y1, x2, y2]``, OpenMMLab's convention ``x2 = x1 + width``),
    ``bbox_label`` and ``ignore_flag``. Images are rendered on access, deterministically from
    ``(seed, split, index)``, so the pipeline starts with ``LoadAnnotations`` (no
    ``LoadImageFromFile``)::

        train_pipeline = [dict(type='LoadAnnotations', with_bbox=True),
                          dict(type='RandomFlip', prob=0.5), dict(type='PackDetInputs')]

    Args:
        split: ``"train"`` or ``"test"`` (disjoint source digits).
        length: number of images.
        canvas_size: image side ``S``.
        digit_size: ``(min, max)`` side of a digit.
        digits_per_image: digits per image.
        seed: generator seed.
        with_annotations: emit ``instances`` (``False`` models a data set without labels).
        pipeline: the transforms.
        test_mode: mmengine's test-mode flag.
        lazy_init: defer building the index list.
        max_refetch: mmengine's refetch limit.
        **digits: further :class:`~cam_plugin.data.ClutteredDigits` options
            (``num_fragments``, ``num_strokes``, ``noise_std``, ``touch_prob``).
    """

    METAINFO: dict = dict(
        classes=tuple(str(i) for i in range(10)),
        palette=[
            (230, 25, 75),
            (60, 180, 75),
            (255, 225, 25),
            (0, 130, 200),
            (245, 130, 48),
            (145, 30, 180),
            (70, 240, 240),
            (240, 50, 230),
            (210, 245, 60),
            (250, 190, 212),
        ],
    )

    def __init__(
        self,
        split: str = "train",
        length: Optional[int] = None,
        canvas_size: int = 128,
        digit_size: Sequence[int] = (20, 36),
        digits_per_image: int = 3,
        seed: int = 0,
        with_annotations: bool = True,
        pipeline: Sequence[Union[dict, Any]] = (),
        test_mode: bool = False,
        lazy_init: bool = False,
        max_refetch: int = 1000,
        **digits: Any,
    ) -> None:
        self.with_annotations = bool(with_annotations)
        super().__init__(
            split,
            length,
            canvas_size,
            digit_size,
            seed,
            pipeline,
            test_mode,
            lazy_init,
            max_refetch,
            digits_per_image=digits_per_image,
            **digits,
        )

    def load_data_list(self) -> list[dict]:
        """One entry per image (rendered on access)."""
        s = self.digits.canvas_size
        return [dict(img_id=i, height=s, width=s) for i in range(len(self.digits))]

    def get_data_info(self, idx: int) -> dict:
        """Render image ``idx`` as an mmdet data info (see the class doc)."""
        info = super().get_data_info(idx)
        img, boxes, labels = self.render(info["img_id"])
        size = (int(img.shape[0]), int(img.shape[1]))
        info.update(img=img, img_shape=size, ori_shape=size)
        instances = []
        if self.with_annotations:
            for box, label in zip(boxes.tolist(), labels.tolist()):
                x0, y0, x1, y1 = (float(v) for v in box)
                instances.append(
                    dict(bbox=[x0, y0, x1 + 1.0, y1 + 1.0], bbox_label=int(label), ignore_flag=0)
                )
        info["instances"] = instances
        return info

    def get_cat_ids(self, idx: int) -> list[int]:
        """Classes present in image ``idx`` (for class-aware samplers)."""
        return [int(i["bbox_label"]) for i in self.get_data_info(idx)["instances"]]
