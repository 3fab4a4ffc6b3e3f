"""Tests of cam_plugin.localize: the paper's threshold rule and Choe et al.'s contour rule."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cam_plugin.errors import CAMInputError
from cam_plugin.localize import (
    ContourBoxes,
    as_numpy_maps,
    contour_boxes,
    contour_sweep,
    label_components,
    largest_component_boxes,
    masks,
    quantize_maps,
    threshold_boxes,
    topk_boxes,
)


def _blobby(n: int, h: int, w: int, seed: int, k: int = 7) -> torch.Tensor:
    """Random smooth maps in [0, 1] with several blobs each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, h, w, generator=g)
    x = F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)[:, 0]
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    return (x - lo) / (hi - lo)


def _cv2_largest_box(mask: np.ndarray) -> list[int]:
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n == 1:
        return [0, 0, 0, 0]
    j = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[j, :4])
    return [x, y, x + w - 1, y + h - 1]


# ----------------------------------------------------------------------------- paper's rule


def test_threshold_boxes_single_blob_hand_computed() -> None:
    m = torch.zeros(1, 6, 8)
    m[0, 1:4, 2:6] = 0.5  # rows 1..3, cols 2..5
    m[0, 2, 3] = 1.0
    assert threshold_boxes(m, 0.2).tolist() == [[2, 1, 5, 3]]
    # 0.5 is exactly 50% of the max: kept (>=), so the box does not shrink ...
    assert threshold_boxes(m, 0.5).tolist() == [[2, 1, 5, 3]]
    # ... just above it only the peak survives
    assert threshold_boxes(m, 0.51).tolist() == [[3, 2, 3, 2]]


def test_threshold_boxes_largest_component_and_diagonal_connectivity() -> None:
    m = torch.zeros(1, 10, 10)
    m[0, 0:2, 0:2] = 1.0  # 4 pixels, holds the max
    # a diagonal chain of 5 pixels: one 8-connected component (five 4-connected ones)
    for i in range(5):
        m[0, 4 + i, 3 + i] = 0.9
    assert threshold_boxes(m, 0.2).tolist() == [[3, 4, 7, 8]]


def test_threshold_boxes_tie_goes_to_first_component_in_raster_order() -> None:
    m = torch.zeros(1, 8, 8)
    m[0, 5:7, 0:2] = 1.0  # starts later in the raster scan
    m[0, 0:2, 5:7] = 1.0  # starts first
    assert threshold_boxes(m, 0.2).tolist() == [[5, 0, 6, 1]]
    assert _cv2_largest_box(masks(m, 0.2)[0].numpy()) == [5, 0, 6, 1]


def test_zero_and_constant_maps_give_the_zero_box() -> None:
    zero = torch.zeros(2, 5, 7)
    assert threshold_boxes(zero, 0.2).tolist() == [[0, 0, 0, 0]] * 2
    assert not masks(zero, 0.2).any()
    from cam_plugin import minmax_normalize

    const = minmax_normalize(torch.full((1, 5, 7), 3.0))
    assert threshold_boxes(const, 0.2).tolist() == [[0, 0, 0, 0]]


def test_threshold_boxes_matches_opencv_connected_components() -> None:
    maps = _blobby(16, 37, 45, seed=0)
    for thr in (0.2, 0.5, 0.8):
        boxes = threshold_boxes(maps, thr)
        keep = masks(maps, thr)
        for i in range(maps.shape[0]):
            assert boxes[i].tolist() == _cv2_largest_box(keep[i].numpy()), (thr, i)


def test_label_components_partition_matches_opencv() -> None:
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(6, 30, 30, generator=g) < 0.45  # fragmented, many components
    labels = label_components(mask)
    for i in range(mask.shape[0]):
        n, ref = cv2.connectedComponents(mask[i].numpy().astype(np.uint8), connectivity=8)
        ours = labels[i].numpy()
        assert ((ours > 0) == mask[i].numpy()).all()
        assert len(np.unique(ours[ours > 0])) == n - 1
        # same partition: each of our labels maps to exactly one OpenCV label and back
        pairs = set(zip(ours[ours > 0].tolist(), ref[ours > 0].tolist()))
        assert len(pairs) == n - 1


def test_label_components_long_serpentine_is_one_component() -> None:
    h, w = 41, 40
    snake = np.zeros((h, w), dtype=bool)
    snake[::2] = True  # rows 0, 2, 4, ... joined alternately at the right and left end
    for k, r in enumerate(range(1, h, 2)):
        snake[r, w - 1 if k % 2 == 0 else 0] = True
    labels = label_components(torch.from_numpy(snake))
    assert labels[torch.from_numpy(snake)].unique().numel() == 1
    assert threshold_boxes(torch.from_numpy(snake).float()[None], 0.5).tolist() == [
        [0, 0, w - 1, h - 1]
    ]


def test_threshold_boxes_any_leading_dims_equal_per_map() -> None:
    maps = _blobby(6, 20, 24, seed=2).view(2, 3, 20, 24)
    boxes = threshold_boxes(maps, 0.3)
    assert boxes.shape == (2, 3, 4) and boxes.dtype == torch.int64
    for b in range(2):
        for k in range(3):
            assert boxes[b, k].tolist() == threshold_boxes(maps[b, k][None], 0.3)[0].tolist()
    assert threshold_boxes(maps[0, 0], 0.3).shape == (4,)


def test_masks_semantics() -> None:
    m = torch.tensor([[[0.0, 0.1, 0.2], [0.3, 0.4, 2.0]]])
    assert masks(m, 0.1).tolist() == [[[False, False, True], [True, True, True]]]
    assert masks(m, 1.0).tolist() == [[[False, False, False], [False, False, True]]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_threshold_boxes_on_cuda_matches_cpu() -> None:
    maps = _blobby(8, 30, 30, seed=3)
    assert torch.equal(threshold_boxes(maps.cuda(), 0.3).cpu(), threshold_boxes(maps, 0.3))


@pytest.mark.parametrize(
    ("maps", "threshold", "error", "match"),
    [
        (np.zeros((1, 4, 4), dtype=np.float32), 0.2, TypeError, "torch.from_numpy"),
        (torch.zeros(4), 0.2, ValueError, "at least 2 dims"),
        (torch.zeros(1, 4, 4, dtype=torch.int64), 0.2, TypeError, "floating point"),
        (torch.full((1, 4, 4), float("nan")), 0.2, ValueError, "NaN"),
        (torch.zeros(1, 4, 4), 1.5, ValueError, r"\[0, 1\]"),
        (torch.zeros(1, 4, 4), "0.2", TypeError, "float"),
    ],
)
def test_threshold_boxes_bad_input(
    maps: object, threshold: object, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        threshold_boxes(maps, threshold)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- top-k


def test_topk_boxes_orders_by_score_and_boxes_each_map() -> None:
    maps = torch.zeros(1, 3, 10, 10)
    maps[0, 0, 0:2, 0:2] = 1.0
    maps[0, 1, 5:9, 4:6] = 1.0
    maps[0, 2, 3, 7] = 1.0
    scores = torch.tensor([[0.1, 2.0, 0.5]])
    out = topk_boxes(maps, scores, k=2)
    assert out.classes.tolist() == [[1, 2]]
    assert out.boxes.tolist() == [[[4, 5, 5, 8], [7, 3, 7, 3]]]
    assert torch.allclose(out.scores, torch.tensor([[2.0, 0.5]]))
    ids = torch.tensor([[7, 42, 3]])
    assert topk_boxes(maps, scores, k=1, classes=ids).classes.tolist() == [[42]]
    with pytest.raises(ValueError, match="k must be"):
        topk_boxes(maps, scores, k=4)
    with pytest.raises(ValueError, match="scores must have shape"):
        topk_boxes(maps, scores[:, :2], k=1)


# ----------------------------------------------------------------------------- contour rule


def _two_blob_map() -> np.ndarray:
    m = np.zeros((6, 8), dtype=np.float64)
    m[1:3, 2:5] = 1.0  # rows 1..2, cols 2..4
    m[4, 6:8] = 0.5  # row 4, cols 6..7 (touches the right border); uint8 value 127
    return m


def test_contour_boxes_hand_computed_quirk_strictness_and_multi() -> None:
    m = _two_blob_map()
    # boundingRect (x=2, y=1, w=3, h=2) -> (2, 1, 2 + 3, 1 + 2): one pixel wider and taller
    # than the blob's inclusive box (2, 1, 4, 2).
    (res,) = contour_boxes(m, [0.3])
    assert isinstance(res, ContourBoxes)
    assert res.boxes.tolist() == [[2, 1, 5, 3]] and res.counts.tolist() == [1]
    (multi,) = contour_boxes(m, [0.3], multi_contour=True)
    # the second blob: (6, 4, min(6 + 2, 7), min(4 + 1, 5)), clipped to the image
    assert sorted(multi.boxes.tolist()) == [[2, 1, 5, 3], [6, 4, 7, 5]]
    # threshold 0.5 -> int(0.5 * 255) = 127: the 0.5 blob (uint8 127) is not strictly above
    (strict,) = contour_boxes(m, [0.5], multi_contour=True)
    assert strict.boxes.tolist() == [[2, 1, 5, 3]]


def test_contour_boxes_sweep_structure_and_empty_maps() -> None:
    m = _two_blob_map()
    sweep = np.arange(0, 1, 0.25)
    res = contour_boxes(np.stack([m, np.zeros_like(m)]), sweep, multi_contour=True)
    assert len(res) == 2
    assert res[0].counts.tolist() == [2, 2, 1, 1]
    parts = res[0].per_threshold()
    assert [p.shape for p in parts] == [(2, 4), (2, 4), (1, 4), (1, 4)]
    assert res[1].counts.tolist() == [1, 1, 1, 1]
    assert res[1].boxes.tolist() == [[0, 0, 0, 0]] * 4
    assert res[0].boxes.dtype == np.int64


def test_contour_boxes_threshold_is_relative_to_the_quantized_max() -> None:
    m = np.zeros((5, 5))
    m[1:4, 1:4] = 0.2  # uint8 51
    m[2, 2] = 0.4  # uint8 102 = the max: threshold 0.5 -> int(51.0) = 51, ring excluded
    (res,) = contour_boxes(m, [0.49, 0.5])
    assert res.per_threshold()[0].tolist() == [[1, 1, 4, 4]]
    assert res.per_threshold()[1].tolist() == [[2, 2, 3, 3]]


def test_contour_boxes_accepts_tensors_and_leading_dims() -> None:
    maps = _blobby(4, 16, 16, seed=4).view(2, 2, 16, 16)
    res = contour_boxes(maps, 0.5)
    assert len(res) == 4
    ref = contour_boxes(maps[1, 0].numpy(), 0.5)[0]
    assert res[2].boxes.tolist() == ref.boxes.tolist()


@pytest.mark.parametrize(
    ("maps", "thresholds", "error", "match"),
    [
        (np.full((4, 4), 1.5), [0.5], ValueError, r"\[0, 1\]"),
        (np.full((4, 4), np.nan), [0.5], ValueError, "NaN"),
        (np.zeros(4), [0.5], ValueError, "at least 2 dims"),
        (np.zeros((4, 4), dtype=np.int32), [0.5], TypeError, "floats"),
        (np.zeros((4, 4)), [1.2], ValueError, "thresholds"),
        (np.zeros((4, 4)), [], ValueError, "non-empty"),
        ([[0.0]], [0.5], TypeError, "numpy array"),
    ],
)
def test_contour_boxes_bad_input(maps: object, thresholds: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as info:
        contour_boxes(maps, thresholds)  # type: ignore[arg-type]
    assert error is TypeError or isinstance(info.value, CAMInputError)


def test_contour_sweep_is_the_shared_step_of_contour_boxes() -> None:
    maps = _blobby(3, 21, 17, seed=6).numpy().astype(np.float64)
    sweep = np.arange(0, 1, 0.1)
    arr = as_numpy_maps(torch.from_numpy(maps))
    assert arr.dtype == np.float64 and np.array_equal(arr, maps)
    q = quantize_maps(arr)
    assert q.dtype == np.uint8 and np.array_equal(q, (maps * 255).astype(np.uint8))
    every = contour_boxes(maps, sweep, multi_contour=True)
    largest = contour_boxes(maps, sweep)
    for i in range(3):
        boxes, counts, top = contour_sweep(q[i], sweep)
        assert boxes.tolist() == every[i].boxes.tolist()
        assert counts.tolist() == every[i].counts.tolist()
        assert boxes[top].tolist() == largest[i].boxes.tolist()
    with pytest.raises(TypeError, match="quantize_maps"):
        contour_sweep(maps[0], sweep)
    with pytest.raises(CAMInputError, match="thresholds"):
        contour_sweep(q[0], np.array([1.5]))
    with pytest.raises(CAMInputError, match=r"\[0, 1\]"):
        as_numpy_maps(np.full((2, 2), 2.0))


def _literal_contour_boxes(m: np.ndarray, thr: float, multi: bool) -> list[list[int]]:
    """Choe et al.'s steps spelled out with one OpenCV call per contour (the oracle)."""
    q = (m * 255).astype(np.uint8)
    _, binary = cv2.threshold(q, int(thr * np.max(q)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if len(contours) == 0:
        return [[0, 0, 0, 0]]
    if not multi:
        contours = [max(contours, key=cv2.contourArea)]
    h, w = m.shape
    out = []
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        out.append([x, y, min(x + bw, w - 1), min(y + bh, h - 1)])
    return out


def test_contour_boxes_match_per_contour_opencv_calls() -> None:
    rng = np.random.default_rng(5)
    smooth = _blobby(6, 33, 41, seed=5, k=5).numpy().astype(np.float64)
    noisy = np.clip(smooth + rng.normal(0, 0.15, smooth.shape), 0, 1)
    maps = np.concatenate([smooth, noisy])
    sweep = np.arange(0, 1, 0.05)
    for multi in (False, True):
        results = contour_boxes(maps, sweep, multi_contour=multi)
        for m, res in zip(maps, results):
            for t, boxes in zip(sweep, res.per_threshold()):
                assert boxes.tolist() == _literal_contour_boxes(m, t, multi), (multi, t)


def test_contour_boxes_chunked_checks_equal_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Maps checked and boxed chunk by chunk give the boxes of the literal steps; ``-0.0``
    is accepted (the bit-pattern check falls back to the exact one) and a bad value in a
    later chunk names the whole batch's minimum and maximum."""
    import cam_plugin.wsol_contours as wc

    monkeypatch.setattr(wc, "_CACHE_BYTES", 3 * 33 * 41 * 5)  # three float32 maps per chunk
    maps = _blobby(10, 33, 41, seed=11, k=5).numpy()
    maps[4, :3, :3] = -0.0
    for dtype in (np.float32, np.float64):
        for multi in (False, True):
            for thr in (0.2, 0.6):
                results = contour_boxes(maps.astype(dtype), thr, multi_contour=multi)
                for m, res in zip(maps.astype(np.float64), results):
                    assert res.boxes.tolist() == _literal_contour_boxes(m, thr, multi)
    bad = maps.copy()
    bad[8, 0, 0] = 1.25
    with pytest.raises(CAMInputError, match=r"min=-0, max=1.25"):
        contour_boxes(bad, 0.2)
    bad[8, 0, 0] = np.nan
    with pytest.raises(CAMInputError, match="NaN"):
        contour_boxes(torch.from_numpy(bad), 0.2)


# ----------------------------------------------------------------------------- backends


def test_opencv_and_torch_backends_give_the_same_boxes(monkeypatch: pytest.MonkeyPatch) -> None:
    import cam_plugin.localize as loc

    maps = torch.cat([_blobby(24, 40, 33, seed=7, k=5), _blobby(8, 40, 33, seed=8, k=9)])
    ties = torch.zeros(2, 40, 33)
    ties[:, 30:33, 2:5] = 1.0  # two equal components: the first in raster order wins
    ties[:, 3:6, 25:28] = 1.0
    maps = torch.cat([maps, ties, torch.zeros(1, 40, 33)])
    # a tiny pixel budget stacks only a few masks per OpenCV call
    monkeypatch.setattr(loc, "_PIXELS_PER_CALL", 3 * 41 * 33)
    for thr in (0.2, 0.5, 0.9):
        ref = threshold_boxes(maps, thr, backend="torch")
        assert torch.equal(threshold_boxes(maps, thr, backend="opencv"), ref)
        assert torch.equal(threshold_boxes(maps, thr), ref)  # "auto" = OpenCV on the CPU
    assert threshold_boxes(ties, 0.2).tolist() == [[25, 3, 27, 5]] * 2
    monkeypatch.undo()
    big = _blobby(32, 224, 224, seed=9, k=15)  # one tall 1.6 M-pixel image per OpenCV call
    assert torch.equal(threshold_boxes(big, 0.3), threshold_boxes(big, 0.3, backend="torch"))
    keep = masks(maps, 0.3)
    assert largest_component_boxes(keep.view(7, 5, 40, 33)).shape == (7, 5, 4)
    with pytest.raises(ValueError, match="backend"):
        threshold_boxes(maps, 0.2, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool"):
        largest_component_boxes(maps)


def test_box_cost_warning_from_cam_result_boxes() -> None:
    from cam_plugin.result import CAMResult

    res = CAMResult(
        maps=torch.rand(2, 6, 8, 8),
        logits=torch.zeros(2, 6),
        classes=torch.arange(6).expand(2, 6),
        bias=torch.zeros(2, 6),
        input_size=(8, 8),
    )
    with pytest.warns(UserWarning, match=r"boxing 12 maps of 8x8 .* warn_above=10"):
        boxes = res.boxes(0.2, warn_above=10)
    assert boxes.shape == (2, 6, 4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res.boxes(0.2)  # 12 maps: below the default
        res.boxes(0.2, warn_above=None)


# ----------------------------------------------------------------------------- the heuristic


def test_paper_top5_heuristic_boxes_known_by_hand() -> None:
    from cam_plugin.localize import PAPER_TOP5_LAYOUT, paper_top5_boxes

    maps = torch.zeros(1, 4, 20, 20)
    top1 = maps[0, 2]  # class 2 scores best
    top1[1:6, 1:6] = 0.15  # halo: kept at 10%, not at 20%
    top1[2:5, 2:5] = 1.0  # core
    top2 = maps[0, 0]  # class 0 is second
    top2[10:12, 10:12] = 1.0  # a small bright blob (4 px)
    top2[13:19, 2:10] = 0.12  # a large faint one (48 px): the largest only at 10%
    top3 = maps[0, 3]  # class 3 is third
    top3[0:4, 12:16] = 0.11
    top3[0:2, 12:16] = 1.0
    maps[0, 1, 8, 8] = 1.0  # class 1 is fourth: no box
    scores = torch.tensor([[2.0, 0.5, 3.0, 1.0]])
    out = paper_top5_boxes(maps, scores, tight=0.2, loose=0.1)
    assert out.classes.tolist() == [[2, 2, 0, 0, 3]]
    assert out.boxes.tolist() == [
        [[2, 2, 4, 4], [1, 1, 5, 5], [10, 10, 11, 11], [2, 13, 9, 18], [12, 0, 15, 3]]
    ]
    assert out.scores.tolist() == [[3.0, 3.0, 2.0, 2.0, 1.0]]
    assert [tight for _, tight in PAPER_TOP5_LAYOUT] == [True, False, True, False, False]
    with pytest.raises(ValueError, match="loose"):
        paper_top5_boxes(maps, scores, tight=0.1, loose=0.2)
    with pytest.raises(ValueError, match="k must be"):
        paper_top5_boxes(maps[:, :2], scores[:, :2])


# ----------------------------------------------------------------------------- fast contours


def test_float_maps_binarize_like_their_quantization() -> None:
    from cam_plugin.wsol_contours import quantization_edges

    for dtype in (np.float32, np.float64):
        e = quantization_edges(dtype)
        for k in range(1, 256):
            below = np.nextafter(e[k], dtype(-1))
            assert quantize_maps(np.array([e[k]], dtype=dtype))[0] >= k
            assert quantize_maps(np.array([below], dtype=dtype))[0] < k
    # maps with values right at the quantization steps, as float32 tensors and float64 arrays
    rng = np.random.default_rng(9)
    steps = rng.integers(0, 256, size=(6, 30, 30)) / 255.0
    jitter = rng.choice([-1, 0, 1], size=steps.shape) * 1e-7
    maps = np.clip(steps + jitter, 0, 1)
    sweep = np.arange(0, 1, 0.05)
    for arr in (maps, maps.astype(np.float32)):
        as64 = arr.astype(np.float64)
        got = contour_boxes(torch.from_numpy(arr), sweep, multi_contour=True)
        assert np.array_equal(arr.astype(np.float64), as64)  # the input is never written
        one = contour_boxes(arr, 0.35)  # one threshold: compared as floats, not quantized
        assert [b.boxes.tolist() for b in one] == [
            _literal_contour_boxes(m, 0.35, False) for m in as64
        ]
        for m, res in zip(as64, got):
            for t, boxes in zip(sweep, res.per_threshold()):
                assert boxes.tolist() == _literal_contour_boxes(m, t, True), t
