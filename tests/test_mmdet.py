"""mmdet: converted detection backbones (exact CAM), and CAMProbeHook inside a real RetinaNet
run built from a config file with ``custom_imports`` (bitwise-unchanged detector, probe
training, overlays, mAP, its own file, resume), plus the errors raised before training."""

from __future__ import annotations

import glob
import json
import os
import os.path as osp
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_identity

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # mmengine's resume (trusted)

import mmdet.models  # noqa: E402,F401  (registers mmdet's modules)
from cam_plugin.integrations.configs import config_path  # noqa: E402
from cam_plugin.integrations.mmdet import (  # noqa: E402
    CAMProbe,
    CAMProbeHook,
    maps_to_original,
    multilabel_average_precision,
    valid_cell_mask,
)
from mmdet.registry import MODELS  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.runner import BaseLoop, Runner  # noqa: E402

import cam_plugin as cp  # noqa: E402
from cam_plugin.baselines import centered_gaussian_maps  # noqa: E402
from cam_plugin.convert import convert  # noqa: E402
from cam_plugin.data import ClutteredDigits  # noqa: E402
from cam_plugin.errors import CAMInputError, UnsupportedHeadError  # noqa: E402
from cam_plugin.metrics import WSOLMetrics  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One thread: on a shared 2-core machine two OpenMP threads that wait for each other
    make these training runs several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the probe maths


def test_probe_identity_with_padding_mask() -> None:
    gen = torch.Generator().manual_seed(0)
    probe = CAMProbe(6, 4)
    with torch.no_grad():
        probe.fc.weight.copy_(torch.randn(4, 6, generator=gen))
        probe.fc.bias.copy_(torch.randn(4, generator=gen))
    f = torch.randn(3, 6, 5, 7, generator=gen)
    # batch tensor 160x224, images 160x224 (full), 100x224, 33x50: rows ceil(h*5/160)
    mask = valid_cell_mask([(160, 224), (100, 224), (33, 50)], (160, 224), (5, 7))
    assert mask.sum(dim=(1, 2)).tolist() == [35, 4 * 7, 2 * 2]
    logits = probe(f, mask)
    maps = probe.maps(f)
    m = mask[:, None].float()
    mean_valid = (maps * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3))
    torch.testing.assert_close(mean_valid + probe.fc.bias, logits, rtol=1e-5, atol=1e-5)
    # only the valid cells count: changing padded cells changes nothing
    g = f.clone()
    g[2, :, 3:, :] = 1e3
    torch.testing.assert_close(probe(g, mask), logits)
    sel = torch.tensor([[3, 0], [1, 1], [2, 0]])
    torch.testing.assert_close(probe.maps(f, sel), torch.stack([maps[i, sel[i]] for i in range(3)]))


def test_multilabel_ap_matches_sklearn() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    targets = (rng.random((60, 5)) < 0.3).astype(np.int64)
    targets[:, 4] = 0  # a class without positives is left out of the mean
    scores = rng.normal(size=(60, 5)) + 1.5 * targets
    mean, ap = multilabel_average_precision(torch.tensor(scores), torch.tensor(targets))
    ref = [average_precision_score(targets[:, c], scores[:, c]) for c in range(4)]
    np.testing.assert_allclose(ap[:4].numpy(), ref, rtol=1e-6)
    assert np.isnan(ap[4].item())
    assert mean == pytest.approx(float(np.mean(ref)))


def test_maps_to_original_crops_unflips_and_rescales() -> None:
    # a 4x6 feature map over a 64x96 padded batch; the image is 48x72 (scaled 1.5x from
    # 32x48) and was flipped horizontally: its top-left feature cell is the image's top-right
    maps = torch.zeros(1, 4, 6)
    maps[0, 0, 0] = 1.0
    meta = {"img_shape": (48, 72), "ori_shape": (32, 48), "flip": True}
    out = maps_to_original(maps, (64, 96), meta)
    assert out.shape == (1, 32, 48)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    ys, xs = np.unravel_index(int(out[0].argmax()), (32, 48))
    assert ys < 8 and xs > 40
    no_flip = maps_to_original(maps, (64, 96), {**meta, "flip": False})
    torch.testing.assert_close(no_flip, out.flip(-1))
    # ori_shape absent: img_shape / scale_factor
    scaled = maps_to_original(maps, (64, 96), {"img_shape": (48, 72), "scale_factor": (1.5, 1.5)})
    assert scaled.shape == (1, 32, 48)


# ----------------------------------------------------------------------------- converted backbones


def build_mmdet(cfg: dict) -> torch.nn.Module:
    """Build from mmdet's registry whatever default scope an earlier test's Runner left."""
    with DefaultScope.overwrite_default_scope("mmdet"):
        return MODELS.build(cfg)


BACKBONES = {
    "ResNet-18": (dict(type="ResNet", depth=18, out_indices=(0, 1, 2, 3)), 2),
    "ResNet-18-out3": (dict(type="ResNet", depth=18, out_indices=(3,)), -1),
    "ResNeXt-50": (
        dict(type="ResNeXt", depth=50, groups=32, base_width=4, out_indices=(0, 1, 2, 3)),
        3,
    ),
    "RegNetX-400MF": (dict(type="RegNet", arch="regnetx_400mf", out_indices=(0, 1, 2, 3)), 2),
    "Swin": (
        dict(
            type="SwinTransformer",
            embed_dims=32,
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 4, 8),
            window_size=4,
            out_indices=(0, 1, 2, 3),
        ),
        3,
    ),
    # PVT's attention is mmcv's wrapper of nn.MultiheadAttention, which reads
    # out_proj.weight without calling out_proj: conversion must keep it.
    "PVT": (
        dict(
            type="PyramidVisionTransformer",
            embed_dims=16,
            num_layers=[1, 1, 1, 1],
            num_heads=[1, 2, 4, 8],
            out_indices=(0, 1, 2, 3),
        ),
        3,
    ),
    "PVTv2": (
        dict(
            type="PyramidVisionTransformerV2",
            embed_dims=16,
            num_layers=[1, 1, 1, 1],
            num_heads=[1, 2, 4, 8],
            out_indices=(0, 1, 2, 3),
        ),
        2,
    ),
    "CSPDarknet": (
        dict(type="CSPDarknet", deepen_factor=0.33, widen_factor=0.25, out_indices=(2, 3, 4)),
        1,
    ),
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_converted_mmdet_backbone_is_exact(name: str) -> None:
    cfg, stage = BACKBONES[name]
    torch.manual_seed(0)
    backbone = build_mmdet(cfg)
    backbone.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = backbone(x)
    expected = outs[stage]  # the stage= position in what the backbone returns
    model = convert(backbone, 7, stage=stage, input_size=(3, 64, 64))
    assert model.info.channels == expected.shape[1]
    assert model.info.map_size == tuple(expected.shape[-2:])
    torch.nn.init.normal_(model.fc.weight, std=0.5)
    torch.nn.init.normal_(model.fc.bias)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), expected)
    with cp.CAM(model) as cam:
        res = cam(x, targets="all")
    assert res.maps.shape == (2, 7, *expected.shape[-2:])
    assert_identity(res)
    assert cp.count_hooks(model) == 0


def test_mmdet_models_refused_with_the_two_routes() -> None:
    backbone = build_mmdet(dict(type="ResNet", depth=18))
    with pytest.raises(UnsupportedHeadError, match=r"convert\(.*CAMProbeHook"):
        cp.CAM(backbone)


def test_convert_refuses_a_stage_that_is_not_a_map() -> None:
    from mmdet.models.layers import PatchEmbed

    embed = PatchEmbed(in_channels=3, embed_dims=16, kernel_size=4, stride=4)  # tokens, (h, w)
    with pytest.raises(CAMInputError, match="4-D"):
        convert(embed, 5, stage=0, input_size=(3, 32, 32))


def _digits(split: str, n: int, **kw: Any) -> tuple[torch.Tensor, torch.Tensor, list]:
    ds = ClutteredDigits(split, n, **kw)  # type: ignore[arg-type]
    items = [ds[i] for i in range(n)]
    images = torch.stack([it["image"] for it in items])
    return (
        (images - 0.5) / 0.5,
        torch.tensor([it["label"] for it in items]),
        [it["boxes"] for it in items],
    )


@pytest.mark.slow
def test_converted_mmdet_resnet18_localizes_digits() -> None:
    """Trained on image-level labels only (light clutter: one fragment of another digit and
    one stroke per 48x48 image), the CAM beats the centred Gaussian on MaxBoxAccV2."""
    kw = dict(canvas_size=48, digit_size=(15, 27), num_fragments=1, num_strokes=1)
    steps, batch = 64, 32
    x, y, _ = _digits("train", steps * batch, **kw)
    xt, yt, boxes = _digits("test", 160, **kw)
    torch.manual_seed(0)
    backbone = build_mmdet(dict(type="ResNet", depth=18, out_indices=(0, 1, 2, 3), norm_eval=False))
    model = convert(backbone, 10, stage=1, input_size=(3, 48, 48), copy=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    model.train()
    for s in range(steps):
        sl = slice(s * batch, (s + 1) * batch)
        loss = F.cross_entropy(model(x[sl]), y[sl])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with cp.CAM(model) as cam:
        res = cam(xt, targets=yt)
    assert_identity(res)
    maps = res.upsample().normalize().maps[:, 0]

    def v2(m: torch.Tensor) -> float:
        metric = WSOLMetrics(cam_curve_interval=0.02)
        metric.update(m, boxes)
        return metric.compute()["MaxBoxAccV2"]

    ours, centred = v2(maps), v2(centered_gaussian_maps((160, 48, 48)))
    print(f"MaxBoxAccV2: CAM {ours:.1f}, centred Gaussian {centred:.1f}")
    assert ours > centred + 5.0


# ----------------------------------------------------------------------------- the probe in a run


class Recorder(Hook):
    """Records the detector's per-iteration losses (exact floats) and the iterations run."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []
        self.val_metrics: list[dict] = []
        self.probe_at_start: Optional[dict[str, torch.Tensor]] = None

    def before_train(self, runner: Any) -> None:
        for hook in runner.hooks:
            if isinstance(hook, CAMProbeHook) and hook.probe is not None:
                self.probe_at_start = {k: v.clone() for k, v in hook.probe.state_dict().items()}

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:  # fmt: skip
        self.losses.append({k: float(v.detach()) for k, v in outputs.items()})

    def after_val_epoch(self, runner: Any, metrics: Optional[dict] = None) -> None:
        self.val_metrics.append(dict(metrics or {}))


def _config(work: Path, body: str) -> Config:
    """A config file that takes the shipped RetinaNet config and makes it small."""
    work.mkdir(parents=True, exist_ok=True)
    text = f"""
_base_ = [{config_path("mmdet_retinanet_r18_digits_probe")!r}]
digits = dict(canvas_size=96, digit_size=(16, 28), digits_per_image=3)
train_pipeline = [
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=(128, 128), keep_ratio=True),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=(128, 128), keep_ratio=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                        dataset=dict(length=96, pipeline=train_pipeline, **digits))
val_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                      dataset=dict(length=8, pipeline=test_pipeline, **digits))
test_dataloader = val_dataloader
train_cfg = dict(_delete_=True, type="IterBasedTrainLoop", max_iters=20, val_interval=20)
param_scheduler = []
default_hooks = dict(
    logger=dict(interval=4),
    checkpoint=dict(by_epoch=False, interval=10, max_keep_ckpts=-1),
    visualization=dict(draw=False),
)
log_processor = dict(by_epoch=False)
probe = dict(type="CAMProbeHook", feature="backbone", index=2,
             optimizer=dict(type="Adam", lr=1e-3), interval=1, num_images=2, max_classes=3)
custom_hooks = [probe]
work_dir = {str(work)!r}
{body}
"""
    path = work / "config.py"
    path.write_text(text)
    cfg = Config.fromfile(str(path))
    cfg.experiment_name = work.name
    return cfg


def _train(cfg: Config) -> tuple[Runner, Recorder]:
    runner = Runner.from_cfg(cfg)
    recorder = Recorder()
    runner.register_hook(recorder)
    runner.train()
    return runner, recorder


def _probe_hook(runner: Runner) -> CAMProbeHook:
    return next(h for h in runner.hooks if isinstance(h, CAMProbeHook))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same seeded RetinaNet run with and without the probe (20 iterations each)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, Any] = {}
        for name, body in (("with_probe", ""), ("without_probe", "custom_hooks = []")):
            work = tmp_path_factory.mktemp("mmdet") / name
            cfg = _config(work, body)
            runner = Runner.from_cfg(cfg)
            recorder = Recorder()
            runner.register_hook(recorder)
            hooks_before = cp.count_hooks(runner.model)
            runner.train()
            out[name] = dict(
                runner=runner,
                recorder=recorder,
                work=work,
                hooks=(hooks_before, cp.count_hooks(runner.model)),
                params={k: v.clone() for k, v in runner.model.state_dict().items()},
            )
        return out
    finally:
        torch.set_num_threads(before)


def test_probe_leaves_the_detector_bitwise_unchanged(runs: dict[str, Any]) -> None:
    a, b = runs["with_probe"], runs["without_probe"]
    assert len(a["recorder"].losses) == 20
    assert a["recorder"].losses == b["recorder"].losses  # every loss term, every iteration
    assert a["params"].keys() == b["params"].keys()
    for key, value in a["params"].items():
        assert torch.equal(value, b["params"][key]), key
    for run in (a, b):
        assert run["hooks"][1] == run["hooks"][0]  # no hook left on the detector


def test_probe_trains_draws_and_reports_map(runs: dict[str, Any]) -> None:
    run = runs["with_probe"]
    runner, work = run["runner"], run["work"]
    hook = _probe_hook(runner)
    assert hook.steps == 20
    losses = runner.message_hub.get_scalar("train/cam_probe_loss").data[0]
    assert len(losses) == 20
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    print(f"probe loss: first 5 iterations {first:.3f}, last 5 {last:.3f}")
    assert last < first - 0.3
    # the probe's mAP is a validation metric (logged, and usable by save_best)
    metrics = run["recorder"].val_metrics[-1]
    print(f"probe mAP {metrics['cam_probe/mAP']:.3f}, detector {metrics['pascal_voc/mAP']:.3f}")
    assert 0.0 < metrics["cam_probe/mAP"] <= 1.0
    assert "pascal_voc/mAP" in metrics
    # overlays: 2 images per val batch, 2 batches, through the visualizer; the strip is the
    # original 96x96 image (rescaled from the 128x128 network input) and one overlay per class
    pictures = sorted(glob.glob(str(work / "*" / "vis_data" / "vis_image" / "cam_probe_val_*.png")))
    assert len(pictures) == 4
    from PIL import Image

    for path in pictures:
        w, h = Image.open(path).size
        assert h == 2 * 96 and (w + 2) % (2 * 96 + 2) == 0 and w > 2 * 96  # x2 for display
    # the probe has its own files; the detector's checkpoints hold no probe weights
    files = sorted(os.listdir(work / "cam_probe"))
    assert files == ["iter_10.pth", "iter_20.pth"]
    state = torch.load(work / "cam_probe" / "iter_20.pth", weights_only=False)
    torch.testing.assert_close(state["state_dict"]["fc.weight"], hook.probe.fc.weight.detach())
    ckpt = torch.load(work / "iter_20.pth", weights_only=False)
    assert not any("probe" in k for k in ckpt["state_dict"])
    assert set(ckpt) <= {"meta", "state_dict", "optimizer", "message_hub", "param_schedulers"}


def test_resume_restores_the_probe(runs: dict[str, Any], tmp_path: Path) -> None:
    src = runs["with_probe"]["work"]
    saved = torch.load(src / "cam_probe" / "iter_10.pth", weights_only=False)
    work = tmp_path / "resumed"
    work.mkdir()
    (work / "cam_probe").mkdir()
    for name in ("iter_10.pth",):
        (work / name).write_bytes((src / name).read_bytes())
        (work / "cam_probe" / name).write_bytes((src / "cam_probe" / name).read_bytes())
    cfg = _config(
        work,
        "resume = True\nload_from = " + repr(str(work / "iter_10.pth")) + "\n"
        "train_cfg.update(max_iters=12, val_interval=100)",
    )
    runner, recorder = _train(cfg)
    hook = _probe_hook(runner)
    assert hook.loaded_from == osp.join(str(work), "cam_probe", "iter_10.pth")
    assert recorder.probe_at_start is not None
    for key, value in saved["state_dict"].items():
        assert torch.equal(recorder.probe_at_start[key], value), key
    assert hook.steps == saved["meta"]["steps"] + 2 == 12
    assert len(recorder.losses) == 2


def test_test_run_loads_the_probe_and_reproduces_its_map(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    """A test-only run from the iteration-20 checkpoint finds the probe file next to it,
    draws at test time, and scores exactly the mAP the training run's validation did."""
    src = runs["with_probe"]["work"]
    cfg = _config(tmp_path / "test_only", "load_from = " + repr(str(src / "iter_20.pth")))
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    hook = _probe_hook(runner)
    assert hook.loaded_from == str(src / "cam_probe" / "iter_20.pth")
    assert (
        metrics["cam_probe/mAP"] == runs["with_probe"]["recorder"].val_metrics[-1]["cam_probe/mAP"]
    )
    pictures = glob.glob(str(tmp_path / "test_only" / "*" / "vis_data" / "vis_image" / "*.png"))
    assert len(pictures) == 4 and all("cam_probe_test_" in p for p in pictures)
    assert cp.count_hooks(runner.model) == 0
    assert not isinstance(runner._train_loop, BaseLoop)  # the hook built no train loop


class _Boom(Hook):
    """Makes the detector's forward raise in iteration ``at`` (like an out-of-memory error
    inside the neck)."""

    priority = "LOWEST"

    def __init__(self, at: int) -> None:
        self.at = at
        self.handle: Any = None

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        if runner.iter == self.at:

            def boom(module: Any, args: Any, output: Any) -> None:
                raise RuntimeError("boom inside the neck")

            self.handle = runner.model.neck.register_forward_hook(boom)


def test_no_hook_survives_a_forward_that_raises(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "boom", "train_cfg.update(max_iters=4)")
    runner = Runner.from_cfg(cfg)
    boom = _Boom(at=2)
    runner.register_hook(boom)
    with pytest.raises(RuntimeError, match="boom inside the neck"):
        runner.train()
    boom.handle.remove()
    assert cp.count_hooks(runner.model) == 0
    assert _probe_hook(runner).steps == 2


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("probe.update(feature='neckk')", r"no submodule 'neckk' \(did you mean 'neck'\?\)"),
        ("probe.update(index=7)", r"returns 4 outputs.*index=7 does not exist"),
        ("probe.update(feature='bbox_head')", "never runs"),
        (
            "model = dict(backbone=dict(_delete_=True, type='SwinTransformer', embed_dims=32, "
            "depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4, out_indices=(1, 2, 3)),"
            " neck=dict(in_channels=[64, 128, 256], start_level=0))\n"
            "probe.update(feature='backbone.stages.1', index=0)",
            "not a 4-D",
        ),
        (
            "train_dataloader = dict(dataset=dict(pipeline=[dict(type='PackDetInputs')]))",
            "no gt_instances.labels",
        ),
        (
            "train_dataloader = dict(dataset=dict(with_annotations=False))",
            "no labelled instances",
        ),
    ],
    ids=["no-such-module", "no-such-level", "not-in-features", "tokens", "no-labels", "empty"],
)
def test_bad_setups_fail_before_the_first_iteration(tmp_path: Path, body: str, match: str) -> None:
    cfg = _config(tmp_path / "bad", body + "\ncustom_hooks = [probe]")
    runner = Runner.from_cfg(cfg)
    recorder = Recorder()
    runner.register_hook(recorder)
    with pytest.raises(CAMInputError, match=match):
        runner.train()
    assert recorder.losses == []  # nothing of the user's training ran
    assert cp.count_hooks(runner.model) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(intervall=3), r"'intervall' \(did you mean 'interval'\?\)"),
        (dict(optimizer=dict(lr=0.1)), "with a 'type'"),
        (dict(feature="backbone/layer3"), "dotted name"),
        (dict(index=1.5), "index must be"),
        (dict(max_keep=0), "max_keep"),
    ],
)
def test_bad_hook_options_fail_when_the_hook_is_built(kwargs: dict, match: str) -> None:
    from mmengine.registry import HOOKS

    with pytest.raises(CAMInputError, match=match):
        HOOKS.build(dict(type="CAMProbeHook", **kwargs))


# ----------------------------------------------------------------------------- registration


def test_importing_mmdet_registers_only_its_own_face() -> None:
    """``import cam_plugin.integrations.mmdet`` registers the probe hook and the detection
    digits set, not the mmengine face (visualization hook, metric, classification digits)
    unless that is imported too (as a config's custom_imports would)."""
    script = textwrap.dedent(
        """
        import json
        from mmengine.registry import DATASETS, HOOKS, METRICS

        def names():
            return dict(hooks=sorted(HOOKS.module_dict), metrics=sorted(METRICS.module_dict),
                        datasets=sorted(DATASETS.module_dict))

        import cam_plugin.integrations.mmdet
        mmdet_only = names()
        import cam_plugin.integrations.mmengine
        print(json.dumps(dict(mmdet_only=mmdet_only, both=names())))
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    only, both = info["mmdet_only"], info["both"]
    assert "CAMProbeHook" in only["hooks"] and "ClutteredDigitsDetection" in only["datasets"]
    assert "CAMVisualizationHook" not in only["hooks"]
    assert "CAMLocalizationMetric" not in only["metrics"]
    assert "ClutteredDigitsDataset" not in only["datasets"]
    assert "CAMVisualizationHook" in both["hooks"] and "CAMLocalizationMetric" in both["metrics"]
    assert "ClutteredDigitsDataset" in both["datasets"]
