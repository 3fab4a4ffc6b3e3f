"""Per-unit top patches over a data set (paper Sec. 5, issue 14): cam_plugin.unit_patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cam_plugin as cp
from cam_plugin.image_inputs import prepare_pictures
from cam_plugin.placement import Placement
from cam_plugin.preprocess import DataConfig
from cam_plugin.tracing import feature_placement
from cam_plugin.unit_patches import (
    UnitPatchCollector,
    box_to_original,
    class_picture,
    crop_cells,
    crop_picture,
    patch_boxes,
)
from cam_plugin.units import class_units, unit_maps


class BrightSpot(nn.Module):
    """Unit 2 fires only on a bright 5x5 spot centred on input pixel ``4i`` (5x5 kernel,
    stride 4, padding 2: cell ``i`` is centred at ``4i``, not at bilinear's ``4i + 1.5``);
    class 1 weighs it most."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=4, padding=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        bias = self.conv.bias
        assert bias is not None
        with torch.no_grad():
            self.conv.weight.zero_()
            bias.fill_(-0.5)
            self.conv.weight[2] = 1.0 / 75.0  # relu(mean of the 5x5x3 window − 0.5)
            self.conv.weight[0, 0] = 0.01
            bias[0] = 0.1
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0.3, 0.1, 4.0, 0.2], [0, 1, 0, 1]]))
            self.fc.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


#: (row, col) of the spot's cell per original picture, and its brightness
SPOTS = [((3, 7), 255), ((8, 2), 200), ((5, 5), 150), ((1, 10), 90)]


def originals() -> list[np.ndarray]:
    """96 x 128 black pictures with a 10 x 10 spot centred on original pixel 8i + 1 (the
    model input is the picture halved and centre-cropped to 48 x 48: left = 8)."""
    out = []
    for (r, c), value in SPOTS:
        pic = np.zeros((96, 128, 3), np.uint8)
        y, x = 8 * r - 4, 8 * c - 4 + 16  # input 4i -> original 2 (4i + left) + 0.5 ...
        pic[y : y + 10, x : x + 10] = value
        out.append(pic)
    return out


CONFIG = DataConfig(input_size=(3, 48, 48), crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))


def test_top_patches_of_a_planted_unit_are_the_spots_in_original_pixels() -> None:
    model = BrightSpot().eval()
    pics = originals()
    x, prepared = prepare_pictures(pics, CONFIG, device=torch.device("cpu"), dtype=torch.float32)
    assert (prepared[0].scale, prepared[0].left, prepared[0].top) == (0.5, 8, 0)
    adapter = cp.resolve(model, example=x)
    folded = adapter.fold(4)
    placement = feature_placement(model, (3, 48, 48), adapter=adapter)
    assert placement.offset == (0.0, 0.0) and placement.stride == (4.0, 4.0)
    collector = UnitPatchCollector.for_classes(folded, [1], top=2, per_unit=3, placement=placement)
    assert collector.by_class == {1: [2, 0]}
    # two batches, out of order: the result is the same as one pass
    collector.update(
        unit_maps(folded, model.features(x[2:])), [2, 3], pictures=pics_at_input(x[2:])
    )
    collector.update(
        unit_maps(folded, model.features(x[:2])), [0, 1], pictures=pics_at_input(x[:2])
    )
    top = collector.records(2)
    assert [p.sample for p in top] == [0, 1, 2]  # brightest first; the dimmest one is not kept
    assert [p.activation for p in top] == sorted((p.activation for p in top), reverse=True)
    picture = class_picture(collector, 1, head=folded, title="class 1", patch=16)
    assert picture.shape == (14 + 16 + 2 + 16, 96 + 3 * (16 + 2), 3)
    with pytest.raises(cp.CAMInputError, match="no units"):
        class_picture(collector, 0)
    for p in top:
        (r, c), value = SPOTS[p.sample]
        assert p.cell == (r, c)
        x0, y0, x1, y1 = p.box  # 8 x 8 input pixels around the cell's centre 4i
        assert (x1 - x0, y1 - y0) == (8, 8) and abs((x0 + x1) / 2 - (4 * c + 0.5)) <= 0.5
        ox0, oy0, ox1, oy1 = box_to_original(p.box, 0.5, 8, 0)
        spot = (8 * c - 4 + 16, 8 * r - 4)  # the spot's first original pixel (x, y)
        assert ox0 <= spot[0] and ox1 >= spot[0] + 10 and oy0 <= spot[1] and oy1 >= spot[1] + 10
        assert abs((ox0 + ox1) / 2 - (spot[0] + 5)) <= 1.0
        assert abs((oy0 + oy1) / 2 - (spot[1] + 5)) <= 1.0
        crop = crop_picture(pics[p.sample], (ox0, oy0, ox1, oy1), out=16)
        assert crop[6:10, 6:10].min() >= value - 30 and crop[0, 0].max() < 40
        assert p.crop is not None and p.crop.shape == (8, 8, 3)
        assert p.crop[3:5, 3:5].min() >= value - 30  # the crop kept from the input picture


def pics_at_input(x: torch.Tensor) -> torch.Tensor:
    """The model input as pictures (mean 0, std 1: the values are the pixels in [0, 1])."""
    return x.clamp(0, 1)


def test_class_maps_and_unit_results_feed_the_collector() -> None:
    model = BrightSpot().eval()
    x, prepared = prepare_pictures(
        originals(), CONFIG, device=torch.device("cpu"), dtype=torch.float32
    )
    cam = cp.CAM(model)
    res = cam(x, targets=1)
    by_class = UnitPatchCollector(per_unit=2)
    by_class.update(res, [10, 11, 12, 13])
    assert by_class.keys.tolist() == [1]
    assert by_class.placement is not None and by_class.placement.offset == (0.0, 0.0)
    assert [p.sample for p in by_class.records(1)] == [10, 11]
    units = cam.units(x, targets=1, top=2, by="weight")
    by_unit = UnitPatchCollector(per_unit=2, placement=by_class.placement)
    by_unit.update(units, [10, 11, 12, 13])
    assert sorted(by_unit.keys.tolist()) == [0, 2]
    assert [p.sample for p in by_unit.records(2)] == [10, 11]
    assert by_unit.records(2)[0].cell == SPOTS[0][0]


def reference(maps: torch.Tensor, ids: list[int], n: int) -> dict[int, list[tuple[float, int]]]:
    """Brute force: per unit, the n best (activation, id) pairs over all images."""
    best = maps.flatten(2).amax(2)
    out = {}
    for k in range(maps.shape[1]):
        pairs = sorted(
            ((float(best[i, k]), ids[i]) for i in range(len(ids))), key=lambda t: (-t[0], t[1])
        )
        out[k] = pairs[:n]
    return out


def test_streaming_and_merging_equal_one_pass() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(23, 6, 4, 5, generator=g)
    maps[3, 1] = maps[7, 1]  # a tie: the lower id wins
    ids = list(range(100, 123))
    want = reference(maps, ids, 4)
    whole = UnitPatchCollector(per_unit=4, input_size=(16, 20))
    whole.update(maps, ids)
    parts = [UnitPatchCollector(per_unit=4, input_size=(16, 20)) for _ in range(3)]
    for j, sl in enumerate([slice(0, 5), slice(5, 17), slice(17, 23)]):
        parts[j].update(maps[sl], ids[sl])
    merged = UnitPatchCollector.from_state(parts[2].state_dict()).merge(parts[0]).merge(parts[1])
    for col in (whole, merged):
        t = col.table()
        for k in range(6):
            rows = t["unit"] == k
            got = list(zip(t["activation"][rows].tolist(), t["sample"][rows].tolist()))
            assert [(pytest.approx(a), s) for a, s in want[k]] == got
    assert whole.table()["row"].tolist() == merged.table()["row"].tolist()
    # cells: the argmax of each kept map
    t = whole.table()
    for k, s, r, c in zip(t["unit"], t["sample"], t["row"], t["col"]):
        m = maps[int(s) - 100, int(k)]
        assert float(m[r, c]) == float(m.max())


def test_fixed_units_crops_and_errors() -> None:
    pics = torch.randint(0, 255, (3, 16, 16, 3), dtype=torch.uint8)
    placement = Placement((4.0, 4.0), (1.5, 1.5), source="half-pixel")
    cells = torch.tensor([[0, 0], [3, 2]])
    crops = crop_cells(pics, torch.tensor([1, 2]), cells, placement, (8, 8))
    assert crops.shape == (2, 8, 8, 3)
    assert torch.equal(crops[0, 2:, 2:], pics[1, :6, :6])  # box [-2, 6): grey outside
    assert int(crops[0, 0, 0, 0]) == 128
    assert torch.equal(crops[1], _pad(pics[2])[19:27, 15:23])  # rows 10..17: two outside
    assert patch_boxes(cells, placement).tolist()[1] == [6.0, 10.0, 14.0, 18.0]
    col = UnitPatchCollector([3, 1], per_unit=2, placement=placement)
    maps = torch.zeros(3, 5, 4, 4)
    maps[:, 3, 3, 2] = torch.tensor([1.0, 3.0, 2.0])
    col.update(maps, [0, 1, 2], pictures=pics)
    assert col.keys.tolist() == [3, 1]
    p = col.records(3)
    assert [q.sample for q in p] == [1, 2] and p[0].crop is not None
    assert np.array_equal(p[0].crop, _pad(pics[1])[19:27, 15:23].numpy())
    with pytest.raises(cp.CAMInputError, match="pictures"):
        col.update(maps, [3, 4, 5])
    with pytest.raises(cp.CAMInputError, match="ids"):
        col.update(maps, [0, 1])
    with pytest.raises(cp.CAMInputError, match="per_unit"):
        UnitPatchCollector(per_unit=0)
    with pytest.raises(cp.CAMInputError, match="normalized"):
        UnitPatchCollector(per_unit=1, placement=placement).update(
            maps, [0, 1, 2], pictures=torch.randn(3, 3, 16, 16) * 3
        )
    with pytest.raises(cp.CAMInputError, match="place on the image"):
        _table_without_geometry(maps)
    with pytest.raises(cp.CAMInputError, match="top"):
        class_units(cp.FoldedHead(weight=torch.randn(3, 4), bias=torch.zeros(3)), [0], top=0)


def _table_without_geometry(maps: torch.Tensor) -> None:
    col = UnitPatchCollector(per_unit=1)
    col.update(maps, [0, 1, 2])
    col.table()


def _pad(pic: torch.Tensor) -> torch.Tensor:
    out = torch.full((pic.shape[0] + 18, pic.shape[1] + 18, 3), 128, dtype=torch.uint8)
    out[9:-9, 9:-9] = pic
    return out


def test_class_units_rank_by_weight() -> None:
    w = torch.tensor([[0.1, 0.5, 0.5, -1.0], [2.0, 0.0, 1.0, 3.0]])
    head = cp.FoldedHead(weight=w, bias=torch.zeros(2))
    assert class_units(head, [0, 1], top=3).tolist() == [[1, 2, 0], [3, 0, 2]]
    with pytest.raises(cp.CAMInputError, match="classes"):
        class_units(head, [2])


def test_crop_picture_resamples_a_continuous_box() -> None:
    pic = np.zeros((20, 30, 3), np.uint8)
    pic[5:10, 10:20] = 255
    out = crop_picture(pic, (10, 5, 20, 10), out=10)
    assert out.shape == (10, 10, 3) and out[2:8, 2:8].min() > 200
    edge = crop_picture(pic, (-10, -10, 0, 0), out=4)
    assert int(edge[0, 0, 0]) == 128
    _ = Image  # PIL is the resampler


def test_unit_patches_picture_draws_a_row_per_unit() -> None:
    from cam_plugin.viz import unit_patches_picture

    rows = [("unit 3\nw = 0.5", [np.zeros((10, 12, 3), np.uint8)] * 3), ("unit 1", [])]
    pic = unit_patches_picture("espresso (class 967)", rows, patch=20, label_width=40)
    assert pic.dtype == np.uint8 and pic.shape == (14 + 20 + 2 + 20, 40 + 3 * (20 + 2), 3)
    side = unit_patches_picture("x", rows, patch=20, side=np.zeros((30, 60, 3), np.uint8))
    assert side.shape[1] > pic.shape[1]
    with pytest.raises(cp.CAMInputError, match="at least one"):
        unit_patches_picture("x", [])


def test_merged_crops_equal_one_pass() -> None:
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(9, 3, 4, 4, generator=g)
    pics = torch.randint(0, 255, (9, 16, 16, 3), dtype=torch.uint8, generator=g)
    placement = Placement((4.0, 4.0), (1.5, 1.5), source="half-pixel")
    whole = UnitPatchCollector(per_unit=3, placement=placement)
    whole.update(maps, list(range(9)), pictures=pics)
    a, b = (UnitPatchCollector(per_unit=3, placement=placement) for _ in range(2))
    a.update(maps[:4], list(range(4)), pictures=pics[:4])
    b.update(maps[4:], list(range(4, 9)), pictures=pics[4:])
    merged = b.merge(UnitPatchCollector.from_state(a.state_dict()))
    assert whole.crops is not None and merged.crops is not None
    order = [merged.keys.tolist().index(k) for k in whole.keys.tolist()]
    assert torch.equal(whole.samples, merged.samples[order])
    assert torch.equal(whole.crops, merged.crops[order])
