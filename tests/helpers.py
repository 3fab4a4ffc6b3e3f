"""Test helpers: real models with non-trivial heads, seeded inputs, the identity check."""

from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def randomize_head(model: nn.Module, seed: int = 0) -> nn.Module:
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
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
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
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)
        self.raise_in_head = raise_in_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if self.raise_in_head:
            raise RuntimeError("boom inside the forward")
        return self.fc(torch.flatten(self.pool(f), 1))
