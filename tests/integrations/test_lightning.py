"""CAMCallback in real Lightning runs: a small LightningModule on the cluttered digits.

* the run is not changed: losses, parameters and RNG states bitwise equal with and without
  the callback over a short ``Trainer.fit`` under ``inference_mode=True``;
* pictures written by the CSV logger (PNG files) and the TensorBoard logger (image events);
  WSOL metrics logged per epoch;
* the classifier found on the module itself or on a child, or named; a clear error listing
  the candidates when none gives an exact CAM; no hook left after an error in the step;
* 2-process DDP (gloo, CPU, forked): only rank 0 draws, metrics merged by sample id.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")
pytest.importorskip("sklearn")

import cam_plugin.integrations.lightning as cam_lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
from cam_plugin.integrations.lightning import (  # noqa: E402
    CAMCallback,
    PictureStyle,
    batch_boxes,
    batch_labels,
    batch_sample_ids,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402

from cam_plugin import CAM, AdapterNotFoundError, CAMInputError, CAMResult, count_hooks  # noqa: E402
from cam_plugin.data import ClutteredDigits, collate_wsol  # noqa: E402

DIGITS: dict[str, Any] = {"canvas_size": 32, "digit_size": (12, 20)}


class Net(nn.Module):
    """conv features -> global average pool -> linear (an exact CAM), or an MLP head."""

    def __init__(self, mlp_head: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = (
            nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
            if mlp_head
            else nn.Linear(16, 10)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class DigitsModule(pl.LightningModule):
    """Dict batches of ClutteredDigits; ``forward`` is the classifier. Records every loss."""

    def __init__(self, mlp_head: bool = False, fail_in_validation: bool = False) -> None:
        super().__init__()
        self.net = Net(mlp_head)
        self.fail_in_validation = fail_in_validation
        self.losses: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(F.dropout(self(batch["image"]), 0.2), batch["label"])
        self.losses.append(loss.detach().clone())
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = F.cross_entropy(self(batch["image"]), batch["label"])
        if self.fail_in_validation:
            raise RuntimeError("validation_step failed on purpose")
        self.losses.append(loss.clone())
        self.log("val_loss", loss, batch_size=len(batch["label"]))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class TupleModule(pl.LightningModule):
    """``(images, labels)`` batches; the step calls the child ``model`` directly (its own
    ``forward`` never runs), and a loss module is its first child."""

    def __init__(self) -> None:
        super().__init__()
        self.criterion = nn.CrossEntropyLoss()
        self.model = Net()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.log("val_loss", self.criterion(self.model(images), labels))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)


def _loaders(n_train: int = 32, n_val: int = 16, batch: int = 8) -> tuple[DataLoader, DataLoader]:
    train = ClutteredDigits("train", n_train, **DIGITS)
    val = ClutteredDigits("test", n_val, **DIGITS)
    return (
        DataLoader(train, batch_size=batch, shuffle=True, collate_fn=collate_wsol),
        DataLoader(val, batch_size=batch, collate_fn=collate_wsol),
    )


def _tuple_loader(n: int = 8) -> DataLoader:
    data = ClutteredDigits("test", n, **DIGITS)
    images = torch.stack([data[i]["image"] for i in range(n)])
    labels = torch.tensor([data[i]["label"] for i in range(n)])
    return DataLoader(TensorDataset(images, labels), batch_size=4)


def _trainer(root: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", CSVLogger(root))
    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
        **kwargs,
    )


def _fit(root: Path, callback: CAMCallback | None) -> tuple[DigitsModule, pl.Trainer, tuple]:
    pl.seed_everything(0)
    module = DigitsModule()
    train, val = _loaders()
    loggers = [CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tb")]
    trainer = _trainer(
        root, [callback] if callback else [], logger=loggers, max_epochs=2, inference_mode=True
    )
    trainer.fit(module, train, val)
    numpy_state: Any = np.random.get_state()
    rngs = (torch.get_rng_state(), numpy_state[1].copy(), random.getstate())
    return module, trainer, rngs


def test_the_run_is_unchanged_and_pictures_and_metrics_are_logged(tmp_path: Path) -> None:
    plain, _, plain_rngs = _fit(tmp_path / "plain", None)
    callback = CAMCallback(every_n_batches=1, max_images=4)
    module, trainer, rngs = _fit(tmp_path / "cam", callback)

    # bitwise: every training and validation loss, every parameter and buffer, the RNGs
    assert len(module.losses) == len(plain.losses) == 2 * 4 + 2 * 2 + 2  # + sanity steps
    assert all(torch.equal(a, b) for a, b in zip(module.losses, plain.losses))
    for (name, a), (_, b) in zip(module.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(rngs[0], plain_rngs[0])
    assert np.array_equal(rngs[1], plain_rngs[1]) and rngs[2] == plain_rngs[2]
    assert count_hooks(module) == count_hooks(plain) and not callback.installed

    # the classifier is the module itself, resolved from its own validation forward
    assert callback.classifier.module is module and callback.adapter is not None
    assert callback.adapter.feature_module is module.net.features

    # pictures: 2 epochs x 2 val batches, no picture for the sanity-check batches
    pngs = sorted(p.name for p in (tmp_path / "cam" / "csv").rglob("cam_images/*.png"))
    assert pngs == [
        "val_epoch0_step4_batch0.png",
        "val_epoch0_step4_batch1.png",
        "val_epoch1_step8_batch0.png",
        "val_epoch1_step8_batch1.png",
    ]
    from PIL import Image

    width, height = Image.open(next((tmp_path / "cam" / "csv").rglob("*.png"))).size
    assert height == 128 and width == 4 * 128 + 3 * 2  # 4 images enlarged x4, 2 px gaps

    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )

    events = event_accumulator.EventAccumulator(
        str(next((tmp_path / "cam" / "tb").rglob("version_*")))
    )
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["cam_val/batch0", "cam_val/batch1"]
    assert [e.step for e in events.Images("cam_val/batch0")] == [4, 8]

    # WSOL metrics per epoch, every validation sample once
    metrics = trainer.callback_metrics
    assert float(metrics["cam_val/samples"]) == 16
    for key in ("MaxBoxAcc", "MaxBoxAccV2", "GT-known_Loc", "Top-1_Loc", "Top-1_Cls"):
        assert 0 <= float(metrics[f"cam_val/{key}"]) <= 100
    csv = next((tmp_path / "cam" / "csv").rglob("metrics.csv")).read_text().splitlines()
    assert "cam_val/MaxBoxAccV2" in csv[0].split(",") and len(csv) == 1 + 2


def test_classifier_is_a_child_when_the_module_forward_does_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[tuple[Tensor, CAMResult]] = []
    draw = PictureStyle.draw

    def spy(self: PictureStyle, images: Tensor, shown: CAMResult, *args: Any) -> np.ndarray:
        drawn.append((images.clone(), shown))
        return draw(self, images, shown, *args)

    monkeypatch.setattr(PictureStyle, "draw", spy)
    module = TupleModule().eval()
    callback = CAMCallback(max_images=2)
    trainer = _trainer(tmp_path, [callback], inference_mode=True)
    trainer.validate(module, _tuple_loader(), verbose=False)
    assert callback.classifier.module is module.model and callback.classifier.name == "model"
    assert count_hooks(module) == 0
    # the maps are those of cam_plugin.CAM on the same images (top-1, upsampled, normalized)
    assert len(drawn) == 2
    with CAM(module.model) as cam:
        for images, shown in drawn:
            expected = cam(images).upsample().normalize()
            assert torch.equal(expected.classes, shown.classes)
            torch.testing.assert_close(expected.maps, shown.maps, rtol=1e-5, atol=1e-5)
    # no boxes in (images, labels) batches: pictures, no metrics
    assert len(list(tmp_path.rglob("cam_images/val_*.png"))) == 2
    assert not any(k.startswith("cam_") for k in trainer.callback_metrics)
    # the test loop too, with ground-truth targets and the classifier named
    named = CAMCallback("model", targets="gt", every_n_batches=2)
    trainer = _trainer(tmp_path / "test", [named], inference_mode=False)
    trainer.test(module, _tuple_loader(), verbose=False)
    assert named.classifier.module is module.model
    assert len(list((tmp_path / "test").rglob("cam_images/test_*.png"))) == 1


def test_no_exact_classifier_is_a_clear_error_and_leaves_no_hook(tmp_path: Path) -> None:
    module = DigitsModule(mlp_head=True)
    _, val = _loaders(n_val=8)
    trainer = _trainer(tmp_path, [CAMCallback()], num_sanity_val_steps=0)
    with pytest.raises(AdapterNotFoundError) as info:
        trainer.validate(module, val, verbose=False)
    message = str(info.value)
    assert "<the LightningModule>" in message and "net:" in message
    assert "classifier=" in message
    assert count_hooks(module) == 0


def test_hooks_are_removed_when_the_step_raises(tmp_path: Path) -> None:
    module = DigitsModule(fail_in_validation=True)
    callback = CAMCallback()
    _, val = _loaders(n_val=8)
    trainer = _trainer(tmp_path, [callback])
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer.validate(module, val, verbose=False)
    assert count_hooks(module) == 0 and not callback.installed


def test_mixed_precision_forward_is_checked_to_its_precision(tmp_path: Path) -> None:
    _, val = _loaders(n_val=8)
    trainer = _trainer(tmp_path, [CAMCallback()], precision="bf16-mixed")
    trainer.validate(DigitsModule(), val, verbose=False)
    assert float(trainer.callback_metrics["cam_val/samples"]) == 8
    assert len(list(tmp_path.rglob("cam_images/val_*.png"))) == 1


def test_batch_readers_and_options() -> None:
    images, labels = torch.zeros(2, 3, 8, 8), torch.tensor([1, 2])
    boxes = [torch.tensor([[0, 0, 3, 3]]), torch.tensor([[1, 1, 4, 4], [0, 0, 1, 1]])]
    assert batch_labels((images, labels)) is labels and batch_boxes((images, labels)) is None
    assert batch_boxes((images, labels, boxes)) is boxes and batch_sample_ids((images,)) is None
    sample = {"image": images, "label": labels, "boxes": boxes, "index": torch.tensor([5, 9])}
    assert batch_labels(sample) is labels and batch_boxes(sample) is boxes
    assert batch_sample_ids(sample) == [5, 9]
    assert batch_labels({"labels": [torch.tensor([1])]}) is None  # per-box labels only
    for bad in ({"every_n_batches": 0}, {"targets": "top"}, {"threshold": 2.0}, {"labels": 3}):
        with pytest.raises(CAMInputError):
            CAMCallback(**bad)
    with pytest.raises(CAMInputError):
        CAMCallback(metric_options={"fixed_rule": "nope"})


def test_ddp_only_rank_zero_draws_and_metrics_merge_by_sample_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.distributed.is_available() or pytest.skip("torch.distributed is not available")
    marks = tmp_path / "drawn"
    marks.mkdir()
    original = cam_lightning.log_picture

    def spy(trainer: pl.Trainer, tag: str, stem: str, picture: np.ndarray) -> list[str]:
        (marks / f"rank{trainer.global_rank}_{stem}").touch()
        return original(trainer, tag, stem, picture)

    monkeypatch.setattr(cam_lightning, "log_picture", spy)  # seen by the forked ranks
    pl.seed_everything(0)
    train, _ = _loaders(n_train=16, batch=4)
    val = DataLoader(ClutteredDigits("test", 7, **DIGITS), batch_size=2, collate_fn=collate_wsol)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path),
        callbacks=[CAMCallback()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(DigitsModule(), train, val)
    # 7 samples over 2 ranks: each rank runs 2 batches of 2 (one sample padded twice)
    assert sorted(p.name for p in marks.iterdir()) == [
        "rank0_val_epoch0_step2_batch0",
        "rank0_val_epoch0_step2_batch1",
    ]
    assert len(list(tmp_path.rglob("cam_images/*.png"))) == 2
    assert float(trainer.callback_metrics["cam_val/samples"]) == 7
