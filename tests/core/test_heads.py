"""cam_plugin.heads: folding Linear / 1x1 conv / BatchNorm / LayerNorm heads, checked against
a computation written out by hand, and the refusals that name the module."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_identity, images, randomize_head
from torch import nn

import cam_plugin as cp
from cam_plugin.heads import FoldedHead, fold_head, is_passthrough, logits_error

K, C = 6, 4


def _features(b: int = 3, h: int = 5, w: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, K, h, w, generator=gen)


def _head(*modules: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules, with seeded non-trivial parameters, in eval mode, named "0", "1", ..."""
    randomize_head(nn.Sequential(*modules)).eval()
    return [(str(i), m) for i, m in enumerate(modules)]


def _run(head: list[tuple[str, nn.Module]], feats: torch.Tensor) -> torch.Tensor:
    """What the model computes: global average pool, then the head modules in order."""
    x = feats.mean(dim=(2, 3))
    with torch.no_grad():
        for _, m in head:
            x = m(x)
    return x


def test_linear_folds_to_its_own_weight_and_bias() -> None:
    fc = nn.Linear(K, C)
    head = _head(nn.Flatten(), nn.Dropout(0.5), fc)
    folded = fold_head(head, K)
    assert isinstance(folded, FoldedHead) and folded.norm_eps is None
    assert folded.num_classes == C and folded.in_features == K
    torch.testing.assert_close(folded.weight, fc.weight)
    torch.testing.assert_close(folded.bias, fc.bias)
    f = _features()
    with torch.no_grad():
        by_hand = torch.einsum("ck,bkhw->bchw", fc.weight, f)  # M_c = Σ_k w_ck f_k
        torch.testing.assert_close(folded.maps(f), by_hand)
        torch.testing.assert_close(folded.logits(f), _run(head, f))
        # the identity: mean_xy M_c + b_c = S_c
        torch.testing.assert_close(by_hand.mean(dim=(2, 3)) + fc.bias, _run(head, f))


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``s * p + t``: ``s = γ / sqrt(var + eps)``, ``t = β − μ s``."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def test_batchnorm_before_and_after_the_linear_fold_by_hand() -> None:
    bn1, fc, bn2 = nn.BatchNorm1d(K), nn.Linear(K, C), nn.BatchNorm1d(C)
    head = _head(bn1, fc, bn2)
    with torch.no_grad():
        s1, t1 = _bn_affine(bn1)
        s2, t2 = _bn_affine(bn2)
        weight = s2[:, None] * fc.weight * s1[None, :]  # diag(s2) W diag(s1)
        bias = s2 * (fc.weight @ t1 + fc.bias) + t2
        folded = fold_head(head, K)
        torch.testing.assert_close(folded.weight, weight)
        torch.testing.assert_close(folded.bias, bias)
        f = _features(seed=1)
        torch.testing.assert_close(folded.logits(f), _run(head, f))


def test_conv1x1_classifier_folds_like_a_linear() -> None:
    conv = nn.Conv2d(K, C, 1)
    head = _head(conv)
    folded = fold_head(head, K)
    torch.testing.assert_close(folded.weight, conv.weight[:, :, 0, 0])
    torch.testing.assert_close(folded.bias, conv.bias)


@pytest.mark.parametrize("pre", [False, True], ids=["norm-first", "linear-then-norm"])
def test_layernorm_head_by_hand(pre: bool) -> None:
    """``M_c = Σ_k (w_ck γ_k / σ)(q_k − μ)``, bias ``b_c + Σ_k w_ck β_k``, ``q = P f + π``."""
    proj, norm, fc = nn.Linear(K, K), nn.LayerNorm(K), nn.Linear(K, C)
    head = _head(proj, norm, fc) if pre else _head(norm, fc)
    f = _features(seed=2)
    folded = fold_head(head, K)
    assert folded.norm_eps == norm.eps
    assert (folded.pre_weight is not None) == pre
    with torch.no_grad():
        q = (
            torch.einsum("jk,bkhw->bjhw", proj.weight, f) + proj.bias[None, :, None, None]
            if pre
            else f
        )
        pooled = q.mean(dim=(2, 3))
        mu = pooled.mean(1)[:, None, None, None]
        sigma = torch.sqrt(pooled.var(1, unbiased=False) + norm.eps)[:, None, None, None]
        w = fc.weight * norm.weight[None, :]
        by_hand = torch.einsum("ck,bkhw->bchw", w, (q - mu) / sigma)
        bias = fc.bias + fc.weight @ norm.bias
        torch.testing.assert_close(folded.maps(f), by_hand, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded.bias, bias)
        torch.testing.assert_close(by_hand.mean(dim=(2, 3)) + bias, _run(head, f))
        torch.testing.assert_close(folded.logits(f), _run(head, f), rtol=1e-5, atol=1e-5)


def test_selected_classes_are_rows_of_the_all_class_maps() -> None:
    for head in (_head(nn.Linear(K, C)), _head(nn.LayerNorm(K), nn.Linear(K, C))):
        folded = fold_head(head, K)
        f = _features(b=2)
        classes = torch.tensor([[3, 0], [1, 1]])
        with torch.no_grad():
            full = folded.maps(f)
            picked = folded.maps(f, classes)
        torch.testing.assert_close(picked[0], full[0, [3, 0]])
        torch.testing.assert_close(picked[1], full[1, [1, 1]])
        torch.testing.assert_close(folded.class_bias(classes), folded.bias[classes])


@pytest.mark.parametrize(
    ("modules", "match"),
    [
        ([nn.Linear(K, K), nn.ReLU(), nn.Linear(K, C)], r"'1' \(ReLU\).*not affine"),
        ([nn.LayerNorm(K), nn.LayerNorm(K), nn.Linear(K, C)], "second LayerNorm"),
        ([nn.LayerNorm(K + 1), nn.Linear(K + 1, C)], "normalizes over"),
        ([nn.Conv2d(K, C, 3)], "not 1x1"),
        ([nn.BatchNorm1d(K, track_running_stats=False), nn.Linear(K, C)], "running statistics"),
        ([nn.Linear(K + 2, C)], "expects 8 inputs but receives 6"),
    ],
    ids=["relu", "two-norms", "norm-width", "conv3x3", "bn-no-stats", "width"],
)
def test_unfoldable_heads_are_refused_by_name(modules: list[nn.Module], match: str) -> None:
    head = [(str(i), m.eval()) for i, m in enumerate(modules)]
    with pytest.raises(cp.UnsupportedHeadError, match=match) as info:
        fold_head(head, K)
    if "expects" not in match:  # a wrong width is the adapter's mistake, not the head's
        assert "cam_plugin.convert" in str(info.value)


def test_reproduces_and_check_reproduces() -> None:
    head = _head(nn.Linear(K, C))
    folded = fold_head(head, K)
    f = _features()
    logits = _run(head, f)
    assert folded.reproduces(f, logits)
    folded.check_reproduces(f, logits, name="tiny")
    off = logits + 0.01 * logits.abs().max()
    assert not folded.reproduces(f, off)
    assert folded.reproduces(f, off, rtol=0.02)
    with pytest.raises(cp.UnsupportedHeadError, match="'tiny' reproduces the model's logits"):
        folded.check_reproduces(f, off, name="tiny")


def test_logits_error_and_its_scale() -> None:
    s = torch.tensor([[0.5, -4.0]])
    assert logits_error(s + 0.1, s) == pytest.approx((0.1, 4.0))
    assert logits_error(s * 0.1, s * 0.1)[1] == 1.0  # the scale is at least 1
    assert logits_error(s[:, :1], s)[0] == float("inf")  # shapes differ


def test_passthrough_modules() -> None:
    for m in (nn.Identity(), nn.Flatten(), nn.Dropout(), nn.Dropout2d(), nn.AlphaDropout()):
        assert is_passthrough(m)
    assert not is_passthrough(nn.ReLU()) and not is_passthrough(nn.Linear(2, 2))


def test_bn1d_and_dropout_head_fold_exactly() -> None:
    class BNHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GELU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.BatchNorm1d(6),
                nn.Dropout(0.3),
                nn.Linear(6, 5),
                nn.BatchNorm1d(5),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.pool(self.body(x)))

    model = randomize_head(BNHead()).eval()
    res = cp.CAM(model, input_size=(3, 20, 20))(images(4, 20), targets="all")
    assert_identity(res)


def test_conv1x1_classifier_folds() -> None:
    class ConvHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 6, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.cls = nn.Conv2d(6, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.cls(self.pool(torch.relu(self.body(x)))).flatten(1)

    model = randomize_head(ConvHead()).eval()
    res = cp.CAM(model, input_size=(3, 16, 16))(images(2, 16), targets="all")
    assert_identity(res)
    assert res.maps.shape == (2, 4, 16, 16)
