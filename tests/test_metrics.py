"""Tests of cam_plugin.metrics against hand-computed values (Choe et al.'s definitions)."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cam_plugin.errors import CAMInputError
from cam_plugin.metrics import (
    WSOLMetrics,
    average_precision_from_histograms,
    box_iou,
    cam_thresholds,
    evaluate_wsol,
    mask_histograms,
)
from cam_plugin.wsol_records import RecordStore

# A sweep of 10 thresholds keeps hand computations short: np.arange(0, 1, 0.1), i.e.
# uint8 cut-offs int(t * 255) = 0, 25, 51, 76, 102, 127, 153, 178, 204, 229.
STEP = 0.1


def _box_map(h: int, w: int, box: tuple[int, int, int, int], value: float = 1.0) -> np.ndarray:
    m = np.zeros((h, w))
    x0, y0, x1, y1 = box
    m[y0 : y1 + 1, x0 : x1 + 1] = value
    return m


# ----------------------------------------------------------------------------- IoU


def test_box_iou_hand_computed() -> None:
    a = np.array([[0, 0, 1, 1], [2, 0, 5, 2], [0, 0, 3, 3]])
    b = np.array([[1, 1, 2, 2], [4, 1, 6, 4], [0, 0, 3, 3], [10, 10, 12, 12]])
    iou = box_iou(a, b)
    assert iou.shape == (3, 4) and iou.dtype == np.float64
    # 2x2 boxes sharing one pixel: 1 / (4 + 4 - 1)
    assert iou[0, 0] == pytest.approx(1 / 7)
    # (2,0,5,2): 4x3 = 12 px; (4,1,6,4): 3x4 = 12 px; overlap x 4..5, y 1..2 -> 4 px
    assert iou[1, 1] == pytest.approx(4 / 20)
    assert iou[2, 2] == 1.0
    assert iou[:, 3].tolist() == [0.0, 0.0, 0.0]
    # a one-pixel box is a box: identical degenerate boxes have IoU 1
    assert box_iou([3, 3, 3, 3], [3, 3, 3, 3]).tolist() == [[1.0]]


@pytest.mark.parametrize(
    ("box", "match"),
    [
        ([5, 0, 4, 3], "x1 < x0"),
        ([0, 5, 3, 4], "x1 < x0 or y1 < y0"),
        ([-1, 0, 3, 3], "negative"),
        ([0, 0, 3], r"\(n, 4\)"),
        ([0.5, 0, 3, 3], "whole-number"),
    ],
)
def test_box_validation(box: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        box_iou(np.array(box), np.array([[0, 0, 1, 1]]))


def test_cam_thresholds() -> None:
    t = cam_thresholds()
    assert len(t) == 100 and t[0] == 0.0 and t[-1] == pytest.approx(0.99)
    assert len(cam_thresholds(0.1)) == 10
    with pytest.raises(ValueError, match="cam_curve_interval"):
        cam_thresholds(0.0)


# ----------------------------------------------------------------------------- box metrics


def test_perfect_maps_score_100() -> None:
    boxes = [(3, 4, 22, 23), (10, 2, 29, 29)]
    maps = np.stack([_box_map(32, 32, b) for b in boxes])
    out = evaluate_wsol(
        maps,
        [np.array(b) for b in boxes],
        labels=[1, 2],
        pred_classes=[1, 2],
        cam_curve_interval=STEP,
    )
    # contour boxes are one pixel wider/taller: 20x20 vs 21x21 -> IoU 400/441 >= 0.7
    for key in ("MaxBoxAcc", "MaxBoxAccV2", "MaxBoxAccV2@70", "GT-known Loc", "Top-1 Loc"):
        assert out[key] == 100.0, key
    assert out["GT-known Loc@fixed"] == 100.0 and out["Top-1 Loc@fixed"] == 100.0
    assert out["best_threshold"] == 0.0
    wrong = evaluate_wsol(maps, boxes, labels=[1, 2], pred_classes=[1, 3], cam_curve_interval=STEP)
    assert wrong["GT-known Loc"] == 100.0
    assert wrong["Top-1 Loc"] == 50.0 and wrong["Top-1 Cls"] == 50.0


def test_constant_map_has_the_zero_box_and_scores_like_choe() -> None:
    from cam_plugin import minmax_normalize

    const = minmax_normalize(torch.full((1, 16, 16), 0.7))  # -> all zeros
    assert float(const.abs().max()) == 0.0
    far = evaluate_wsol(const, [np.array([[5, 5, 10, 10]])], cam_curve_interval=STEP)
    assert far["MaxBoxAcc"] == 0.0 and far["MaxBoxAccV2"] == 0.0
    # The zero box (0, 0, 0, 0) is a real one-pixel box in Choe et al.'s code: against a GT
    # box (0, 0, 1, 0) it has IoU 1/2, a hit at IoU 0.3 and 0.5 but not at 0.7.
    corner = evaluate_wsol(const, [np.array([[0, 0, 1, 0]])], cam_curve_interval=STEP)
    assert corner["MaxBoxAcc"] == 100.0
    assert corner["MaxBoxAccV2@30"] == 100.0 and corner["MaxBoxAccV2@70"] == 0.0
    assert corner["MaxBoxAccV2"] == pytest.approx(200 / 3)


def _object_and_distractor() -> tuple[np.ndarray, np.ndarray]:
    m = np.zeros((32, 32))
    m[4:12, 4:12] = 0.6  # the object: 8x8, uint8 153, present while t < 0.6
    m[16:30, 14:30] = 1.0  # a larger, brighter distractor
    return m, np.array([[4, 4, 11, 11]])


def test_largest_contour_vs_all_contours_two_objects() -> None:
    m, gt = _object_and_distractor()
    perfect = _box_map(32, 32, (2, 2, 25, 25))
    metric = WSOLMetrics(cam_curve_interval=STEP)
    metric.update(np.stack([m, perfect]), [gt, np.array([2, 2, 25, 25])])
    out = metric.compute()
    # MaxBoxAcc boxes the largest contour: the distractor, never right for image 0.
    assert out["MaxBoxAcc"] == 50.0
    # MaxBoxAccV2 boxes every contour: the object's box (4, 4, 12, 12) vs the GT
    # (4, 4, 11, 11) has IoU 64 / 81 = 0.79 at thresholds 0.0 .. 0.5.
    assert out["MaxBoxAccV2"] == 100.0
    curves = metric.curves()
    assert curves["BoxAcc@50"].tolist() == [50.0] * 10
    assert curves["BoxAccV2@70"].tolist() == [100.0] * 6 + [50.0] * 4


def test_two_ground_truth_boxes_best_pair_counts() -> None:
    m, _ = _object_and_distractor()
    gts = np.array([[4, 4, 11, 11], [14, 16, 29, 29]])
    out = evaluate_wsol(m[None], [gts], cam_curve_interval=STEP)
    # largest contour = the second object, box (14, 16, 30, 30) clipped to (14, 16, 30, 30)
    # -> IoU 224 / 255 with the second GT box: right at every threshold.
    assert out["MaxBoxAcc"] == 100.0 and out["MaxBoxAccV2"] == 100.0


def test_threshold_exactly_at_a_pixel_value_is_strict() -> None:
    m = _box_map(12, 12, (2, 2, 9, 9), 0.5)  # ring of 0.5 (uint8 127)
    m[4:8, 4:8] = 1.0  # core of 1.0
    gt = np.array([[2, 2, 9, 9]])
    contour = WSOLMetrics(cam_curve_interval=STEP, fixed_threshold=0.5, fixed_rule="contour")
    contour.update(m[None], [gt])
    # t = 0.5 -> int(127.5) = 127: the ring is not strictly above, only the core is boxed:
    # (4, 4, 8, 8) vs (2, 2, 9, 9): 25 / 64 = 0.39 -> miss at 0.5, hit at 0.3.
    curves = contour.curves()
    assert curves["BoxAcc@50"].tolist() == [100.0] * 5 + [0.0] * 5
    assert curves["BoxAccV2@30"].tolist() == [100.0] * 10
    assert contour.compute()["GT-known Loc@fixed"] == 0.0
    # The paper's rule keeps pixels >= 0.5 * max: the ring stays, the box is exact.
    paper = WSOLMetrics(cam_curve_interval=STEP, fixed_threshold=0.5, fixed_rule="paper")
    paper.update(torch.from_numpy(m)[None], [gt])
    assert paper.compute()["GT-known Loc@fixed"] == 100.0


def test_best_threshold_and_top1_at_that_threshold() -> None:
    ring = _box_map(12, 12, (2, 2, 9, 9), 0.5)
    ring[4:8, 4:8] = 1.0
    small = _box_map(12, 12, (4, 4, 7, 7))  # GT is the core: right only for t >= 0.5
    maps = np.stack([ring, ring, small])
    gts = [np.array([2, 2, 9, 9]), np.array([4, 4, 7, 7]), np.array([4, 4, 7, 7])]
    metric = WSOLMetrics(cam_curve_interval=STEP)
    metric.update(maps, gts, labels=[0, 1, 2], pred_classes=[0, 1, 9])
    out = metric.compute()
    # t < 0.5: images 0 and 2 right (2/3); t >= 0.5: images 1 and 2 right (2/3) -> tie, the
    # lowest threshold (0.0) wins; there image 2's class is wrong -> Top-1 Loc = 1/3.
    assert out["MaxBoxAcc"] == pytest.approx(200 / 3)
    assert out["best_threshold"] == 0.0
    assert out["Top-1 Loc"] == pytest.approx(100 / 3)


# ----------------------------------------------------------------------------- accumulation


def _random_batch(n: int, seed: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(n, 1, 24, 24, generator=g), 7, 1, 3)[:, 0]
    lo, hi = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
    maps = (x - lo) / (hi - lo)
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(n):
        k = int(rng.integers(1, 3))
        xy0 = rng.integers(0, 12, size=(k, 2))
        xy1 = xy0 + rng.integers(3, 12, size=(k, 2))
        boxes.append(np.concatenate([xy0, xy1], axis=1))
    return maps, boxes


def test_single_pass_equals_batches_and_duplicates_are_not_counted() -> None:
    maps, boxes = _random_batch(10, seed=0)
    labels = np.arange(10) % 3
    preds = np.array([0, 1, 2, 0, 0, 2, 0, 1, 1, 0])
    masks = maps > 0.5
    one = WSOLMetrics()
    one.update(maps, boxes, labels=labels, pred_classes=preds, gt_masks=masks, sample_ids=range(10))
    ref = one.compute()

    many = WSOLMetrics()
    for sl in (slice(0, 3), slice(3, 7), slice(7, 10), slice(2, 6)):  # the last one repeats
        many.update(
            maps[sl],
            boxes[sl],
            labels=labels[sl],
            pred_classes=preds[sl],
            gt_masks=masks[sl],
            sample_ids=list(range(10))[sl],
        )
    assert many.num_box_samples == 10 and many.num_mask_samples == 10
    assert many.compute() == ref
    # a repeated id keeps its first record even if the new map differs
    many.update(
        torch.zeros(2, 24, 24),
        boxes[:2],
        labels=labels[:2],
        pred_classes=preds[:2],
        sample_ids=[0, 1],
    )
    assert many.compute() == ref
    # without ids every row is new
    auto = WSOLMetrics()
    auto.update(maps[:4], boxes[:4])
    auto.update(maps[:4], boxes[:4])
    assert auto.num_box_samples == 8


def test_merge_states_like_distributed_ranks_with_padding() -> None:
    maps, boxes = _random_batch(5, seed=1)
    full = WSOLMetrics()
    full.update(maps, boxes, gt_masks=maps > 0.4, sample_ids=range(5))
    # DistributedSampler(5 samples, 2 ranks) pads with sample 0: rank 0 -> 0, 2, 4;
    # rank 1 -> 1, 3, 0.
    states = []
    for ids in ([0, 2, 4], [1, 3, 0]):
        rank = WSOLMetrics()
        rank.update(maps[ids], [boxes[i] for i in ids], gt_masks=maps[ids] > 0.4, sample_ids=ids)
        states.append(pickle.loads(pickle.dumps(rank.state())))
    merged = WSOLMetrics()
    merged.merge(states)
    assert merged.num_box_samples == 5
    assert merged.compute() == full.compute()
    with pytest.raises(ValueError, match="different config"):
        WSOLMetrics(cam_curve_interval=0.1).merge(states)


def test_reset_and_empty_compute() -> None:
    metric = WSOLMetrics()
    with pytest.raises(ValueError, match="nothing to compute"):
        metric.compute()
    maps, boxes = _random_batch(2, seed=2)
    metric.update(maps, boxes)
    metric.reset()
    assert metric.num_box_samples == 0


# ----------------------------------------------------------------------------- PxAP


def test_pxap_hand_computed_and_constant_maps() -> None:
    maps = np.array([[[0.9, 0.6], [0.3, 0.1]]])
    gt = np.array([[[1, 0], [1, 0]]], dtype=bool)
    # from high to low threshold: (P, R) = (1, 1/2), (1/2, 1/2), (2/3, 1), (1/2, 1)
    # AP = 1 * 1/2 + 2/3 * 1/2 = 5/6
    out = evaluate_wsol(maps, gt_masks=gt)
    assert out == {"PxAP": pytest.approx(500 / 6)}
    assert evaluate_wsol(gt.astype(np.float64), gt_masks=gt)["PxAP"] == pytest.approx(100.0)
    # a constant map: one operating point, precision = share of object pixels
    mask = np.zeros((1, 10, 10), dtype=np.uint8)
    mask[0, :3, :] = 1  # 30 object pixels
    for value in (0.0, 0.5, 1.0):
        const = np.full((1, 10, 10), value)
        assert evaluate_wsol(const, gt_masks=mask)["PxAP"] == pytest.approx(30.0)
    # ignore (255) pixels drop out: 30 object vs 20 background pixels left
    mask[0, 5:, :] = 255
    assert evaluate_wsol(np.full((1, 10, 10), 0.5), gt_masks=mask)["PxAP"] == pytest.approx(60.0)


def test_mask_histograms_bins_like_np_histogram() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 7, 9))
    maps[0, 0, 0], maps[1, 0, 0], maps[2, 0, 0] = 1.0, 0.0, 0.5
    gt = rng.random((3, 7, 9)) > 0.5
    thr = cam_thresholds(0.01)
    hist_t, hist_f = mask_histograms(maps, gt, thr)
    edges = np.append(thr, [1.0, 2.0, 3.0])
    for i in range(3):
        assert hist_t[i].tolist() == np.histogram(maps[i][gt[i]], bins=edges)[0].tolist()
        assert hist_f[i].tolist() == np.histogram(maps[i][~gt[i]], bins=edges)[0].tolist()
    with pytest.raises(ValueError, match="object pixels"):
        average_precision_from_histograms(np.zeros(5), np.ones(5))


# ----------------------------------------------------------------------------- validation


def _ok() -> tuple[np.ndarray, list[np.ndarray]]:
    return np.zeros((2, 8, 8)), [np.array([0, 0, 3, 3]), np.array([[1, 1, 2, 2]])]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"maps": np.full((2, 8, 8), np.nan)}, ValueError, "NaN"),
        ({"maps": np.full((2, 8, 8), 1.5)}, ValueError, r"\[0, 1\]"),
        ({"maps": np.zeros((2, 1, 8, 8))}, ValueError, "squeeze"),
        ({"gt_boxes": [np.array([0, 0, 3, 3])]}, ValueError, "1 entries for a batch of 2"),
        ({"gt_boxes": [np.array([3, 0, 2, 3]), np.array([0, 0, 1, 1])]}, ValueError, "x1 < x0"),
        ({"gt_boxes": [np.array([0, 0, 8, 3]), np.array([0, 0, 1, 1])]}, ValueError, "past"),
        ({"gt_boxes": [np.zeros((0, 4)), np.array([0, 0, 1, 1])]}, ValueError, "empty"),
        ({"gt_boxes": None}, ValueError, "gt_boxes"),
        ({"labels": [0, 1]}, ValueError, "both labels and pred_classes"),
        ({"labels": [0, 1], "pred_classes": np.zeros((2, 5))}, ValueError, "argmax"),
        ({"labels": [0.0, 1.0], "pred_classes": [0, 1]}, TypeError, "integer class ids"),
        ({"gt_masks": np.zeros((2, 4, 4), dtype=bool)}, ValueError, "shape"),
        ({"gt_masks": np.full((2, 8, 8), 7, dtype=np.uint8)}, ValueError, "255"),
        ({"sample_ids": [1, 2, 3]}, ValueError, "3 ids for a batch of 2"),
    ],
)
def test_update_validation(kwargs: dict[str, object], error: type, match: str) -> None:
    maps, boxes = _ok()
    args: dict[str, object] = {"maps": maps, "gt_boxes": boxes}
    args.update(kwargs)
    metric = WSOLMetrics(cam_curve_interval=STEP)
    with pytest.raises(error, match=match) as info:
        metric.update(args.pop("maps"), args.pop("gt_boxes"), **args)  # type: ignore[arg-type]
    assert metric.num_box_samples == 0  # nothing half-recorded
    # value errors are the library's own error type (a ValueError subclass)
    assert error is TypeError or isinstance(info.value, CAMInputError)


def test_metric_value_errors_are_cam_input_errors() -> None:
    with pytest.raises(CAMInputError, match="cam_curve_interval"):
        cam_thresholds(0.0)
    with pytest.raises(CAMInputError, match="object pixels"):
        average_precision_from_histograms(np.zeros(5), np.ones(5))
    with pytest.raises(CAMInputError, match="nothing to compute"):
        WSOLMetrics().compute()
    with pytest.raises(CAMInputError, match="no box records"):
        WSOLMetrics().curves()
    with pytest.raises(CAMInputError, match="x1 < x0"):
        box_iou([3, 0, 2, 2], [0, 0, 1, 1])
    with pytest.raises(CAMInputError, match="different config"):
        WSOLMetrics().merge(WSOLMetrics(fixed_threshold=0.3).state())


def test_record_store_one_rule_for_batches_and_states() -> None:
    store = RecordStore("ids", {"v": ((2,), np.int64), "s": ((), np.float64)})
    assert store.column("v").shape == (0, 2) and store.column("s").dtype == np.float64
    calls: list[list[int]] = []

    def values(ids: list[int]) -> Callable[[list[int]], dict[str, np.ndarray]]:
        def compute(rows: list[int]) -> dict[str, np.ndarray]:
            calls.append(rows)
            return {
                "v": np.array([[ids[r], 0] for r in rows]),
                "s": np.array([float(ids[r]) for r in rows]),
            }

        return compute

    # a repeat inside the batch: the first occurrence wins
    assert store.record([3, 1, 3], values([3, 1, 3])) == 2
    # known ids are skipped, and compute is not called when nothing is new
    assert store.record([1, 3], values([1, 3])) == 0
    assert calls == [[0, 1]]
    assert store.record([5, 1], values([5, 1])) == 1
    assert store.ids == [3, 1, 5] and len(store) == 3
    assert store.column("v")[:, 0].tolist() == [3, 1, 5]
    # a state merges under the same rule
    other = RecordStore("ids", store.columns)
    other.record([1, 7], values([1, 7]))
    assert store.merge_state(other.state()) == 1
    assert store.ids == [3, 1, 5, 7] and store.column("s").tolist() == [3.0, 1.0, 5.0, 7.0]
    with pytest.raises(CAMInputError, match="columns"):
        store.record([9], lambda rows: {"v": np.zeros((1, 2))})
    with pytest.raises(CAMInputError, match="lacks"):
        store.merge_state({"ids": [8]})
    store.reset()
    assert len(store) == 0 and store.column("v").shape == (0, 2)


def test_constructor_and_mixed_labels_validation() -> None:
    with pytest.raises(ValueError, match="iou_thresholds"):
        WSOLMetrics(iou_thresholds=(0.5,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fixed_rule"):
        WSOLMetrics(fixed_rule="box")  # type: ignore[arg-type]
    maps, boxes = _ok()
    metric = WSOLMetrics(cam_curve_interval=STEP)
    metric.update(maps, boxes, labels=[0, 1], pred_classes=[0, 1])
    metric.update(maps, boxes)
    with pytest.raises(ValueError, match="for every batch or for none"):
        metric.compute()


# ----------------------------------------------------------------------------- top-5


def _top5_case() -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """Five 16x16 label maps, their boxes, labels and top-5 predictions, built so that:

    0: rank 1, the tight (20%) box is right;
    1: rank 2, the tight box is a small core (wrong), the loose (10%) box is right;
    2: rank 3, the tight box is right, the loose box spreads over the image (wrong);
    3: rank 4, the box is right (but the heuristic gives rank 4 no box);
    4: the label is not among the top 5.
    """
    maps = np.zeros((5, 16, 16))
    boxes = []
    for i in (0, 3, 4):
        maps[i, 4:10, 4:10] = 1.0
        boxes.append(np.array([4, 4, 9, 9]))
    maps[1, 2:14, 2:14] = 0.15
    maps[1, 7:9, 7:9] = 1.0
    maps[2] = 0.15
    maps[2, 4:10, 4:10] = 1.0
    boxes.insert(1, np.array([2, 2, 13, 13]))
    boxes.insert(2, np.array([4, 4, 9, 9]))
    labels = np.array([10, 11, 12, 13, 14])
    top5 = np.array(
        [
            [10, 1, 2, 3, 4],
            [1, 11, 2, 3, 4],
            [1, 2, 12, 3, 4],
            [1, 2, 3, 13, 4],
            [1, 2, 3, 4, 5],
        ]
    )
    return maps, boxes, labels, top5


def test_top5_loc_by_hand_and_with_the_heuristic() -> None:
    maps, boxes, labels, top5 = _top5_case()
    out = evaluate_wsol(maps, boxes, labels=labels, top5_classes=top5, cam_curve_interval=STEP)
    # one box per top-5 class at 20%: images 0, 2, 3 (1's tight box is the core)
    assert out["Top-5 Loc@fixed"] == pytest.approx(60.0)
    assert out["Top-5 error"] == pytest.approx(40.0)
    # the heuristic: 0 (tight), 1 (loose, rank 2); not 2 (rank 3: loose only), not 3 (rank 4)
    assert out["Top-5 Loc@heuristic"] == pytest.approx(40.0)
    assert out["Top-5 error@heuristic"] == pytest.approx(60.0)
    assert out["Top-5 Cls"] == pytest.approx(80.0)
    # the top-1 class is the first column: only image 0 is right
    assert out["Top-1 Cls"] == pytest.approx(20.0)
    assert out["GT-known Loc@fixed"] == pytest.approx(80.0)  # the paper's 20%: all but 1
    assert 0.0 <= out["Top-5 Loc"] <= out["Top-5 Cls"]


def test_top5_heuristic_equals_paper_top5_boxes_on_all_class_maps() -> None:
    from cam_plugin.localize import paper_top5_boxes

    maps, boxes, labels, top5 = _top5_case()
    metric = WSOLMetrics(cam_curve_interval=STEP)
    metric.update(maps, boxes, labels=labels, top5_classes=top5, sample_ids=range(5))
    # every class's map: the label's is the case's map, the others a blob far from the box
    c = 16
    full = torch.zeros(5, c, 16, 16, dtype=torch.float64)
    full[:, :, 14:16, 0:2] = 1.0
    scores = torch.zeros(5, c)
    for i in range(5):
        full[i, labels[i]] = torch.from_numpy(maps[i])
        scores[i, torch.from_numpy(top5[i])] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    heuristic = paper_top5_boxes(full, scores, tight=0.2, loose=0.1)
    by_boxes = []
    for i in range(5):
        right = [
            int(k) == labels[i] and box_iou(b.numpy(), boxes[i]).max() >= 0.5
            for k, b in zip(heuristic.classes[i], heuristic.boxes[i])
        ]
        by_boxes.append(any(right))
    assert metric.compute()["Top-5 Loc@heuristic"] == pytest.approx(100 * np.mean(by_boxes))
    assert by_boxes == [True, True, False, False, False]


def test_top5_records_merge_and_validation() -> None:
    maps, boxes, labels, top5 = _top5_case()
    one = WSOLMetrics(cam_curve_interval=STEP)
    one.update(maps, boxes, labels=labels, top5_classes=top5, sample_ids=range(5))
    states = []
    for ids in ([0, 1, 2], [3, 4, 0]):
        rank = WSOLMetrics(cam_curve_interval=STEP)
        rank.update(
            maps[ids],
            [boxes[i] for i in ids],
            labels=labels[ids],
            top5_classes=top5[ids],
            sample_ids=ids,
        )
        states.append(rank.state())
    merged = WSOLMetrics(cam_curve_interval=STEP)
    merged.merge(states)
    assert merged.compute() == one.compute()
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        evaluate_wsol(maps, boxes, labels=labels, top5_classes=top5[:, :3])
    with pytest.raises(ValueError, match="top5_classes"):
        evaluate_wsol(maps, boxes, top5_classes=top5)  # no labels
    mixed = WSOLMetrics(cam_curve_interval=STEP)
    mixed.update(maps[:2], boxes[:2], labels=labels[:2], top5_classes=top5[:2])
    mixed.update(maps[2:], boxes[2:], labels=labels[2:], pred_classes=top5[2:, 0])
    with pytest.raises(ValueError, match="top5_classes were given for 2 of 5"):
        mixed.compute()
    with pytest.raises(ValueError, match="loose_threshold"):
        WSOLMetrics(fixed_threshold=0.2, loose_threshold=0.3)
    assert WSOLMetrics(fixed_threshold=0.3).loose_threshold == pytest.approx(0.15)
