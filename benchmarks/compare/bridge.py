"""The CAM / Grad-CAM bridge (the table of ``docs/captum.md``): ``CAM == h·w · LayerGradCam``
on GAP + linear heads, and how far the two are apart through a LayerNorm head (ConvNeXt,
avg-pooled ViT), with the closed form of the difference checked numerically."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .config import Config
from .photos import photo, preprocess


def random_timm(name: str, **kwargs: Any) -> nn.Module:
    """A timm model with seeded random weights, in eval mode."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def grad_cam_tokens(model: nn.Module, adapter: Any, x: Tensor, classes: Tensor) -> Tensor:
    """Grad-CAM on the patch tokens (B, N, K) with autograd: α_k = mean over patches of
    ∂S_c/∂t_k, map = Σ_k α_k t_k on the patch grid. Captum's LayerGradCam averages the
    gradient over the *last* dims, which for tokens is the channel dim, so it does not apply."""
    from cam_plugin import FeatureCapture

    with FeatureCapture(adapter.feature_module, adapter.capture, detach=False) as cap:
        logits = model(x)
        tokens = cap.value
    assert tokens is not None
    grads = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), tokens)[0]
    feats = adapter.features(tokens.detach(), tuple(x.shape[-2:]))
    g = adapter.features(grads, tuple(x.shape[-2:]))
    alpha = g.mean(dim=(2, 3), keepdim=True)
    return (alpha * feats).sum(1, keepdim=True)


def closed_form(head: Any, feats: Tensor, classes: Tensor) -> Tensor:
    """h·w · Grad-CAM through one LayerNorm head, in closed form. With p = mean_xy f,
    n = (p − μ)/σ and u = W'_c / σ: ∂S_c/∂p = u − mean(u) − (u·n) n / K, so
    h·w · GradCAM(x, y) = Σ_k (u_k − mean(u) − (u·n) n_k / K) f_k(x, y)."""
    mu, sigma = head.norm_stats(feats)
    p = feats.mean(dim=(2, 3))
    n = (p - mu) / sigma
    u = head.weight[classes] / sigma
    k = feats.shape[1]
    grad = u - u.mean(1, keepdim=True) - (u * n).sum(1, keepdim=True) * n / k
    return torch.einsum("bk,bkhw->bhw", grad, feats)[:, None]


def capture(model: nn.Module, adapter: Any, x: Tensor) -> Tensor:
    """The adapter's feature tensor for ``x`` (no autograd)."""
    from cam_plugin import FeatureCapture

    with torch.no_grad(), FeatureCapture(adapter.feature_module, adapter.capture) as cap:
        model(x)
        value = cap.value
    assert value is not None
    return value


def bridge_models(cfg: Config) -> list[tuple[str, str, Callable[[], nn.Module]]]:
    """(label, head, factory) of every model of the bridge table."""
    from cam_plugin.integrations.timm import efficientnet_lite0_pretrained

    vit = partial(random_timm, "vit_tiny_patch16_224", global_pool="avg", img_size=cfg.size)
    return [
        ("timm resnet18 (random init)", "GAP → Linear", partial(random_timm, "resnet18")),
        ("timm regnety_002 (random init)", "GAP → Linear", partial(random_timm, "regnety_002")),
        ("tf_efficientnet_lite0 (ImageNet)", "GAP → Linear", efficientnet_lite0_pretrained),
        (
            "timm convnext_atto (random init)",
            "GAP → LayerNorm → Linear",
            partial(random_timm, "convnext_atto"),
        ),
        (
            "timm vit_tiny_patch16_224, global_pool='avg' (random init)",
            "token mean → LayerNorm → Linear",
            vit,
        ),
    ]


def bridge_row(label: str, head_desc: str, model: nn.Module, x: Tensor) -> dict[str, Any]:
    """One model's row: CAM against h·w · Grad-CAM, and the identities both satisfy."""
    from cam_plugin.integrations.captum import ClassActivationMap
    from captum.attr import LayerGradCam

    cam = ClassActivationMap(model)
    with torch.no_grad():
        logits = model(x)
    classes = logits.argmax(1)
    attr = cam.attribute(x, target=classes)
    h, w = attr.shape[-2:]
    tokens = cam.adapter.layout.kind == "tokens"
    if tokens:
        grad_cam = grad_cam_tokens(model, cam.adapter, x, classes)
    else:
        grad_cam = LayerGradCam(model, cam.layer).attribute(x, target=classes)
    scaled = grad_cam.detach() * (h * w)
    head = cam.adapter.fold()
    head.weight, head.bias = head.weight.detach(), head.bias.detach()
    score = logits.gather(1, classes[:, None])[:, 0]
    row = {
        "model": label,
        "head": head_desc,
        "layer": cam.adapter.feature_name,
        "map": f"{h}x{w}",
        "grad_cam": "autograd on tokens" if tokens else "Captum LayerGradCam",
        "max_abs_diff": float((attr - scaled).abs().max()),
        "max_abs_cam": float(attr.abs().max()),
        "mean_cam_plus_bias_minus_logit": float(
            (attr.mean((2, 3))[:, 0] + head.bias[classes] - score).abs().max()
        ),
        "max_abs_mean_gradcam_hw": float(scaled.mean((2, 3)).abs().max()),
        "mean_abs_logit_minus_bias": float((score - head.bias[classes]).abs().mean()),
    }
    if head.norm_eps is not None and head.pre_weight is None:
        feats = cam.adapter.features(capture(model, cam.adapter, x), tuple(x.shape[-2:]))
        row["closed_form_err"] = float((closed_form(head, feats, classes) - scaled).abs().max())
    return row


def run_bridge(cfg: Config) -> list[dict[str, Any]]:
    """Every model's row, on the run's photos."""
    x = torch.cat([preprocess(photo(p), cfg.size)[0] for p in cfg.photos])
    rows = []
    for label, head_desc, make in bridge_models(cfg):
        row = bridge_row(label, head_desc, make(), x)
        rows.append(row)
        print(
            f"[bridge] {label}: max|CAM - hw*GradCAM| {row['max_abs_diff']:.3g} "
            f"(max|CAM| {row['max_abs_cam']:.3g})",
            flush=True,
        )
    return rows
