"""pytest configuration: headless plotting, two threads, shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TinyCNN, randomize_head

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return randomize_head(TinyCNN()).eval()
