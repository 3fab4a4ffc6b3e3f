"""How a captured feature tensor is laid out, and how to bring it to ``(B, K, h, w)``.

Three layouts cover the supported families:

* ``NCHW``   convolutional networks (ResNet, EfficientNet, ConvNeXt, RegNet, ...)
* ``NHWC``   channels-last outputs (timm Swin's ``forward_features``)
* ``tokens`` ``(B, N, K)`` token sequences of vision transformers; the first
  ``num_prefix_tokens`` (class / register tokens) are dropped and the remaining
  ``h * w`` patch tokens are reshaped row-major to the patch grid.

and two cover video (space-time) models, whose maps are ``(B, K, T, h, w)``:

* ``NCTHW``  3-D convolutional networks (torchvision ``r3d_18``, ``mc3_18``, ``r2plus1d_18``)
* ``NTHWC``  channels-last space-time features (Video Swin)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from .errors import CAMInputError

LayoutKind = Literal["NCHW", "NHWC", "tokens", "NCTHW", "NTHWC"]
_KINDS = ("NCHW", "NHWC", "tokens", "NCTHW", "NTHWC")

__all__ = ["FeatureLayout", "LayoutKind"]


@dataclass(frozen=True)
class FeatureLayout:
    """Layout of the captured feature tensor.

    Attributes:
        kind: ``"NCHW"``, ``"NHWC"`` or ``"tokens"``.
        num_prefix_tokens: for ``tokens``, how many leading tokens (CLS, registers) the
            head's average pool skips.
        relu: whether the model applies a ReLU *functionally* between the captured module
            and the pool (torchvision DenseNet does ``F.relu(features)``); the maps use
            ``relu(f)`` then, exactly as the logits do.
        grid: for ``tokens``, a fixed patch grid ``(h, w)``; ``None`` infers it from the
            token count and the input's aspect ratio.
    """

    kind: LayoutKind = "NCHW"
    num_prefix_tokens: int = 0
    relu: bool = False
    grid: Optional[tuple[int, int]] = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise CAMInputError(
                "layout kind must be 'NCHW', 'NHWC' or 'tokens' (images) or 'NCTHW' / 'NTHWC' "
                f"(video), got {self.kind!r}"
            )
        if self.num_prefix_tokens < 0:
            raise CAMInputError(f"num_prefix_tokens must be >= 0, got {self.num_prefix_tokens}")

    def to_nchw(self, captured: Tensor, input_hw: Optional[tuple[int, int]] = None) -> Tensor:
        """Return the captured features as ``(B, K, h, w)`` (``(B, K, T, h, w)`` for the video
        layouts), a view where possible.

        For ``tokens`` the patch grid is ``grid`` when set, else ``h = round(sqrt(N * H / W))``
        from the patch-token count ``N`` and the input size ``(H, W)`` (square when unknown).
        """
        if self.kind == "NCHW":
            feats = _expect_rank(captured, 4, "NCHW")
        elif self.kind == "NCTHW":
            feats = _expect_rank(captured, 5, "NCTHW")
        elif self.kind == "NTHWC":
            feats = _expect_rank(captured, 5, "NTHWC").permute(0, 4, 1, 2, 3)
        elif self.kind == "NHWC":
            feats = _expect_rank(captured, 4, "NHWC").permute(0, 3, 1, 2)
        else:
            tokens = _expect_rank(captured, 3, "tokens")[:, self.num_prefix_tokens :]
            b, n, k = tokens.shape
            h, w = self.grid if self.grid is not None else _infer_grid(n, input_hw)
            if h * w != n:
                raise CAMInputError(
                    f"cannot reshape {n} patch tokens to a {h}x{w} grid; pass "
                    "FeatureLayout(grid=(h, w)) in the adapter"
                )
            feats = tokens.transpose(1, 2).reshape(b, k, h, w)
        return torch.relu(feats) if self.relu else feats

    def pool(self, captured: Tensor) -> Tensor:
        """Global average pool of the captured tensor, ``(B, K)``, as the head computes it."""
        if self.kind in ("NCHW", "NCTHW"):
            feats = torch.relu(captured) if self.relu else captured
            return feats.flatten(2).mean(dim=2)
        if self.kind == "NTHWC":
            feats = torch.relu(captured) if self.relu else captured
            return feats.mean(dim=(1, 2, 3))
        if self.kind == "NHWC":
            feats = torch.relu(captured) if self.relu else captured
            return feats.mean(dim=(1, 2))
        tokens = captured[:, self.num_prefix_tokens :]
        return (torch.relu(tokens) if self.relu else tokens).mean(dim=1)


def _expect_rank(t: Tensor, rank: int, kind: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise CAMInputError(
            f"the feature module returned {type(t).__name__}, not a tensor; the adapter "
            "must point at a module whose output is the feature map"
        )
    if t.dim() != rank:
        raise CAMInputError(
            f"layout {kind} expects a {rank}-D feature tensor, got shape {tuple(t.shape)}"
        )
    return t


def _infer_grid(n: int, input_hw: Optional[tuple[int, int]]) -> tuple[int, int]:
    if input_hw is None:
        side = int(round(math.sqrt(n)))
        return side, max(1, n // max(side, 1))
    height, width = input_hw
    h = max(1, int(round(math.sqrt(n * height / width))))
    return h, max(1, n // h)
