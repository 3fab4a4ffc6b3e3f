"""Reliability of the core (issue 11): thread-safe capture, no forward of the user's model
outside a user's call, and the smaller input gaps. Torch-only models."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers import Counted, TinyCNN, images, randomize_head
from torch import nn

import cam_plugin as cp


class SlowCNN(TinyCNN):
    """TinyCNN whose forward yields the GIL between its stages, so concurrent forwards on
    one shared model interleave at the feature module on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        threading.Event().wait(0.0005)
        return self.fc(torch.flatten(self.pool(f), 1))


def _shared_model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_head(SlowCNN(num_classes=5)).eval()


def _run_threads(n: int, work) -> list[BaseException]:  # type: ignore[no-untyped-def]
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def runner(i: int) -> None:
        try:
            start.wait()
            work(i)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("verify", [True, False])
def test_concurrent_calls_on_one_model_get_their_own_maps(verify: bool) -> None:
    model = _shared_model()
    inputs = [images(2, 16, seed=s) for s in range(4)]
    reference = [cp.CAM(model)(x, targets="all").maps for x in inputs]
    cam = cp.CAM(model, verify=verify)
    cam(inputs[0])  # resolved
    wrong: list[int] = []

    def work(i: int) -> None:
        for _ in range(150):
            res = cam(inputs[i], targets="all")
            if not torch.allclose(res.maps, reference[i], atol=1e-5, rtol=1e-5):
                wrong.append(i)

    errors = _run_threads(4, work)
    assert not errors, errors[:3]
    assert not wrong, f"{len(wrong)} of 600 maps belonged to another thread's image"
    assert cp.count_hooks(model) == 0


def test_first_calls_racing_on_an_unresolved_cam() -> None:
    model = _shared_model()
    inputs = [images(2, 16, seed=s) for s in range(3)]
    reference = [cp.CAM(model)(x, targets="all").maps for x in inputs]
    for _ in range(10):
        cam = cp.CAM(model)  # every thread's first call resolves from its own forward
        results: dict[int, torch.Tensor] = {}

        def work(i: int, cam: cp.CAM = cam, results: dict = results) -> None:
            results[i] = cam(inputs[i], targets="all").maps

        assert not _run_threads(3, work)
        for i in range(3):
            torch.testing.assert_close(results[i], reference[i])
    assert cp.count_hooks(model) == 0


def test_constructions_racing_a_running_forward() -> None:
    model = _shared_model()
    x = images(2, 16)
    reference = cp.CAM(model)(x, targets="all").maps
    stop = threading.Event()

    def busy() -> None:
        with torch.no_grad():
            while not stop.is_set():
                model(images(3, 24, seed=7))

    runner = threading.Thread(target=busy)
    runner.start()
    try:
        for _ in range(20):
            torch.testing.assert_close(cp.CAM(model)(x, targets="all").maps, reference)
            adapter = cp.resolve(model, example=x)
            assert adapter.feature_module is model.features
    finally:
        stop.set()
        runner.join()
    assert cp.count_hooks(model) == 0


def test_user_hooks_fire_once_per_call_and_never_at_construction() -> None:
    """The timm ResNet variant lives in tests/integrations/test_timm.py."""
    model = _shared_model()
    size = 16
    counted = Counted(model)
    try:
        cam = cp.CAM(model)
        assert counted.counts() == (0, 0, 0), "the model ran at construction"
        for call in range(1, 4):
            res = cam(images(2, size))
            assert counted.counts() == (call, call, call)
        assert res.maps.shape[:2] == (2, 1)
        logits = model(images(2, size))  # the user's own call, for the logits
        torch.testing.assert_close(res.logits, logits)
    finally:
        counted.remove()


def test_explicit_resolve_runs_the_users_example_once() -> None:
    model = _shared_model()
    counted = Counted(model)
    try:
        cam = cp.CAM(model)
        with pytest.raises(cp.CAMInputError, match="first forward"):
            cam.adapter  # noqa: B018 - not resolved yet
        adapter = cam.resolve(example=images(1, 16))
        assert counted.counts() == (1, 1, 1)
        assert cam.adapter is adapter and adapter.feature_module is model.features
        cam(images(2, 16))
        assert counted.counts() == (2, 2, 2)
    finally:
        counted.remove()


def test_input_size_follows_the_real_input() -> None:
    """Odd, non-square sizes resolve from the call itself (no guessed 224 x 224 probe)."""
    model = _shared_model()
    x = images(1, 16)[:, :, :13, :]
    res = cp.CAM(model)(x, targets="all")
    assert res.input_size == (13, 16)
    scale = max(1.0, float(res.logits.abs().max()))
    assert float(res.identity_residual().abs().max()) <= 1e-4 * scale


# -- the smaller gaps ----------------------------------------------------------------------
@pytest.fixture
def cam_and_x() -> tuple[cp.CAM, torch.Tensor]:
    model = _shared_model()
    return cp.CAM(model), images(2, 16)


def test_negative_class_inside_per_image_lists_is_refused(cam_and_x) -> None:  # type: ignore[no-untyped-def]
    cam, x = cam_and_x
    with pytest.raises(cp.CAMInputError, match=r"targets\[0\]\[0\] is -5"):
        cam(x, targets=[[-5, 3], [2]])
    with pytest.raises(cp.CAMInputError, match="out of range"):
        cam(x, targets=-1)


def test_targets_nested_three_deep_are_refused(cam_and_x) -> None:  # type: ignore[no-untyped-def]
    cam, x = cam_and_x
    with pytest.raises(cp.CAMInputError, match="no deeper nesting"):
        cam(x, targets=[[[1, 2]], [3]])


def test_numpy_integer_targets_are_accepted(cam_and_x) -> None:  # type: ignore[no-untyped-def]
    cam, x = cam_and_x
    ref = cam(x, targets=[[1, 3], [2, 0]])
    for targets in (
        [[np.int64(1), np.int32(3)], [np.int16(2), np.uint8(0)]],
        np.array([[1, 3], [2, 0]]),
        [np.array([1, 3]), np.array([2, 0])],
    ):
        res = cam(x, targets=targets)
        torch.testing.assert_close(res.maps, ref.maps)
        assert res.classes.tolist() == [[1, 3], [2, 0]]
    single = cam(x, targets=np.int64(4))
    assert single.classes.tolist() == [[4], [4]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtype_other_than_the_models_is_refused(cam_and_x, dtype) -> None:  # type: ignore[no-untyped-def]
    cam, x = cam_and_x
    with pytest.raises(cp.CAMInputError, match=f"{dtype}.*float32"):
        cam(x.to(dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_input_on_another_device_is_refused(cam_and_x) -> None:  # type: ignore[no-untyped-def]
    cam, x = cam_and_x
    with pytest.raises(cp.CAMInputError, match="move them"):
        cam(x.cuda())


def test_meta_device_input_is_refused(cam_and_x) -> None:  # type: ignore[no-untyped-def]
    """Another device than the model's (meta stands in for one on a CPU-only machine)."""
    cam, x = cam_and_x
    with pytest.raises(cp.CAMInputError, match="move them"):
        cam(torch.empty(x.shape, device="meta"))


def _live_tensors() -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_no_tensor_outlives_a_call() -> None:
    model = _shared_model()
    cam = cp.CAM(model)
    x = images(2, 16)
    for _ in range(5):
        cam(x, targets="all")
    before = _live_tensors()
    for _ in range(200):
        cam(x, targets="all")
    assert _live_tensors() == before
