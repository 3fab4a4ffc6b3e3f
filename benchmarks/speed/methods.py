"""What is compared: the model, the inputs and one callable per method, built once per child.

Nothing here imports torch at import time (the parent reads the method names and labels);
:class:`Bench` imports torch, cam-plugin and, lazily, each comparator.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, Optional

METHODS = [
    "forward",
    "cam_feature",
    "cam_upsampled",
    "cam_top5",
    "cam_all",
    "torchcam",
    "gradcam",
    "captum",
    "captum_given",
]
LABELS = {
    "forward": "plain forward (`torch.inference_mode`), the floor",
    "cam_feature": "cam-plugin CAM, top-1, feature resolution",
    "cam_upsampled": "cam-plugin CAM, top-1, upsampled to the input + normalized",
    "cam_top5": "cam-plugin CAM, top-5, upsampled + normalized",
    "cam_all": "cam-plugin CAM, all classes, feature resolution",
    "torchcam": "torchcam `CAM` (`normalized=False`) + same upsampling/normalization",
    "gradcam": "pytorch-grad-cam `GradCAM` (same layer)",
    "captum": "Captum `LayerGradCam` + `interpolate` (bilinear) + normalization, top-1 "
    "class from its own forward first",
    "captum_given": "Captum, the same with the top-1 class given (computed before timing)",
}
FAST = ["forward", "cam_eager", "module_channels_last", "module_compile", "onnxruntime"]
FAST_LABELS = {
    "forward": "eager plain forward (NCHW, `inference_mode`), the reference",
    "cam_eager": "eager `CAM(model)` top-1 upsampled + normalized",
    "module_channels_last": "`CAMModule` eager, channels_last, `inference_mode`",
    "module_compile": "`torch.compile(CAMModule)`, channels_last, inductor freezing",
    "onnxruntime": "`export_onnx` -> onnxruntime (CAM as a graph output)",
}
# grad-cam's and Captum's autograd passes grow glibc's heap (a batch-16 ResNet-50 backward keeps
# GBs live at once); the heap is then not trimmed, and every call after them in that process
# stops page-faulting. They are therefore timed in their own child, with the forward and the
# top-1 upsampled CAM as in-process references, so the other methods see the heap a plain
# inference process has.
GROUPS = {
    "inference": ["forward", "cam_feature", "cam_upsampled", "cam_top5", "cam_all", "torchcam"],
    "autograd": ["forward", "cam_upsampled", "gradcam", "captum", "captum_given"],
}

Method = Callable[[], Any]


def setup_torch(threads: int) -> Any:
    """Import torch with ``threads`` intra-op threads and one inter-op thread."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)
    return torch


def tiny_model() -> Any:
    """A small real CNN (conv-BN-ReLU stages, GAP, Linear) for the smoke run."""
    from torch import nn

    class TinyNet(nn.Module):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, num_classes)

        def forward(self, x: Any) -> Any:
            return self.fc(self.pool(self.features(x)).flatten(1))

    return TinyNet()


def build_model(name: str, seed: int = 0) -> tuple[Any, int]:
    """``(model in eval mode, input size)``: ``tiny``, ``lite0`` (the real ImageNet
    EfficientNet-Lite0) or a timm architecture (``resnet50``, ``timm:<name>``)."""
    import torch

    torch.manual_seed(seed)
    if name == "tiny":
        return tiny_model().eval(), 32
    import timm

    if name == "lite0":
        from cam_plugin.integrations.timm import efficientnet_lite0_pretrained

        return efficientnet_lite0_pretrained().eval(), 224
    arch = name[5:] if name.startswith("timm:") else name
    model = timm.create_model(arch)
    return model.eval(), int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


def _photos() -> list[Any]:
    """scikit-image's bundled photos as ``(3, H, W)`` floats in ``[0, 1]`` (none without it)."""
    import torch

    photos = []
    try:
        from skimage import data

        for fn in ("chelsea", "coffee", "astronaut", "rocket", "cat", "camera"):
            img = torch.from_numpy(getattr(data, fn)().copy()).float() / 255.0
            img = img[..., None].expand(-1, -1, 3) if img.dim() == 2 else img[..., :3]
            photos.append(img.permute(2, 0, 1))
    except Exception:  # scikit-image missing: random images are as good for timing
        photos = []
    return photos


def make_images(batch: int, size: int, seed: int = 0) -> Any:
    """Real photos (scikit-image's bundled ones, centre-cropped, mean = std = 0.5, plus
    mirrored copies) when available and the size allows, else a seeded normal batch."""
    import torch
    import torch.nn.functional as F

    photos = _photos() if size >= 64 else []
    if not photos:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, size, size, generator=gen)
    out = []
    for i in range(batch):
        img = photos[i % len(photos)]
        if (i // len(photos)) % 2:
            img = img.flip(-1)
        h, w = img.shape[-2:]
        scale = size * 256 / 224 / min(h, w)
        img = F.interpolate(
            img[None],
            size=(round(h * scale), round(w * scale)),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        top, left = (img.shape[-2] - size) // 2, (img.shape[-1] - size) // 2
        out.append((img[:, top : top + size, left : left + size] - 0.5) / 0.5)
    return torch.stack(out).contiguous()


def _module_name(model: Any, module: Any) -> Optional[str]:
    return next((n for n, m in model.named_modules() if m is module), None)


def pearson(a: Any, b: Any) -> float:
    """Smallest per-image Pearson correlation of two ``(B, H, W)`` batches."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    num = (a * b).sum(1)
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
    return float((num / den).min())


class Bench:
    """Model, inputs and the callables of every method, built once per child.

    The CAM adapter is resolved from the benchmark's own batch (``CAM.resolve(example=x)``),
    so set-up never runs the model on random data; its feature module is the layer every
    comparator hooks.
    """

    def __init__(self, model_name: str, batch: int, device: str, threads: int) -> None:
        torch = setup_torch(threads)
        from torch import nn

        import cam_plugin as cp

        self.torch = torch
        self.device = device
        self.model, self.size = build_model(model_name)
        self.model.to(device)
        self.x = make_images(batch, self.size).to(device)
        # plain bilinear upsampling, as every peer in the table (the traced placement is
        # the library default; its cost is measured in docs/localization.md)
        self.cam = cp.CAM(self.model, placement="bilinear")
        adapter = self.cam.resolve(example=self.x)
        self.adapter = adapter
        self.layer = adapter.feature_module if adapter.capture == "output" else None
        self.layer_name = _module_name(self.model, self.layer) if self.layer is not None else None
        linears = [m for _, m in adapter.head_modules if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.fc_name = _module_name(self.model, linears[-1]) if len(linears) == 1 else None
        with torch.no_grad():
            self.top1 = self.model(self.x).argmax(dim=1)
        self.hw = (self.size, self.size)

    # -- methods ------------------------------------------------------------------------
    def methods(self, only: Optional[list[str]] = None) -> dict[str, Method]:
        """The callables of every method (or of ``only`` those), comparators imported lazily."""
        wanted = set(only or METHODS)
        out = self._cam_methods()
        if self.layer_name is not None and self.fc_name is not None and "torchcam" in wanted:
            out["torchcam"] = self._torchcam_method()
        if self.layer is not None and "gradcam" in wanted:
            out["gradcam"] = self._gradcam_method()
        if self.layer is not None and ("captum" in wanted or "captum_given" in wanted):
            out.update(self._captum_methods())
        return {k: v for k, v in out.items() if k in wanted}

    def _cam_methods(self) -> dict[str, Method]:
        torch, model, x, cam = self.torch, self.model, self.x, self.cam

        def forward() -> Any:
            with torch.inference_mode():
                return model(x)

        def cam_feature() -> Any:
            return cam(x).maps

        def cam_upsampled() -> Any:
            return cam(x).upsample().normalize().maps

        def cam_top5() -> Any:
            return cam(x, topk=5).upsample().normalize().maps

        def cam_all() -> Any:
            return cam(x, targets="all").maps

        return {
            "forward": forward,
            "cam_feature": cam_feature,
            "cam_upsampled": cam_upsampled,
            "cam_top5": cam_top5,
            "cam_all": cam_all,
        }

    def _torchcam_method(self) -> Method:
        import torch.nn.functional as F
        from torchcam import methods as torchcam_methods

        from cam_plugin import minmax_normalize

        torch, model, x, hw = self.torch, self.model, self.x, self.hw
        layer_name, fc_name = self.layer_name, self.fc_name

        def torchcam() -> Any:
            with torchcam_methods.CAM(model, target_layer=layer_name, fc_layer=fc_name) as ex:
                with torch.inference_mode():
                    scores = model(x)
                maps = ex(class_idx=scores.argmax(dim=1).tolist(), normalized=False)[0]
            up = F.interpolate(maps[:, None], size=hw, mode="bilinear", align_corners=False)
            return minmax_normalize(up)

        return torchcam

    def _gradcam_method(self) -> Method:
        from pytorch_grad_cam import GradCAM

        model, x, layer = self.model, self.x, self.layer

        def gradcam() -> Any:
            with GradCAM(model=model, target_layers=[layer]) as gc:
                maps = gc(input_tensor=x, targets=None)
            model.zero_grad(set_to_none=True)
            return maps

        return gradcam

    def _captum_methods(self) -> dict[str, Method]:
        from captum.attr import LayerAttribution, LayerGradCam

        from cam_plugin import minmax_normalize

        torch, model, x, hw, top1 = self.torch, self.model, self.x, self.hw, self.top1
        lgc = LayerGradCam(model, self.layer)

        def captum_given() -> Any:
            attr = lgc.attribute(x, target=top1)
            up = LayerAttribution.interpolate(attr, hw, interpolate_mode="bilinear")
            return minmax_normalize(up.detach())

        def captum() -> Any:
            # LayerGradCam needs the target before its pass: the top-1 class costs a
            # forward first (CAM, torchcam and grad-cam read it off their own pass)
            with torch.no_grad():  # an inference tensor could not index autograd's output
                target = model(x).argmax(dim=1)
            attr = lgc.attribute(x, target=target)
            up = LayerAttribution.interpolate(attr, hw, interpolate_mode="bilinear")
            return minmax_normalize(up.detach())

        return {"captum": captum, "captum_given": captum_given}

    # -- agreement ----------------------------------------------------------------------
    def agreement(self, methods: dict[str, Method]) -> dict[str, dict[str, Any]]:
        """Maps of torchcam / grad-cam / Captum against cam-plugin's, before any timing."""
        res = self.cam(self.x)
        ours = res.maps[:, 0].float()
        out: dict[str, dict[str, Any]] = {}
        if "torchcam" in methods:
            out["torchcam"] = self._agree_torchcam(res, ours)
        if "gradcam" in methods:
            out["gradcam"] = self._agree_gradcam(res, ours)
        if "captum" in methods:
            out["captum"] = self._agree_captum(ours)
            out["captum_given"] = out["captum"]
        return out

    def _agree_torchcam(self, res: Any, ours: Any) -> dict[str, Any]:
        from torchcam import methods as torchcam_methods

        torch = self.torch
        with torchcam_methods.CAM(self.model, self.layer_name, self.fc_name) as ex:
            with torch.inference_mode():
                scores = self.model(self.x)
            theirs = ex(class_idx=scores.argmax(dim=1).tolist(), normalized=False)[0]
        err = float((theirs.float() - ours).abs().max()) / float(ours.abs().max())
        return {
            "check": "top-1 map at feature resolution, torchcam normalized=False",
            "max_rel_err": err,
            "same_classes": bool(torch.equal(scores.argmax(1), res.classes[:, 0])),
            "agree": err <= 1e-4,
        }

    def _agree_gradcam(self, res: Any, ours: Any) -> dict[str, Any]:
        from pytorch_grad_cam import GradCAM

        with GradCAM(model=self.model, target_layers=[self.layer]) as gc:
            theirs_np = gc(input_tensor=self.x, targets=None)
        self.model.zero_grad(set_to_none=True)
        theirs = self.torch.from_numpy(theirs_np).float().to(ours.device)
        mine = res.relu().normalize().upsample(self.hw).normalize().maps[:, 0].float()
        corr = pearson(theirs, mine)
        return {
            "check": "relu -> min-max -> bilinear upsample (grad-cam resizes with OpenCV)",
            "min_corr": corr,
            "max_abs_err": float((theirs - mine).abs().max()),
            "agree": corr >= 0.999,
        }

    def _agree_captum(self, ours: Any) -> dict[str, Any]:
        import torch.nn.functional as F
        from captum.attr import LayerAttribution, LayerGradCam

        from cam_plugin import minmax_normalize

        attr = LayerGradCam(self.model, self.layer).attribute(self.x, target=self.top1)
        attr = attr.detach().float()
        h, w = ours.shape[-2:]
        err = float((attr[:, 0] * (h * w) - ours).abs().max()) / float(ours.abs().max())
        up_theirs = minmax_normalize(
            LayerAttribution.interpolate(attr, self.hw, interpolate_mode="bilinear")
        )
        up_mine = minmax_normalize(
            F.interpolate(ours[:, None], self.hw, mode="bilinear", align_corners=False)
        )
        return {
            "check": "LayerGradCam x h*w vs top-1 map (GAP: gradient = w/hw); then both "
            "bilinear + min-max",
            "max_rel_err": err,
            "max_abs_err_normalized": float((up_theirs - up_mine).abs().max()),
            "agree": err <= 1e-4,
        }

    # -- timing -------------------------------------------------------------------------
    def timer(self) -> Callable[[Method], float]:
        """Seconds one call takes: CUDA events around a synchronized call on a GPU, else
        ``time.perf_counter``."""
        torch = self.torch
        if self.device.startswith("cuda"):

            def cuda_time(fn: Method) -> float:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                return float(start.elapsed_time(end)) / 1000.0

            return cuda_time

        def cpu_time(fn: Method) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        return cpu_time
