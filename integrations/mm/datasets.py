"""The cluttered-digits data sets for OpenMMLab runs (classification and detection).

Both render :class:`cam_plugin.data.ClutteredDigits` samples on access (no files, no
annotation file), deterministically from ``(seed, split, index)``. They are plain classes
here; ``cam_plugin.integrations.mmengine`` registers :class:`ClutteredDigitsDataset` and
``cam_plugin.integrations.mmdet`` registers :class:`ClutteredDigitsDetection` in mmengine's
root ``DATASETS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
from mmengine.dataset import BaseDataset

from cam_plugin.viz import to_uint8_image

__all__ = ["ClutteredDigitsBase", "ClutteredDigitsDataset", "ClutteredDigitsDetection"]


class ClutteredDigitsBase(BaseDataset):
    """What the digits data sets for mmengine (classification) and mmdet (detection) share:
    a :class:`cam_plugin.data.ClutteredDigits` generator as ``self.digits``, no annotation
    file, samples rendered on access. Subclasses give ``load_data_list`` and
    ``get_data_info``; :meth:`render` returns one sample's image as OpenMMLab expects it
    (HWC uint8, grey in three channels) with its boxes (inclusive pixel edges) and labels."""

    def __init__(
        self,
        split: str,
        length: Optional[int],
        canvas_size: int,
        digit_size: Sequence[int],
        seed: int,
        pipeline: Sequence[Union[dict, Any]],
        test_mode: bool,
        lazy_init: bool,
        max_refetch: int,
        metainfo: Optional[dict] = None,
        **digits: Any,
    ) -> None:
        from cam_plugin.data import ClutteredDigits

        lo, hi = (int(v) for v in digit_size)
        self.digits = ClutteredDigits(
            split,  # type: ignore[arg-type]
            length,
            canvas_size=canvas_size,
            digit_size=(lo, hi),
            seed=seed,
            **digits,
        )
        super().__init__(
            ann_file="",
            metainfo=metainfo,
            serialize_data=False,
            pipeline=list(pipeline),
            test_mode=test_mode,
            lazy_init=lazy_init,
            max_refetch=max_refetch,
        )

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(img, boxes, labels)`` of sample ``index``: ``img`` HWC uint8, ``boxes``
        ``(n, 4)`` inclusive pixel edges ``[x0, y0, x1, y1]``, ``labels`` ``(n,)``."""
        image, boxes, labels, _ = self.digits.render(int(index))
        return to_uint8_image(image), boxes, labels


class ClutteredDigitsDataset(ClutteredDigitsBase):
    """:class:`cam_plugin.data.ClutteredDigits` as an mmengine data set.

    Each data info is an mmpretrain-style dict: ``img`` (HWC uint8, grey in three channels),
    ``img_shape`` = ``ori_shape`` = ``(S, S)``, ``gt_label`` (the digit), ``gt_bboxes``
    float32 ``(n, 4)`` in OpenMMLab's convention (``x2 = x1 + width``: a digit covering
    pixels ``x0..x1`` gives ``[x0, y0, x1 + 1, y1 + 1]``), ``gt_bboxes_labels`` and
    ``sample_idx``. With mmpretrain, pack it with
    ``PackInputs(algorithm_keys=('gt_bboxes', 'gt_bboxes_labels'))``. Samples are generated
    on the fly, deterministically from ``(seed, split, index)``.

    Args:
        split: ``"train"`` or ``"test"`` (disjoint source digits).
        length: number of samples.
        canvas_size: image side ``S``.
        digit_size: ``(min, max)`` side of a digit.
        seed: generator seed.
        with_boxes: emit ``gt_bboxes`` (``False`` models a data set without boxes).
        pipeline: the transforms (e.g. ``[dict(type='PackInputs', ...)]``).
        test_mode: mmengine's test mode flag.
        lazy_init: defer building the index list.
        max_refetch: mmengine's refetch limit.
        **digits: further :class:`~cam_plugin.data.ClutteredDigits` options
            (``num_fragments``, ``num_strokes``, ``noise_std``, ``touch_prob``, ...).
    """

    METAINFO: dict = dict(classes=tuple(str(i) for i in range(10)), with_boxes=True)

    def __init__(
        self,
        split: str = "train",
        length: Optional[int] = None,
        canvas_size: int = 64,
        digit_size: Sequence[int] = (20, 36),
        seed: int = 0,
        with_boxes: bool = True,
        pipeline: Sequence[Union[dict, Any]] = (),
        test_mode: bool = False,
        lazy_init: bool = False,
        max_refetch: int = 1000,
        **digits: Any,
    ) -> None:
        self.with_boxes = bool(with_boxes)
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
            metainfo=dict(with_boxes=self.with_boxes),
            **digits,
        )

    def load_data_list(self) -> list[dict]:
        """One entry per sample (images are rendered on access)."""
        return [dict(index=i) for i in range(len(self.digits))]

    def get_data_info(self, idx: int) -> dict:
        """Render sample ``idx`` as an mmpretrain-style data info dict."""
        info = super().get_data_info(idx)
        img, boxes, labels = self.render(info["index"])
        size = (int(img.shape[0]), int(img.shape[1]))
        info.update(img=img, img_shape=size, ori_shape=size, gt_label=int(labels[0]))
        if self.with_boxes:
            edges = boxes.astype(np.float32).copy()
            edges[:, 2:] += 1.0
            info.update(gt_bboxes=edges, gt_bboxes_labels=labels.astype(np.int64))
        return info


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
