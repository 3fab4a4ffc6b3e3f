"""CAM in real mmengine runs: an mmpretrain ResNet trained on cluttered digits from a config
file on disk, with ``CAMVisualizationHook`` and ``CAMLocalizationMetric``.

One seeded two-epoch run (module fixture) is shared; the other tests add a run without the
hook (bitwise comparison), validation-only runs on its checkpoint (bf16 autocast, one vs two
processes under ``torchrun``), a process that never imports cam-plugin, and bad configs.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mmpretrain.models  # noqa: F401  (registers mmpretrain's modules)
import numpy as np
import pytest
import torch
from cam_plugin.integrations.configs import config_path
from cam_plugin.integrations.mmengine import CAMVisualizationHook
from mmengine.config import Config
from mmengine.dataset import default_collate
from mmengine.registry import DATASETS, HOOKS, METRICS, TRANSFORMS, DefaultScope
from mmengine.runner import Runner
from mmpretrain.registry import MODELS
from PIL import Image

import cam_plugin as cp
from cam_plugin.errors import CAMInputError

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # mmengine checkpoints, torch>=2.6
TESTS = Path(__file__).parent
CANVAS = 48
VAL_LENGTH = 37  # odd: a two-process sampler pads one sample
CAM_KEYS = ("cam/MaxBoxAccV2", "cam/GT-known_Loc", "cam/Top-1_Loc")

BASE = """
_base_ = [{base!r}]
model = dict(backbone=dict(stem_channels=16, base_channels=16), head={head})
train_dataloader = dict(batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(length=64, canvas_size={canvas}, digit_size=(16, 28)))
val_dataloader = dict(batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(length={val_length}, canvas_size={canvas}, digit_size=(16, 28),
                 pipeline={val_pipeline}))
test_dataloader = val_dataloader
train_cfg = dict(max_epochs={epochs})
param_scheduler = [dict(type="CosineAnnealingLR", T_max=2, by_epoch=True, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={epochs}))
custom_hooks = {hooks}
val_evaluator = {evaluator}
test_evaluator = val_evaluator
work_dir = {work_dir!r}
experiment_name = {name!r}
"""
HOOK = dict(type="CAMVisualizationHook", interval=1, max_samples=6, topk=2, target="pred")
PACK = [dict(type="PackInputs", algorithm_keys=("gt_bboxes", "gt_bboxes_labels"))]


def write_config(
    path: Path,
    *,
    hooks: list[dict] | None = None,
    metric: bool = True,
    dump: Path | None = None,
    head: dict | None = None,
    val_pipeline: list[dict] | None = None,
    epochs: int = 2,
    extra: str = "",
) -> Path:
    evaluator: list[dict] = [dict(type="Accuracy", topk=(1,))]
    if metric:
        evaluator.append(dict(type="CAMLocalizationMetric"))
    if dump is not None:
        evaluator.append(dict(type="DumpResults", out_file_path=str(dump)))
    text = BASE.format(
        base=config_path("mmpretrain_resnet_digits"),
        head=repr(head or dict(in_channels=128)),
        canvas=CANVAS,
        val_length=VAL_LENGTH,
        val_pipeline=repr(val_pipeline or PACK),
        epochs=epochs,
        hooks=repr([HOOK] if hooks is None else hooks),
        evaluator=repr(evaluator),
        work_dir=str(path.with_suffix("")),
        name=f"{path.stem}_{uuid.uuid4().hex[:8]}",  # own MessageHub / Visualizer instances
    )
    path.write_text(text + extra)
    return path


def runner_for(config: Path, **overrides: Any) -> Runner:
    cfg = Config.fromfile(str(config))
    for key, value in overrides.items():
        cfg[key] = value
    return Runner.from_cfg(cfg)


def cam_hook(runner: Runner) -> CAMVisualizationHook:
    return next(h for h in runner.hooks if isinstance(h, CAMVisualizationHook))


def pngs(work_dir: Path) -> list[Path]:
    return sorted(work_dir.glob("*/vis_data/vis_image/*.png"))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Runs here are small: one thread each avoids oversubscribing a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two seeded epochs with the hook and the metric, from a config file on disk."""
    root = tmp_path_factory.mktemp("mm")
    config = write_config(root / "with_cam.py", dump=root / "preds_with.pkl")
    runner = runner_for(config)
    model = runner.model
    hooks_before = cp.count_hooks(model)
    runner.train()
    return dict(
        root=root,
        config=config,
        work_dir=root / "with_cam",
        checkpoint=root / "with_cam" / "epoch_2.pth",
        losses=runner.message_hub.get_scalar("train/loss").data[0].copy(),
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        preds=pickle.loads((root / "preds_with.pkl").read_bytes()),
        hooks_before=hooks_before,
        hooks_after=cp.count_hooks(model),
        hook=cam_hook(runner),
    )


def read_scalars(work_dir: Path) -> list[dict[str, Any]]:
    (path,) = work_dir.glob("*/vis_data/scalars.json")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_draws_overlays_and_logs_localization_scores(digits_run: dict[str, Any]) -> None:
    work_dir = digits_run["work_dir"]
    files = pngs(work_dir)
    # 2 validations x 6 samples x top-2 maps, named cam_val_<sample_idx>_pred<j>_<iter>
    assert len(files) == 2 * 6 * 2, [f.name for f in files]
    for f in files:
        assert re.fullmatch(r"cam_val_\d+_pred[12]_\d+\.png", f.name), f.name
        with Image.open(f) as img:
            assert img.size == (CANVAS, CANVAS) and img.mode == "RGB"
            arr = np.asarray(img)
        assert arr.std() > 5  # a picture, not a blank
    vals = [s for s in read_scalars(work_dir) if "cam/MaxBoxAccV2" in s]
    assert len(vals) == 2  # one per validation
    for scores in vals:
        for key in (*CAM_KEYS, "cam/MaxBoxAcc", "cam/MaxBoxAccV2@50", "cam/Top-1_Cls"):
            assert 0.0 <= scores[key] <= 100.0, (key, scores[key])
        assert scores["cam/GT-known_Loc"] >= scores["cam/Top-1_Loc"]
        assert scores["cam/Top-1_Cls"] == pytest.approx(scores["accuracy/top1"], abs=1e-4)
        assert 0.0 <= scores["cam/best_threshold"] < 1.0
    # the hooks lived only during the validation epochs
    assert digits_run["hooks_after"] == digits_run["hooks_before"]
    assert not digits_run["hook"].installed and digits_run["hook"].disabled_reason is None


def test_maps_in_the_samples_are_the_exact_cam(digits_run: dict[str, Any]) -> None:
    """The ``cam_maps`` the hook attached equal ``cam_plugin.CAM`` on the preprocessed batch."""
    cfg = Config.fromfile(str(digits_run["config"]))
    with DefaultScope.overwrite_default_scope("mmpretrain"):
        model = MODELS.build(cfg.model)
    model.load_state_dict(torch.load(digits_run["checkpoint"])["state_dict"])
    model.eval()
    dataset = DATASETS.build(cfg.val_dataloader.dataset)
    batch = model.data_preprocessor(default_collate([dataset[i] for i in range(8)]), False)
    preds = sorted(digits_run["preds"], key=lambda p: p["sample_idx"])[:8]
    targets = [p["cam_maps"]["classes"].tolist() for p in preds]
    with cp.CAM(model) as cam:
        res = cam(batch["inputs"], targets=targets)
    for i, p in enumerate(preds):
        maps = p["cam_maps"]["maps"]
        assert p["cam_maps"]["input_shape"] == (CANVAS, CANVAS)
        assert maps.dtype == torch.float32 and maps.shape == (len(targets[i]), 6, 6)
        torch.testing.assert_close(maps, res.maps[i, : len(targets[i])], rtol=1e-4, atol=1e-4)
        # targets first (top-2 by the model's own scores), then the ground-truth class
        top2 = p["pred_score"].topk(2).indices.tolist()
        assert targets[i][:2] == top2 and int(p["gt_label"][0]) in targets[i]
        assert p["cam_maps"]["num_targets"] == 2


def test_hook_leaves_the_host_untouched(digits_run: dict[str, Any], tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "plain.py", hooks=[], metric=False, dump=tmp_path / "preds_plain.pkl"
    )
    runner = runner_for(config)
    runner.train()
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    assert losses.shape == digits_run["losses"].shape == (8,)
    assert np.array_equal(losses, digits_run["losses"])  # bitwise, every iteration
    state = runner.model.state_dict()
    assert state.keys() == digits_run["state"].keys()
    for key, value in state.items():
        assert torch.equal(value, digits_run["state"][key]), key
    plain = sorted(
        pickle.loads((tmp_path / "preds_plain.pkl").read_bytes()), key=lambda p: p["sample_idx"]
    )
    hooked = sorted(digits_run["preds"], key=lambda p: p["sample_idx"])
    assert len(plain) == len(hooked) == VAL_LENGTH
    for a, b in zip(plain, hooked):
        assert "cam_maps" not in a and "cam_maps" in b
        assert set(b) - set(a) == {"cam_maps"}  # one extra field, nothing else changed
        assert torch.equal(a["pred_score"], b["pred_score"])
        assert torch.equal(a["pred_label"], b["pred_label"])


def test_checkpoint_loads_in_a_process_without_cam_plugin(digits_run: dict[str, Any]) -> None:
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys

        class NoCamPlugin(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "cam_plugin":
                    raise ImportError("cam_plugin is blocked in this process")
                return None

        sys.meta_path.insert(0, NoCamPlugin())
        import torch
        import mmpretrain.models
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmpretrain.registry import MODELS

        cfg = Config.fromfile({str(digits_run["config"])!r}, import_custom_modules=False)
        init_default_scope("mmpretrain")
        model = MODELS.build(cfg.model)
        ckpt = torch.load({str(digits_run["checkpoint"])!r}, map_location="cpu")
        model.load_state_dict(ckpt["state_dict"], strict=True)
        print(json.dumps(dict(
            keys=sorted(ckpt), state=sorted(ckpt["state_dict"]),
            model=sorted(model.state_dict()),
            plugin=[m for m in sys.modules if m.startswith("cam_plugin")])))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["plugin"] == []
    assert info["state"] == info["model"] == sorted(digits_run["state"])
    assert not any("cam" in key.lower() for key in info["state"] + info["keys"])


def test_two_processes_give_the_same_scores_as_one(
    digits_run: dict[str, Any], tmp_path: Path
) -> None:
    out_json = tmp_path / "dist.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(TESTS / "mm_dist_worker.py"),
        str(digits_run["config"]),
        str(tmp_path / "dist"),
        str(digits_run["checkpoint"]),
        str(out_json),
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    result = json.loads(out_json.read_text())
    assert result["world_size"] == 2
    assert result["train_wrapper"] == result["val_wrapper"] == "MMDistributedDataParallel"
    assert set(CAM_KEYS) <= {k.removeprefix("val/") for k in result["train_metrics"]}
    # only rank 0 draws: its shard of an unshuffled DefaultSampler is the even indices
    for phase, runs in (("train", 2), ("val", 1)):
        files = pngs(tmp_path / "dist" / phase)
        assert len(files) == runs * 6 * 2, [f.name for f in files]
        ids = {int(f.name.split("_")[2]) for f in files}
        assert all(i % 2 == 0 for i in ids), ids
    # the same checkpoint, validated in one process
    config = digits_run["config"]
    single = runner_for(
        config, load_from=str(digits_run["checkpoint"]), work_dir=str(tmp_path / "one")
    )
    metrics_one = single.val()
    metrics_two = result["val_metrics"]
    assert metrics_two.keys() == metrics_one.keys()
    for key, value in metrics_one.items():
        assert metrics_two[key] == pytest.approx(float(value), abs=1e-6), key
    last = [s for s in read_scalars(digits_run["work_dir"]) if "cam/MaxBoxAccV2" in s][-1]
    assert metrics_one["cam/MaxBoxAccV2"] == pytest.approx(last["cam/MaxBoxAccV2"])


def test_bf16_autocast_validation_with_gt_targets(
    digits_run: dict[str, Any], tmp_path: Path
) -> None:
    """CPU autocast (bf16 in mmengine): features are upcast, maps stay fp32 and close to the
    fp32 run's; ``target='gt'`` maps the true class; ``interval=2`` draws batches 0 and 2."""
    hook = dict(type="CAMVisualizationHook", interval=2, max_samples=20, target="gt")
    config = write_config(tmp_path / "bf16.py", hooks=[hook], dump=tmp_path / "preds_bf16.pkl")
    runner = runner_for(config, load_from=str(digits_run["checkpoint"]), val_cfg=dict(fp16=True))
    metrics = runner.val()
    assert cam_hook(runner).disabled_reason is None
    for key in CAM_KEYS:
        assert 0.0 <= metrics[key] <= 100.0
    # batches of 16: batch 0 (samples 0-15) and batch 2 (32-36, 4 left of max_samples=20)
    drawn = sorted(int(f.name.split("_")[2]) for f in pngs(tmp_path / "bf16"))
    assert drawn == [*range(16), *range(32, 36)]
    low = {p["sample_idx"]: p for p in pickle.loads((tmp_path / "preds_bf16.pkl").read_bytes())}
    worst = 0.0
    for p in digits_run["preds"]:
        q = low[p["sample_idx"]]["cam_maps"]
        assert q["classes"].tolist() == p["gt_label"].tolist() and q["num_targets"] == 1
        assert q["maps"].dtype == torch.float32
        ref = p["cam_maps"]["maps"][p["cam_maps"]["classes"] == q["classes"][0]][0]
        err = float((ref - q["maps"][0]).abs().max()) / float(ref.abs().max())
        assert err <= 0.05  # bf16 keeps 8 mantissa bits
        worst = max(worst, err)
    assert worst > 0  # the forward really ran in bf16


def test_unsupported_head_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    head = dict(type="StackedLinearClsHead", num_classes=10, in_channels=128, mid_channels=[32])
    config = write_config(tmp_path / "mlp.py", head=head, epochs=1)
    runner = runner_for(config)
    model = runner.model
    before = cp.count_hooks(model)
    runner.train()
    metrics = runner.val()  # a second validation: still one warning
    assert "accuracy/top1" in metrics and not any(k.startswith("cam/") for k in metrics)
    hook = cam_hook(runner)
    assert hook.disabled_reason is not None and "ReLU" in hook.disabled_reason
    (log,) = (tmp_path / "mlp").glob("*/*.log")
    assert log.read_text().count("CAMVisualizationHook disabled") == 1
    assert pngs(tmp_path / "mlp") == []
    assert cp.count_hooks(model) == before


def test_metric_without_the_hook_says_to_add_it(tmp_path: Path) -> None:
    """The metric reads ``cam_maps`` from the samples (the hook writes it): a run without the
    hook is a clear error, not silently empty scores."""
    config = write_config(tmp_path / "nohook.py", hooks=[], epochs=1)
    runner = runner_for(config)
    with pytest.raises(CAMInputError, match=r"no 'cam_maps'.*CAMVisualizationHook"):
        runner.val()


def test_builds_under_any_default_scope_and_rejects_bad_options() -> None:
    for scope in (None, "mmpretrain", "mmdet", "mmseg"):
        with DefaultScope.overwrite_default_scope(scope):
            assert isinstance(HOOKS.build(dict(type="CAMVisualizationHook")), CAMVisualizationHook)
            metric = METRICS.build(dict(type="CAMLocalizationMetric", fixed_threshold=0.3))
            assert type(metric).__name__ == "CAMLocalizationMetric"
            data = DATASETS.build(
                dict(type="ClutteredDigitsDataset", length=2, canvas_size=32, digit_size=(12, 20))
            )
            info = data.get_data_info(1)
            assert info["img"].shape == (32, 32, 3) and info["img"].dtype == np.uint8
            assert info["gt_bboxes"].shape == (1, 4) and info["sample_idx"] == 1
    bad = [
        (dict(intervl=2), "did you mean 'interval'"),
        (dict(interval=0), "interval must be an int >= 1"),
        (dict(interval=2.5), "interval must be an int >= 1"),
        (dict(topk=0), "topk"),
        (dict(target="label"), "target must be 'pred'"),
        (dict(threshold=1.5), "threshold must be in"),
        (dict(alpha=-0.1), "alpha must be in"),
    ]
    for options, message in bad:
        with pytest.raises(CAMInputError, match=re.escape(message)):
            HOOKS.build(dict(type="CAMVisualizationHook", **options))
    for options, message in [
        (dict(box_fram="ori"), "did you mean 'box_frame'"),
        (dict(box_frame="pixels"), "box_frame"),
        (dict(cam_curve_interval=0.0), "cam_curve_interval"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            METRICS.build(dict(type="CAMLocalizationMetric", **options))


def test_metric_on_a_data_set_without_boxes_fails_before_any_iteration(tmp_path: Path) -> None:
    declared = write_config(tmp_path / "noboxes.py", epochs=1)
    runner = runner_for(
        declared,
        val_dataloader=dict(
            Config.fromfile(str(declared)).val_dataloader,
            dataset=dict(
                type="ClutteredDigitsDataset",
                split="test",
                length=8,
                canvas_size=CANVAS,
                digit_size=(16, 28),
                with_boxes=False,
                pipeline=[dict(type="PackInputs")],
            ),
        ),
    )
    with pytest.raises(CAMInputError, match="with_boxes=False"):
        runner.val()
    # boxes exist but the pipeline drops them: refused in before_run, before any iteration
    dropped = write_config(tmp_path / "dropped.py", val_pipeline=[dict(type="PackInputs")])
    runner = runner_for(dropped)
    with pytest.raises(CAMInputError, match="algorithm_keys"):
        runner.val()
    assert pngs(tmp_path / "dropped") == []


@TRANSFORMS.register_module(name="FailAtSampleForCAMTest", force=True)
class FailAtSample:
    """A transform that raises on one sample, to kill a validation mid-epoch."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, results: dict) -> dict:
        if results["sample_idx"] == self.index:
            raise RuntimeError(f"sample {self.index} is broken")
        return results


def _fail_validation(runner: Runner) -> None:
    with pytest.raises(RuntimeError, match="is broken"):
        runner.val()


def test_hooks_of_a_run_that_died_mid_epoch_are_cleared(tmp_path: Path) -> None:
    pipeline = [dict(type="FailAtSampleForCAMTest", index=20), *PACK]
    config = write_config(tmp_path / "dies.py", val_pipeline=pipeline)
    runner = runner_for(config)
    model = runner.model
    before = cp.count_hooks(model)
    _fail_validation(runner)  # dies in the second batch, after the first was processed
    hook = cam_hook(runner)
    assert hook.installed and cp.count_hooks(model) == before + 3
    hook.before_train_epoch(runner)  # the next call of the hook clears what it installed
    assert not hook.installed and cp.count_hooks(model) == before
    # and when nobody calls it again, its finalizer does
    _fail_validation(runner)
    assert cp.count_hooks(model) == before + 3
    del hook, runner
    gc.collect()
    assert cp.count_hooks(model) == before
