"""cam_plugin.discovery: the generic adapter read from one forward of a torch model, the
refusals (max pooling, non-affine heads) by name, and maps checked by hand."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyCNN, TinyResNet, TinyViT, assert_identity, images, randomize_head
from torch import nn

import cam_plugin as cp
from cam_plugin.adapter import BranchAverageAdapter
from cam_plugin.discovery import expected_channels, guess_input_size


def test_reads_feature_module_head_and_layout_from_one_forward() -> None:
    torch.manual_seed(0)
    model = randomize_head(TinyResNet(num_classes=5)).train()
    rng = torch.get_rng_state()
    adapter = cp.discover(model, images(2, 16))
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert adapter.feature_module is model.layer2 and adapter.feature_name == "layer2"
    assert [n for n, _ in adapter.head_modules] == ["norm", "fc"]
    assert adapter.layout.kind == "NCHW" and adapter.capture == "output"
    assert adapter.input_size == (3, 16, 16) and adapter.num_features == 16
    assert cp.count_hooks(model) == 0


def test_max_pool_module_is_refused_by_name() -> None:
    model = TinyCNN().eval()
    model.pool = nn.AdaptiveMaxPool2d(1)
    with pytest.raises(cp.UnsupportedHeadError, match=r"'pool' \(AdaptiveMaxPool2d\)") as info:
        cp.discover(model, images(2, 16))
    assert "global average" in str(info.value) and "cam_plugin.convert" in str(info.value)


def test_generic_probe_refuses_functional_max_pool() -> None:
    class MaxPooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).amax(dim=(2, 3)))

    with pytest.raises(cp.UnsupportedHeadError, match="global average"):
        cp.CAM(MaxPooled().eval(), input_size=(3, 16, 16))(images(2, 16))


def test_nonlinear_head_is_refused_by_name() -> None:
    class MLPHead(TinyCNN):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = nn.Linear(16, 16)
            self.act = nn.Hardswish()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = torch.flatten(self.pool(self.features(x)), 1)
            return self.fc(self.act(self.hidden(p)))

    with pytest.raises(cp.UnsupportedHeadError, match="act") as info:
        cp.CAM(randomize_head(MLPHead()).eval())(images(1, 16))
    assert "cam_plugin.convert" in str(info.value)


def test_output_that_is_not_logits_is_explained() -> None:
    class ReturnsDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> dict:
            return {"out": self.conv(x)}

    with pytest.raises(cp.AdapterNotFoundError, match="not \\(B, num_classes\\) logits"):
        cp.discover(ReturnsDict(), images(1, 16))


class TwoHeads(nn.Module):
    """A distillation-style head with as many classes as channels: read as a chain the two
    Linears would fold (K -> K -> K) and mismatch; read as branches they average."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(6, 6)
        self.head_dist = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.drop(self.conv(x).mean(dim=(2, 3)))
        return (self.head(p) + self.head_dist(p)) / 2


def test_branches_are_read_when_the_chain_folds_but_mismatches() -> None:
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = images(2, 12)
    cam = cp.CAM(model, input_size=(3, 12, 12))
    res = cam(x, targets="all")
    assert "mean of" in cam.adapter.name and isinstance(cam.adapter, BranchAverageAdapter)
    assert_identity(res)
    with torch.no_grad():
        f = model.conv(x)
        w = (model.head.weight + model.head_dist.weight) / 2
        expected = torch.einsum("ck,bkhw->bchw", w, f)
    torch.testing.assert_close(res.maps, expected, rtol=1e-5, atol=1e-5)


class ResidualLast(nn.Module):
    """The last block's output is finished by a functional add after its last module call,
    the pool is functional: the map must be read from the block, not its last leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block = Block()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.block(self.stem(x)).mean(dim=(2, 3))))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_map_finished_after_the_last_module_call() -> None:
    torch.manual_seed(0)
    model = randomize_head(ResidualLast()).eval()
    x = images(3, 16)
    res = cp.CAM(model, input_size=(3, 16, 16))(x, targets="all")
    assert res.maps.shape == (3, 5, 8, 8)
    assert_identity(res)
    with torch.no_grad():
        f = model.block(model.stem(x))  # by hand, LayerNorm written out
        pooled = f.mean(dim=(2, 3))
        mu = pooled.mean(1)[:, None, None, None]
        sigma = torch.sqrt(pooled.var(1, unbiased=False) + model.norm.eps)[:, None, None, None]
        g = (f - mu) / sigma * model.norm.weight[None, :, None, None]
        expected = torch.einsum("ck,bkhw->bchw", model.fc.weight, g)
    torch.testing.assert_close(res.maps, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", [1, 5])
def test_token_model_prefix_tokens_and_fc_norm_by_hand(prefix: int) -> None:
    """A ViT-shaped torch model (mean of the patch tokens -> fc_norm -> head): the token
    layout, the prefix count and the LayerNorm fold, against the maps written out here."""
    torch.manual_seed(0)
    model = randomize_head(TinyViT(num_classes=5, num_prefix_tokens=prefix)).eval()
    x = images(2, 16)
    cam = cp.CAM(model)
    res = cam(x, targets="all")
    assert cam.adapter.layout.kind == "tokens"
    assert cam.adapter.layout.num_prefix_tokens == prefix
    assert_identity(res)
    with torch.no_grad():
        tokens = model.forward_features(x)[:, prefix:]
        f = tokens.transpose(1, 2).reshape(2, -1, 4, 4)
        pooled = f.mean(dim=(2, 3))
        mu = pooled.mean(1)[:, None, None, None]
        sigma = torch.sqrt(pooled.var(1, unbiased=False) + model.fc_norm.eps)[:, None, None, None]
        g = (f - mu) / sigma * model.fc_norm.weight[None, :, None, None]
        expected = torch.einsum("ck,bkhw->bchw", model.head.weight, g)
        torch.testing.assert_close(res.logits, model(x))
    torch.testing.assert_close(res.maps, expected, rtol=1e-4, atol=1e-4)


def test_input_size_and_channels_the_model_states() -> None:
    model = TinyCNN()
    assert expected_channels(model) == 3 and guess_input_size(model) == (3, 224, 224)
    object.__setattr__(model, "pretrained_cfg", {"input_size": (3, 32, 48)})  # timm's way
    assert guess_input_size(model) == (3, 32, 48)
    assert expected_channels(nn.Sequential(nn.Linear(2, 2))) is None
