"""cam_plugin.forward: CallRecorder records one thread's forward and leaves no hook;
the resolution request is visible only inside its block and only for its model."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import TinyCNN, images
from torch import nn

import cam_plugin as cp
from cam_plugin.forward import (
    CallRecorder,
    ResolutionRequest,
    current_request,
    resolution_context,
)

# TinyCNN's submodule calls of one forward, in completion order
ORDER = [
    "features.0",
    "features.1",
    "features.2",
    "features.3",
    "features.4",
    "features",
    "pool",
    "fc",
]


def test_records_one_forward_in_completion_order(tiny_cnn: TinyCNN) -> None:
    x = images(2, 8)
    with CallRecorder(tiny_cnn) as rec:
        assert cp.count_hooks(tiny_cnn) == len(ORDER)
        out = tiny_cnn(x)
    assert cp.count_hooks(tiny_cnn) == 0
    trace = rec.trace(x, out)
    assert [c.name for c in trace.calls] == ORDER
    assert [c.leaf for c in trace.calls] == [n != "features" for n in ORDER]
    assert trace.calls[0].inp is x and trace.output is out
    with torch.no_grad():
        feats = tiny_cnn.features(x)
    torch.testing.assert_close(trace.last_value(tiny_cnn.features, "output"), feats)
    torch.testing.assert_close(
        trace.last_value(tiny_cnn.fc, "input"), torch.flatten(tiny_cnn.pool(feats), 1)
    )
    assert trace.last_value(nn.ReLU(), "output") is None  # not a module of this forward


def test_hooks_go_when_the_forward_raises() -> None:
    model = TinyCNN(raise_in_head=True).eval()
    with pytest.raises(RuntimeError, match="boom"), CallRecorder(model):
        model(images(1, 8))
    assert cp.count_hooks(model) == 0


def test_records_only_its_own_thread(tiny_cnn: TinyCNN) -> None:
    def other() -> None:
        for _ in range(5):
            tiny_cnn(images(1, 8, seed=9))

    with CallRecorder(tiny_cnn) as rec:
        t = threading.Thread(target=other)
        t.start()
        x = images(2, 8)
        tiny_cnn(x)
        t.join()  # the other thread's five forwards all ran inside the block
    assert [c.name for c in rec.calls] == ORDER  # one forward: this thread's
    assert rec.calls[0].inp is x


def test_resolution_request_is_scoped_to_its_block_and_model(tiny_cnn: TinyCNN) -> None:
    other = TinyCNN()
    request = ResolutionRequest(tiny_cnn, input_size=(3, 8, 8), allow_probe=False)
    assert current_request(tiny_cnn) is None
    with resolution_context(request) as active:
        assert active is request and current_request(tiny_cnn) is request
        assert current_request(other) is None
        seen: list[object] = []
        t = threading.Thread(target=lambda: seen.append(current_request(tiny_cnn)))
        t.start()
        t.join()
        assert seen == [None]  # another thread does not see this thread's request
    assert current_request(tiny_cnn) is None
