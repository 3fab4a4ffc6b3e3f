"""cam_plugin.result: CAMResult over the batch (len, iteration, indexing / select) and the
validation of upsample's size; torch-only models."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import images

import cam_plugin as cp
from cam_plugin.errors import CAMInputError
from cam_plugin.placement import Placement, place_maps
from cam_plugin.result import CAMResult

ROOT = Path(__file__).resolve().parents[1] / "cam_plugin"


def _result(batch: int = 4, k: int = 2, ragged: bool = True) -> CAMResult:
    """A hand-made result whose every per-image field says which image it belongs to."""
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(batch, k, 3, 5, generator=gen)
    maps[:, :, 0, 0] = torch.arange(batch, dtype=maps.dtype)[:, None]
    logits = torch.randn(batch, 6, generator=gen)
    logits[:, 0] = torch.arange(batch, dtype=logits.dtype)
    classes = (torch.arange(batch)[:, None] + torch.arange(k)[None]) % 6
    if ragged:
        classes[-1, -1] = -1
    bias = torch.arange(batch, dtype=torch.float32)[:, None].expand(batch, k) + 0.5
    return CAMResult(
        maps=maps,
        logits=logits,
        classes=classes,
        bias=bias.clone(),
        input_size=(12, 20),
        exact=False,
        stage="relu",
        placement=Placement((4.0, 4.0), (0.0, 0.0)),
    )


def _images_of(res: CAMResult) -> list[int]:
    """Which original image each entry of ``res`` is, read from every per-image field."""
    from_maps = res.maps[:, 0, 0, 0].round().long().tolist()
    assert res.logits[:, 0].round().long().tolist() == from_maps
    assert (res.bias - 0.5).round().long()[:, 0].tolist() == from_maps
    return from_maps


def _same(a: CAMResult, b: CAMResult) -> None:
    for name in ("maps", "logits", "classes", "bias"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# --------------------------------------------------------------------- the batch


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        (1, [1]),
        (-1, [3]),
        (np.int64(2), [2]),
        (torch.tensor(0), [0]),
        (slice(1, 3), [1, 2]),
        (slice(None, None, -2), [3, 1]),
        ([2, 0, 2], [2, 0, 2]),
        ([-1, 0], [3, 0]),
        ([True, False, False, True], [0, 3]),
        (torch.tensor([False, True, True, False]), [1, 2]),
        (torch.tensor([3, 1]), [3, 1]),
        (np.array([0, 2]), [0, 2]),
        (np.array([True, True, False, False]), [0, 1]),
        ([], []),
    ],
)
def test_getitem_selects_images_consistently(index: object, expected: list[int]) -> None:
    res = _result()
    part = res[index]  # type: ignore[index]
    assert isinstance(part, CAMResult) and len(part) == len(expected)
    assert part.maps.shape[1:] == res.maps.shape[1:]
    assert _images_of(part) == expected
    rows = torch.tensor(expected, dtype=torch.long)
    assert torch.equal(part.classes, res.classes[rows])
    # what is not per image is kept
    assert (part.input_size, part.exact, part.stage) == (res.input_size, res.exact, res.stage)
    assert part.placement is res.placement
    _same(res.select(index), part)  # type: ignore[arg-type]


def test_len_and_iteration_give_one_result_per_image() -> None:
    res = _result(batch=3)
    assert len(res) == 3
    singles = list(res)
    assert [len(r) for r in singles] == [1, 1, 1]
    assert [_images_of(r) for r in singles] == [[0], [1], [2]]
    # the padding of ragged targets stays with its image
    assert singles[-1].valid.tolist() == [[True, False]]
    assert [c.tolist() for c, _ in singles[-1].per_image()] == [[2]]


def test_selected_images_match_a_call_on_those_images(tiny_cnn: torch.nn.Module) -> None:
    x = images(5, 16)
    with cp.CAM(tiny_cnn) as cam:
        full = cam(x, topk=2)
        mask = full.probabilities[:, 0] > float(full.probabilities[:, 0].median())
        sub = cam(x[mask], topk=2)
    torch.testing.assert_close(full[mask].maps, sub.maps)
    torch.testing.assert_close(full[mask].logits, sub.logits)
    assert torch.equal(full[mask].classes, sub.classes)
    torch.testing.assert_close(full[mask].bias, sub.bias)
    torch.testing.assert_close(full[2].upsample().maps, full.upsample().maps[2:3])


@pytest.mark.parametrize(
    ("index", "match"),
    [
        (4, "out of range"),
        (-5, "out of range"),
        ([0, 4], "out of range"),
        (torch.tensor([1, -9]), "out of range"),
        ([True, False], "mask has 2 entries for 4 images"),
        (torch.ones(3, dtype=torch.bool), "mask has 3 entries"),
        ((0, 1), "tuple"),
        (1.0, "float"),
        ([0.0, 1.0], r"\[0.0, 1.0\]"),
        (torch.tensor([0.0, 1.0]), "torch.float32 index"),
        (torch.zeros(2, 2, dtype=torch.long), r"shape \(2, 2\)"),
        ("0", "str"),
        (None, "NoneType"),
    ],
)
def test_bad_indices_are_refused(index: object, match: str) -> None:
    with pytest.raises(CAMInputError, match=match):
        _result()[index]  # type: ignore[index]


# --------------------------------------------------------------------- upsample size


def test_upsample_int_means_a_square_size() -> None:
    res = _result(ragged=False)
    seven = res.upsample(7, placement="bilinear")
    assert seven.maps.shape[-2:] == (7, 7)
    ref = F.interpolate(res.maps, size=(7, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seven.maps, ref)
    for same in (np.int32(7), torch.tensor(7), (7, 7), [7, 7], torch.Size([7, 7])):
        torch.testing.assert_close(res.upsample(same, placement="bilinear").maps, ref)  # type: ignore[arg-type]
    # with a placement, an int is the same square size, the placement rescaled with it
    placed = res.upsample(8)
    scaled = res.placement.rescaled(res.input_size, (8, 8))  # type: ignore[union-attr]
    torch.testing.assert_close(placed.maps, place_maps(res.maps, (8, 8), scaled))
    assert res.upsample().maps.shape[-2:] == res.input_size


@pytest.mark.parametrize(
    "size",
    [(10.5, 10), 7.0, (10.0, 10), (0, 4), 0, -3, (4,), (4, 4, 4), True, (True, 4), "77", [[7, 7]]],
)
def test_upsample_bad_sizes_are_refused_saying_what_is_accepted(size: object) -> None:
    with pytest.raises(CAMInputError, match=r"an int n \(an n x n map\) or \(H, W\)"):
        _result().upsample(size)  # type: ignore[arg-type]


def test_upsample_bad_mode_is_refused() -> None:
    with pytest.raises(CAMInputError, match="mode must be one of"):
        _result().upsample(mode="area")  # type: ignore[arg-type]


# --------------------------------------------------------------------- placement


def test_rescaled_placement_follows_the_resized_image() -> None:
    p = Placement((32.0, 16.0), (0.0, 7.5), source="traced", disagreement=0.25)
    assert p.rescaled((64, 64), (64, 64)) is p
    half = p.rescaled((64, 64), (32, 128))
    # pixel y covers [y - 0.5, y + 0.5]: a point c maps to (c + 0.5) * r - 0.5
    assert half == Placement((16.0, 32.0), (-0.25, 15.5), source="traced", disagreement=0.25)
    ys, xs = p.centres((2, 2))
    hy, hx = half.centres((2, 2))
    torch.testing.assert_close(hy, (ys + 0.5) * 0.5 - 0.5)
    torch.testing.assert_close(hx, (xs + 0.5) * 2.0 - 0.5)
    with pytest.raises(CAMInputError, match="size"):
        p.rescaled((64, 64), (0, 8))


def test_placement_kept_by_normalize_dropped_by_upsample() -> None:
    res = _result()
    assert res.normalize().placement == res.placement and res.upsample().placement is None
    plain = dataclasses.replace(res, placement=None)
    assert plain.upsample().placement is None


def _relative_imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update(a.name for a in node.names)
    return found


def test_placement_geometry_is_a_leaf_and_result_does_not_reach_the_registry() -> None:
    assert _relative_imports("placement") == {"errors"}
    seen, todo = set(), ["result"]
    while todo:
        mod = todo.pop()
        if mod not in seen and (ROOT / f"{mod}.py").exists():
            seen.add(mod)
            todo.extend(_relative_imports(mod))
    assert "registry" not in seen and "tracing" not in seen, seen
