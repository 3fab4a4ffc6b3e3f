"""Captum's own metrics on every method's map: ``captum.metrics.infidelity`` under two
perturbations (Gaussian noise; a random square set to the zero baseline) and
``captum.metrics.sensitivity_max``. The perturbations are seeded and identical for every
method. A ``(B, H, W)`` map is repeated over the colour channels to get the input's shape,
which both metrics require."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _noise(std: float, seed: int) -> Callable[..., Any]:
    from captum.metrics import infidelity_perturb_func_decorator

    @infidelity_perturb_func_decorator(multiply_by_inputs=False)
    def noise(inputs: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return inputs - std * torch.randn(inputs.shape, generator=gen)

    return noise


def _square(side: int, seed: int) -> Callable[..., Any]:
    from captum.metrics import infidelity_perturb_func_decorator

    @infidelity_perturb_func_decorator(multiply_by_inputs=False)
    def square(inputs: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        n, _, h, w = inputs.shape
        s = min(side, h, w)
        ys = torch.randint(0, h - s + 1, (n,), generator=gen)[:, None, None]
        xs = torch.randint(0, w - s + 1, (n,), generator=gen)[:, None, None]
        rows = torch.arange(h)[None, :, None]
        cols = torch.arange(w)[None, None, :]
        inside = (rows >= ys) & (rows < ys + s) & (cols >= xs) & (cols < xs + s)
        return inputs * (~inside)[:, None].to(inputs.dtype)  # the square -> baseline 0

    return square


def infidelity(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    *,
    samples: int,
    noise_std: float,
    square: int,
    seed: int,
) -> dict[str, float]:
    """Mean infidelity (Yeh et al., 2019; ``normalize=True``: independent of the map's
    scale) over the images, ``samples`` perturbations each, per perturbation kind."""
    from captum.metrics import infidelity as captum_infidelity

    full = maps[:, None].expand_as(images).contiguous()
    out: dict[str, float] = {}
    for key, make in (("infid_noise", _noise(noise_std, seed)), ("infid_square", None)):
        perturb = make if make is not None else _square(square, seed)
        value = captum_infidelity(
            model,
            perturb,
            images,
            full,
            target=classes.tolist(),
            n_perturb_samples=samples,
            normalize=True,
        )
        out[key] = float(value.mean())
    return out


def sensitivity(
    explain: Callable[[Tensor, Tensor], Tensor],
    images: Tensor,
    classes: Tensor,
    *,
    samples: int,
    radius: float,
    seed: int,
) -> float:
    """Mean over the images of ``captum.metrics.sensitivity_max``: the largest relative change
    (Frobenius norm) of the map under ``samples`` uniform perturbations of ``radius``."""
    from captum.metrics import sensitivity_max

    def explanation(inputs: Any, target: Any = None) -> Any:
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        c = torch.as_tensor(target).reshape(-1).expand(x.shape[0])
        with torch.enable_grad():  # sensitivity_max calls it under no_grad
            m = explain(x, c)[:, None].expand_as(x).contiguous()
        return (m,) if isinstance(inputs, tuple) else m

    values = []
    for i in range(images.shape[0]):
        torch.manual_seed(seed + i)  # the same perturbations for every method
        sens = sensitivity_max(
            explanation,
            images[i : i + 1],
            target=int(classes[i]),
            n_perturb_samples=samples,
            perturb_radius=radius,
            max_examples_per_batch=1,
        )
        values.append(float(sens[0]))
    return float(sum(values) / len(values))
