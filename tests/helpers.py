"""Test helpers, torch only: real models with non-trivial heads, seeded inputs, identity check."""

from __future__ import annotations

import os
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def randomize_head(model: M, seed: int = 0) -> M:
    """Give every Linear / LayerNorm / BatchNorm after random init non-trivial values.

    Several architectures zero-initialise their classifier (logits ~ 0 would make the
    identity check vacuous); this draws the head's weights, biases and norm affine
    parameters from a seeded normal distribution, and BatchNorm running stats too.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features**0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
                if (
                    isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and m.running_mean is not None
                    and m.running_var is not None
                ):
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model


def images(batch: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """A seeded batch of random images (the global RNG is not touched)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen)


def assert_identity(res, rel: float = 1e-4) -> None:  # type: ignore[no-untyped-def]
    """``|mean_xy M_c + b_c − logit_c| <= rel · max(1, max|logits|)`` for every map."""
    scale = max(1.0, float(res.logits.abs().max()))
    worst = float(res.identity_residual().abs().max())
    assert worst <= rel * scale, f"identity off by {worst:.3g} (scale {scale:.3g})"


class TinyCNN(nn.Module):
    """A real (small) CNN: conv stages -> ReLU -> global average pool -> Linear."""

    def __init__(self, num_classes: int = 7, raise_in_head: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)
        self.raise_in_head = raise_in_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if self.raise_in_head:
            raise RuntimeError("boom inside the forward")
        return self.fc(torch.flatten(self.pool(f), 1))


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (strided 1x1) shortcut, ReLU after the add: the block's
    output is finished by a functional add after its last module call."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()
        self.short = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.short(x))


class TinyResNet(nn.Module):
    """A ResNet-shaped torch-only classifier with timm's conventions (``forward_features``,
    ``forward_head``, ``get_classifier``): stem (stride 2) -> layer1 -> layer2 (stride 2)
    -> global average pool -> ``fc``. A 16 x 16 input gives a 4 x 4 last map; a LayerNorm
    head (``head_norm=True``) folds like ConvNeXt's."""

    def __init__(self, num_classes: int = 10, head_norm: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.layer1 = ResBlock(8, 8)
        self.layer2 = ResBlock(8, 16, stride=2)
        self.global_pool: nn.Module = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(16) if head_norm else nn.Identity()
        self.fc = nn.Linear(16, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(self.stem(x)))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(torch.flatten(self.global_pool(f), 1)))

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class TinyViT(nn.Module):
    """A token model (timm ViT's shape, torch only): 4 x 4 patches -> a class token plus
    patch tokens -> one encoder layer -> LayerNorm -> mean of the patch tokens -> ``fc_norm``
    (LayerNorm) -> ``head``."""

    def __init__(self, num_classes: int = 5, dim: int = 16, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.prefix = nn.Parameter(0.02 * torch.randn(1, num_prefix_tokens, dim))
        self.block = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.fc_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.prefix.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.norm(self.block(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x)
        return self.head(self.fc_norm(f[:, self.num_prefix_tokens :].mean(dim=1)))


class Counted:
    """Counts the calls of a user's forward hook, pre-hook and global hook on ``model``
    (to show that the library runs the user's model exactly once per call)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.hook = self.pre = self.global_ = 0
        self.handles = [
            model.register_forward_hook(lambda m, a, o: self._inc("hook")),
            model.register_forward_pre_hook(lambda m, a: self._inc("pre")),
            nn.modules.module.register_module_forward_hook(self._global),
        ]

    def _inc(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def _global(self, module: nn.Module, args: object, out: object) -> None:
        if module is self.model:
            self.global_ += 1

    def counts(self) -> tuple[int, int, int]:
        return self.hook, self.pre, self.global_

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
