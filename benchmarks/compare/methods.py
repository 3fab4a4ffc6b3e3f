"""Every method of the scoreboard as ``explain(x, classes) -> (B, H, W)`` maps of the given
classes at the input's resolution.

* **CAM** -- :class:`cam_plugin.CAM`, one forward pass, the map of the folded head upsampled
  with the library default (``res.upsample()``); signed.
* **GradCAM, GradCAM++, ScoreCAM, LayerCAM** -- pytorch-grad-cam 1.5.7 on the layer CAM reads
  (``adapter.feature_module``), ``ClassifierOutputTarget``; as the package returns them: ReLU'd,
  min-max normalized per image, bilinear to the input.
* **LayerGradCam** -- Captum on the same layer, bilinear to the input; signed.
* **IntegratedGradients, Saliency, InputXGradient** -- Captum, summed over the colour channels
  (signed for IG and InputXGradient; Saliency is Captum's default absolute gradient).
* **Occlusion** -- Captum, a square window over every channel, zero baseline; the mean over the
  channels (all equal).
* **centre Gaussian, brightness** -- :mod:`cam_plugin.baselines` (no model): a centred Gaussian
  of std 0.25 of the side, and the brightness of the pixels.

Each builder runs on any model (the randomisation check calls it on re-initialised copies).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Explain = Callable[[Tensor, Tensor], Tensor]

#: methods that need no model (their maps do not depend on it)
BASELINES = ("centre Gaussian", "brightness")
#: pytorch-grad-cam class per scoreboard name
GRAD_CAM = {
    "GradCAM": "GradCAM",
    "GradCAM++": "GradCAMPlusPlus",
    "ScoreCAM": "ScoreCAM",
    "LayerCAM": "LayerCAM",
}


@dataclass(frozen=True)
class Settings:
    """What the methods need besides the model.

    Attributes:
        layer: the module name of CAM's feature layer (Grad-CAM-style methods use it too).
        ig_steps: IntegratedGradients steps (zero baseline).
        window, stride: the Occlusion window and stride (pixels).
        scorecam_batch: ScoreCAM's batch of masked images.
        pixels: network input -> pixel values in ``[0, 1]`` (for the brightness baseline).
    """

    layer: str
    ig_steps: int
    window: int
    stride: int
    scorecam_batch: int
    pixels: Callable[[Tensor], Tensor]


def _grad_cam(model: nn.Module, name: str, s: Settings) -> Explain:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = getattr(pgc, GRAD_CAM[name])
    layer = model.get_submodule(s.layer)

    def explain(x: Tensor, classes: Tensor) -> Tensor:
        with cls(model=model, target_layers=[layer]) as cam:
            if name == "ScoreCAM":
                cam.batch_size = s.scorecam_batch
            targets = [ClassifierOutputTarget(int(c)) for c in classes]
            # the parameters are frozen (see freeze): the gradient flows from the input
            out = cam(input_tensor=x.detach().requires_grad_(True), targets=targets)
        return torch.from_numpy(out).float()

    return explain


def _captum(model: nn.Module, name: str, s: Settings) -> Explain:
    from captum import attr

    if name == "LayerGradCam":
        lgc = attr.LayerGradCam(model, model.get_submodule(s.layer))

        def layer_grad_cam(x: Tensor, classes: Tensor) -> Tensor:
            a = lgc.attribute(x, target=classes.tolist())
            a = F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)
            return a[:, 0].detach()

        return layer_grad_cam
    if name == "Occlusion":
        occ = attr.Occlusion(model)

        def occlusion(x: Tensor, classes: Tensor) -> Tensor:
            a = occ.attribute(
                x,
                target=classes.tolist(),
                sliding_window_shapes=(x.shape[1], s.window, s.window),
                strides=(x.shape[1], s.stride, s.stride),
                baselines=0.0,
                perturbations_per_eval=16,
            )
            return a.mean(1).detach()

        return occlusion
    if name == "IntegratedGradients":
        ig = attr.IntegratedGradients(model)

        def integrated(x: Tensor, classes: Tensor) -> Tensor:
            a = ig.attribute(
                x,
                baselines=0.0,
                target=classes.tolist(),
                n_steps=s.ig_steps,
                internal_batch_size=s.ig_steps * x.shape[0],
            )
            return a.sum(1).detach()

        return integrated
    plain = {"Saliency": attr.Saliency, "InputXGradient": attr.InputXGradient}[name](model)
    return lambda x, classes: plain.attribute(x, target=classes.tolist()).sum(1).detach()


def _cam(model: nn.Module) -> Explain:
    import cam_plugin as cp

    cam = cp.CAM(model)

    def explain(x: Tensor, classes: Tensor) -> Tensor:
        return cam(x, targets=classes[:, None]).upsample().maps[:, 0]

    return explain


def _baseline(name: str, s: Settings) -> Explain:
    from cam_plugin.baselines import brightness_baseline_maps, centered_gaussian_maps

    if name == "centre Gaussian":
        return lambda x, classes: centered_gaussian_maps((x.shape[0], *x.shape[-2:]))
    return lambda x, classes: brightness_baseline_maps(s.pixels(x))


def freeze(model: nn.Module) -> nn.Module:
    """``requires_grad=False`` on every parameter, as for inference. pytorch-grad-cam calls
    ``loss.backward()``, which otherwise also computes every weight gradient (on the CPU the
    depthwise convolutions' weight gradients alone cost 10-30x a Grad-CAM); the other
    methods differentiate with respect to inputs or layers only and are unaffected."""
    return model.requires_grad_(False)


def build(model: nn.Module, name: str, settings: Settings) -> Explain:
    """``explain(x, classes)`` of method ``name`` on ``model``: ``x`` ``(B, C, H, W)`` as the
    model takes it, ``classes`` int64 ``(B,)``; returns float ``(B, H, W)``."""
    if name == "CAM":
        return _cam(model)
    if name in GRAD_CAM:
        return _grad_cam(model, name, settings)
    if name in BASELINES:
        return _baseline(name, settings)
    return _captum(model, name, settings)


def for_randomization(name: str, settings: Settings) -> Callable[..., Any]:
    """The ``explain(model, images, classes (B, k)) -> maps`` that
    :class:`cam_plugin.evaluate.RandomizationCheck` calls on its re-initialised copies."""

    def explain(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
        return build(model, name, settings)(x, classes[:, 0])

    return explain
