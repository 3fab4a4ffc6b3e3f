"""CAMFaithfulnessMetric in a real mmengine Runner with a real mmpretrain classifier.

A validation-only run (tiny ResNet_CIFAR, 32 x 32 cluttered digits, two batches, the
second one short) with the hook, the metric and ``DumpResults``: the metric's numbers equal
:func:`cam_plugin.evaluate.deletion_insertion` on the dumped maps and the preprocessed
images computed directly, and the metric leaves the model (modes, grad, parameters) and
the RNG streams exactly as they were.
"""

from __future__ import annotations

import pickle
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("mmpretrain")

import mmpretrain.models  # noqa: E402,F401  (registers mmpretrain's modules)
import torch  # noqa: E402
from cam_plugin.integrations.mm.sample_maps import placed_maps  # noqa: E402
from cam_plugin.integrations.mmengine import (  # noqa: E402
    CAMFaithfulnessMetric,
    CAMVisualizationHook,
)
from helpers import randomize_head  # noqa: E402
from mmengine.dataset import default_collate  # noqa: E402
from mmengine.registry import DATASETS, METRICS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from cam_plugin.errors import CAMInputError  # noqa: E402
from cam_plugin.evaluate import deletion_insertion  # noqa: E402

CANVAS = 32
LENGTH = 6
STEP = 128  # 8 points per curve: 16 perturbed forwards per map
PACK = [dict(type="PackInputs", algorithm_keys=("gt_bboxes", "gt_bboxes_labels"))]
DATASET = dict(
    type="ClutteredDigitsDataset",
    split="test",
    length=LENGTH,
    canvas_size=CANVAS,
    digit_size=(12, 20),
    seed=0,
    test_mode=True,
    pipeline=PACK,
)
MODEL = dict(
    type="ImageClassifier",
    backbone=dict(
        type="ResNet_CIFAR", depth=18, stem_channels=8, base_channels=8, out_indices=(3,)
    ),
    neck=dict(type="GlobalAveragePooling"),
    head=dict(type="LinearClsHead", num_classes=10, in_channels=64),
    data_preprocessor=dict(num_classes=10, mean=[127.5] * 3, std=[127.5] * 3, to_rgb=True),
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_runner(root: Path, metrics: list[Any]) -> Runner:
    name = f"faith_{uuid.uuid4().hex[:8]}"
    return Runner(
        model=MODEL,
        work_dir=str(root / name),
        experiment_name=name,
        val_dataloader=dict(
            batch_size=4,
            num_workers=0,
            sampler=dict(type="DefaultSampler", shuffle=False),
            collate_fn=dict(type="default_collate"),
            dataset=DATASET,
        ),
        val_cfg=dict(),
        val_evaluator=metrics,
        custom_hooks=[dict(type="CAMVisualizationHook", max_samples=0, topk=2)],
        default_scope="mmpretrain",
        env_cfg=dict(dist_cfg=dict(backend="gloo")),
        randomness=dict(seed=0),
    )


@pytest.fixture(scope="module")
def val_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("faith")
    metric = CAMFaithfulnessMetric(step=STEP, max_batch=16, score="logit")
    gt_metric = CAMFaithfulnessMetric(maps="gt", step=STEP, prefix="cam_gt")
    dump = root / "preds.pkl"
    runner = build_runner(
        root, [metric, gt_metric, dict(type="DumpResults", out_file_path=str(dump))]
    )
    randomize_head(runner.model)
    with torch.no_grad():  # a peaked head: the curves move by tenths of a logit
        runner.model.head.fc.bias.zero_()
        runner.model.head.fc.weight.mul_(30)
    scores = runner.val()
    return dict(
        runner=runner,
        metric=metric,
        scores=scores,
        preds=sorted(pickle.loads(dump.read_bytes()), key=lambda p: p["sample_idx"]),
    )


def direct(runner: Runner, preds: list[dict], which: str, score: str) -> dict[str, float]:
    """``cam_plugin.evaluate.deletion_insertion`` on the dumped maps and the images as the
    model's data_preprocessor gives them."""
    model = runner.model
    dataset = DATASETS.build(DATASET)
    images = model.data_preprocessor(default_collate([dataset[i] for i in range(LENGTH)]), False)
    rows, maps, classes = [], [], []
    for i, p in enumerate(preds):
        cam = p["cam_maps"]
        k = cam["num_targets"]
        picks = (
            range(k) if which == "targets" else [cam["classes"].tolist().index(p["gt_label"][0])]
        )
        placed = placed_maps(cam, cam["maps"][list(picks)].float())
        for j, pick in enumerate(picks):
            rows.append(i)
            maps.append(placed[j])
            classes.append(int(cam["classes"][pick]))
    with torch.no_grad():
        res = deletion_insertion(
            model,
            images["inputs"][rows],
            torch.stack(maps).unsqueeze(1),
            torch.tensor(classes),
            step=STEP,
            score=score,
        )
    return res.summary


def test_scores_equal_the_evaluate_module_on_the_same_maps(val_run: dict[str, Any]) -> None:
    scores, preds = val_run["scores"], val_run["preds"]
    assert len(preds) == LENGTH and all(p["cam_maps"]["maps"].shape[0] >= 2 for p in preds)
    for prefix, which, score in (("cam", "targets", "logit"), ("cam_gt", "gt", "probability")):
        expected = direct(val_run["runner"], preds, which, score)
        for key in ("deletion_auc", "insertion_auc", "insertion_minus_deletion"):
            assert scores[f"{prefix}/{key}"] == pytest.approx(expected[key], rel=1e-6, abs=1e-7)
    assert abs(scores["cam/insertion_minus_deletion"]) > 1e-3  # the curves do differ
    assert 0.0 <= scores["cam_gt/deletion_auc"] <= 1.0
    # the hook bound the model for the epoch only
    assert val_run["metric"].model is None
    hook = next(h for h in val_run["runner"].hooks if isinstance(h, CAMVisualizationHook))
    assert not hook.installed


def reseed() -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)


def draw() -> tuple[float, float, float]:
    """One number from each of torch's, numpy's and Python's global RNG."""
    return float(torch.rand(())), float(np.random.rand()), random.random()


def test_the_metric_leaves_model_and_rngs_as_they_were(val_run: dict[str, Any]) -> None:
    runner, preds = val_run["runner"], val_run["preds"]
    model = runner.model
    dataset = DATASETS.build(DATASET)
    batch = default_collate([dataset[i] for i in range(2)])
    model.train()
    model.backbone.layer1.eval()  # a mix of modes must survive
    modes = [m.training for m in model.modules()]
    params = {k: v.clone() for k, v in model.state_dict().items()}
    reseed()
    expected = draw()
    reseed()
    metric = CAMFaithfulnessMetric(step=STEP)
    metric.bind_model(model)
    with torch.enable_grad():
        metric.process(batch, preds[:2])
        assert torch.is_grad_enabled()
    assert len(metric.results) == 2  # one record set per sample
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    assert draw() == expected  # every RNG stream continues where it was
    model.eval()


def test_without_a_model_or_maps_it_says_what_to_add(val_run: dict[str, Any]) -> None:
    preds = val_run["preds"]
    metric = CAMFaithfulnessMetric(step=STEP)
    with pytest.raises(CAMInputError, match="bind_model"):
        metric.process({}, preds[:1])
    without = [{k: v for k, v in preds[0].items() if k != "cam_maps"}]
    with pytest.raises(CAMInputError, match="CAMVisualizationHook"):
        metric.process({}, without)


def test_registered_and_options_checked_at_build_time() -> None:
    built = METRICS.build(dict(type="CAMFaithfulnessMetric", step=64, score="logit"))
    assert isinstance(built, CAMFaithfulnessMetric) and built.options["score"] == "logit"
    with pytest.raises(CAMInputError, match="did you mean 'step'"):
        CAMFaithfulnessMetric(stpe=3)
    with pytest.raises(CAMInputError, match="maps must be"):
        CAMFaithfulnessMetric(maps="all")
    with pytest.raises(CAMInputError, match="step"):
        CAMFaithfulnessMetric(step=0)
