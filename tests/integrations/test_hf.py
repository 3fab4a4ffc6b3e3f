"""HuggingFace transformers: the identity and an independent computation of the maps for
every supported ``*ForImageClassification`` family (tiny random configs, no downloads),
the DINOv2 split, the timm wrapper, the refusals by name, no probe of the user's model,
tuple outputs, and Captum's ClassActivationMap on an HF model."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Optional

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from helpers import Counted, assert_identity, images, randomize_head  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import cam_plugin as cp  # noqa: E402

transformers.logging.set_verbosity_error()
NUM_LABELS = 7
_VIT = dict(
    image_size=32,
    patch_size=8,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
)
_SWIN = dict(image_size=64, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)
_STAGES = dict(hidden_sizes=[8, 16], depths=[1, 1])


def build(class_name: str, config_name: str, **kwargs: Any) -> nn.Module:
    """``transformers.<class_name>`` from a tiny ``<config_name>(**kwargs)``, random weights
    with a non-trivial head (:func:`helpers.randomize_head`), in eval mode."""
    config = getattr(transformers, config_name)(num_labels=NUM_LABELS, **kwargs)
    torch.manual_seed(0)
    return randomize_head(getattr(transformers, class_name)(config)).eval()


def _linear(module: nn.Module) -> nn.Linear:
    """The classifier's Linear (HF ResNet / RegNet / BiT wrap it as Flatten + Linear)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1, module
    return linears[0]


def _grid(tokens: Tensor) -> Tensor:
    """``(B, N, K)`` row-major patch tokens -> ``(B, K, h, w)`` (square grid)."""
    side = int(round(tokens.shape[1] ** 0.5))
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def _by_hand(
    f: Tensor, fc: nn.Linear, norm: Optional[nn.LayerNorm] = None
) -> tuple[Tensor, Tensor]:
    """All-class maps ``M_c = Σ_k w_ck f_k`` and the bias, written out here; with a
    LayerNorm after the pool: ``M_c = Σ_k w_ck γ_k (f_k − μ) / σ`` with ``μ``, ``σ`` of the
    pooled vector, bias ``b + W β``."""
    w, b = fc.weight, fc.bias
    if norm is not None:
        pooled = f.mean(dim=(2, 3))
        mu = pooled.mean(dim=1)[:, None, None, None]
        sigma = torch.sqrt(pooled.var(dim=1, unbiased=False) + norm.eps)[:, None, None, None]
        f = (f - mu) / sigma * norm.weight[None, :, None, None]
        b = b + w @ norm.bias
    return torch.einsum("ck,bkhw->bchw", w, f), b


# The feature map each model's own pooling receives, from its base model's
# last_hidden_state (a second forward, independent of the library's capture):
#   "nchw": (B, K, h, w); "tokens:<p>": (B, p + N, K) tokens, the first p skipped.
# (id, class, config, config kwargs, input side, base attribute, layout, head LayerNorm path)
FAMILIES = [
    ("resnet", "ResNetForImageClassification", "ResNetConfig",
     dict(_STAGES, embedding_size=8, layer_type="basic"), 64, "resnet", "nchw", None),
    ("regnet", "RegNetForImageClassification", "RegNetConfig",
     dict(_STAGES, embedding_size=8, groups_width=8), 64, "regnet", "nchw", None),
    ("bit", "BitForImageClassification", "BitConfig",
     dict(_STAGES, embedding_size=8, num_groups=2), 64, "bit", "nchw", None),
    ("mobilenet_v1", "MobileNetV1ForImageClassification", "MobileNetV1Config",
     dict(depth_multiplier=0.25, image_size=64), 64, "mobilenet_v1", "nchw", None),
    ("mobilenet_v2", "MobileNetV2ForImageClassification", "MobileNetV2Config",
     dict(depth_multiplier=0.25, image_size=64), 64, "mobilenet_v2", "nchw", None),
    ("convnext", "ConvNextForImageClassification", "ConvNextConfig",
     dict(_STAGES, num_stages=2), 64, "convnext", "nchw", "convnext.layernorm"),
    ("convnextv2", "ConvNextV2ForImageClassification", "ConvNextV2Config",
     dict(_STAGES, num_stages=2), 64, "convnextv2", "nchw", "convnextv2.layernorm"),
    ("swin", "SwinForImageClassification", "SwinConfig", _SWIN, 64, "swin", "tokens:0", None),
    ("swinv2", "Swinv2ForImageClassification", "Swinv2Config",
     _SWIN, 64, "swinv2", "tokens:0", None),
    ("focalnet", "FocalNetForImageClassification", "FocalNetConfig",
     dict(embed_dim=8, depths=[1, 1], image_size=64), 64, "focalnet", "tokens:0", None),
    ("mobilevit", "MobileViTForImageClassification", "MobileViTConfig",
     dict(image_size=64, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16]),
     64, "mobilevit", "nchw", None),
    ("mobilevitv2", "MobileViTV2ForImageClassification", "MobileViTV2Config",
     dict(image_size=64, width_multiplier=0.25), 64, "mobilevitv2", "nchw", None),
    ("efficientnet", "EfficientNetForImageClassification", "EfficientNetConfig",
     dict(image_size=64, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128),
     64, "efficientnet", "nchw", None),
    ("beit", "BeitForImageClassification", "BeitConfig",
     dict(_VIT, use_mean_pooling=True), 32, "beit", "tokens:1", "beit.pooler.layernorm"),
    ("data2vec", "Data2VecVisionForImageClassification", "Data2VecVisionConfig",
     dict(_VIT, use_mean_pooling=True), 32, "data2vec_vision", "tokens:1",
     "data2vec_vision.pooler.layernorm"),
    ("clip", "CLIPForImageClassification", "CLIPConfig",
     dict(vision_config=_VIT), 32, "vision_model", "tokens:1", None),
    ("siglip", "SiglipForImageClassification", "SiglipConfig",
     dict(vision_config=_VIT), 32, "vision_model", "tokens:0", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("cls", "config", "kwargs", "size", "base", "layout", "norm"),
    [f[1:] for f in FAMILIES],
    ids=[f[0] for f in FAMILIES],
)
def test_family_identity_and_independent_maps(
    cls: str, config: str, kwargs: dict, size: int, base: str, layout: str, norm: Optional[str]
) -> None:
    model = build(cls, config, **kwargs)
    x = images(2, size)
    cam = cp.CAM(model)
    res = cam(x, targets="all")  # resolved from this first call
    assert cam.adapter.name.startswith(f"transformers:{cls}")
    assert res.maps.shape[:2] == (2, NUM_LABELS)
    with torch.no_grad():
        logits = model(x).logits
        f = getattr(model, base)(x).last_hidden_state
    torch.testing.assert_close(res.logits, logits)
    assert_identity(res)
    if layout.startswith("tokens"):
        f = _grid(f[:, int(layout.split(":")[1]) :])
    ln = model.get_submodule(norm) if norm else None
    expected, bias = _by_hand(f, _linear(model.classifier), ln)
    assert float(expected.std()) > 1e-3  # the maps are not trivially zero
    torch.testing.assert_close(res.maps, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.bias, bias.expand(2, -1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("registers", [0, 2])
def test_dinov2_exact_split_patch_cam_and_cls_constant(registers: int) -> None:
    """DINOv2 classifies ``[CLS, mean(tokens)]``: the map is the patch half, and the CLS
    half (with the registers' share when the model averages them too) is a per-image
    constant reported in ``res.bias``; ``mean_xy M_c + bias_c = S_c`` per image."""
    if registers:
        model = build(
            "Dinov2WithRegistersForImageClassification",
            "Dinov2WithRegistersConfig",
            num_register_tokens=registers,
            mlp_ratio=1,
            **_VIT,
        )
    else:
        model = build("Dinov2ForImageClassification", "Dinov2Config", mlp_ratio=1, **_VIT)
    x = images(2, 32)
    res = cp.CAM(model)(x, targets="all")
    assert_identity(res)
    with torch.no_grad():
        logits = model(x).logits
        tokens = model.base_model(x).last_hidden_state  # after the final layernorm
    torch.testing.assert_close(res.logits, logits)
    fc, k = model.classifier, tokens.shape[-1]
    w_cls, w_p = fc.weight[:, :k], fc.weight[:, k:]
    patches = tokens[:, 1 + registers :]
    # the model's own mean: its linear input, read back from the classifier's input
    seen: list[Tensor] = []
    handle = fc.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    cls_token, pooled = seen[0][:, :k], seen[0][:, k:]
    n = patches.shape[1]
    share = n / (n + pooled_registers(model, tokens, pooled))  # the patches' share of the mean
    expected = torch.einsum("ck,bkhw->bchw", w_p, _grid(patches)) * share
    constant = fc.bias + cls_token @ w_cls.t() + (pooled - share * patches.mean(dim=1)) @ w_p.t()
    torch.testing.assert_close(res.maps, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.bias, constant, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(res.bias[0], res.bias[1])  # a per-image constant


def pooled_registers(model: nn.Module, tokens: Tensor, pooled: Tensor) -> int:
    """How many register tokens the model's mean includes (0, or all of them: transformers
    < 4.52 averages ``sequence_output[:, 1:]``), read from the model's own pooled vector."""
    registers = int(getattr(model.config, "num_register_tokens", 0) or 0)
    with_registers = tokens[:, 1:].mean(dim=1)
    return registers if torch.allclose(pooled, with_registers, atol=1e-6) else 0


def test_timm_wrapper_goes_through_the_timm_adapter() -> None:
    pytest.importorskip("timm")
    model = build(
        "TimmWrapperForImageClassification", "TimmWrapperConfig", architecture="resnet10t"
    )
    x = images(2, 64)
    cam = cp.CAM(model)
    res = cam(x, targets="all")
    assert "timm:resnet10t" in cam.adapter.name and cam.adapter.feature_name == "layer4"
    assert_identity(res)
    inner = model.timm_model
    with torch.no_grad():
        expected, bias = _by_hand(inner.forward_features(x), inner.get_classifier())
        torch.testing.assert_close(res.logits, model(x).logits)
    torch.testing.assert_close(res.maps, expected, rtol=1e-4, atol=1e-4)


# (class, config, kwargs, what the message names)
REFUSED = [
    ("ViTForImageClassification", "ViTConfig", _VIT, "CLS token"),
    ("DeiTForImageClassification", "DeiTConfig", _VIT, "CLS token"),
    ("DeiTForImageClassificationWithTeacher", "DeiTConfig", _VIT, "distillation token"),
    ("ViTMSNForImageClassification", "ViTMSNConfig", _VIT, "CLS token"),
    ("BeitForImageClassification", "BeitConfig", dict(_VIT, use_mean_pooling=False),
     "use_mean_pooling"),
    ("CvtForImageClassification", "CvtConfig",
     dict(embed_dim=[8, 16, 16], num_heads=[1, 1, 1], depth=[1, 2, 3]), "cls_token"),
    ("EfficientNetForImageClassification", "EfficientNetConfig",
     dict(width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, pooling_type="max"),
     "max"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("cls", "config", "kwargs", "names"), REFUSED, ids=[f"{r[0]}-{r[3]}" for r in REFUSED]
)
def test_cls_token_and_max_heads_refused_by_name(
    cls: str, config: str, kwargs: dict, names: str
) -> None:
    model = build(cls, config, **kwargs)
    counted = Counted(model)
    try:
        with pytest.raises(cp.UnsupportedHeadError, match=cls) as info:
            cp.CAM(model)  # refused from the class and config: no forward needed
    finally:
        counted.remove()
    assert names in str(info.value) and "cam_plugin.convert" in str(info.value)
    assert counted.counts() == (0, 0, 0)


def test_no_probe_one_forward_per_call_and_tuple_outputs() -> None:
    """CAM(model) runs nothing; the first call runs the model once (the adapter is read
    from that forward); ``return_dict=False`` (a tuple output) gives the same maps."""
    model = build("ResNetForImageClassification", "ResNetConfig", embedding_size=8, **_STAGES)
    counted = Counted(model)
    try:
        cam = cp.CAM(model)
        assert not cam.resolved and counted.counts() == (0, 0, 0)
        res = cam(images(2, 64))
        assert counted.counts() == (1, 1, 1)
    finally:
        counted.remove()
    model.config.return_dict = False
    try:
        again = cp.CAM(model)(images(2, 64))
    finally:
        model.config.return_dict = True
    torch.testing.assert_close(again.maps, res.maps)
    assert cp.count_hooks(model) == 0


def test_explicit_resolve_honours_input_size() -> None:
    model = build("SwinForImageClassification", "SwinConfig", **dict(_SWIN, image_size=32))
    adapter = cp.resolve(model, input_size=(3, 48, 48))
    assert adapter.input_size == (3, 48, 48) and adapter.feature_name == "swin.layernorm"


def test_captum_class_activation_map_on_an_hf_model() -> None:
    pytest.importorskip("captum")
    from cam_plugin.integrations.captum import ClassActivationMap

    model = build("ConvNextForImageClassification", "ConvNextConfig", num_stages=2, **_STAGES)
    x = images(3, 64)
    attr = ClassActivationMap(model).attribute(x, target=[1, 2, 3])
    res = cp.CAM(model)(x, targets=[1, 2, 3])
    assert attr.shape == (3, 1, 8, 8)
    torch.testing.assert_close(attr, res.maps)


def test_hf_integration_loads_lazily() -> None:
    code = (
        "import sys, cam_plugin as cp, transformers as T\n"
        "assert 'cam_plugin.integrations.hf' not in sys.modules\n"
        "c = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])\n"
        "m = T.ResNetForImageClassification(c).eval()\n"
        "cam = cp.CAM(m)\n"
        "assert 'cam_plugin.integrations.hf' in sys.modules\n"
        "assert 'cam_plugin.integrations.timm' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def test_cam_input_size_reaches_the_hf_probe() -> None:
    """``CAM(model, input_size=...)``: the probe of ``cam.resolve()`` (no example) runs at
    that size, not the config's ``image_size``."""
    model = build("SwinForImageClassification", "SwinConfig", **dict(_SWIN, image_size=32))
    cam = cp.CAM(model, input_size=(3, 48, 48))
    cam.resolve()
    assert cam.adapter.input_size == (3, 48, 48)
    res = cam(images(1, 48))
    assert res.maps.shape[-2:] == (6, 6)  # 48 px / patch 4 / one merge


# -- image processors: the model's own preprocessing and the way back ----------------------
PHOTO_HW = (60, 100)  # non-square: short side is the height


def _photo(seed: int = 0) -> Any:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (*PHOTO_HW, 3), dtype=np.uint8)


# (processor class, kwargs, (resized h, w), (crop h, w)) -- the sizes computed by hand for a
# 60 x 100 photo from each processor's documented resize / crop:
PROCESSORS = [
    # ConvNeXt: short side int(64 / 0.875) = 73, long int(73 * 100 / 60) = 121; crop 64
    (
        "ConvNextImageProcessor",
        dict(size={"shortest_edge": 64}, crop_pct=0.875),
        (73, 121),
        (64, 64),
    ),
    # ConvNeXt at >= 384 warps to a square (no crop)
    ("ConvNextImageProcessor", dict(size={"shortest_edge": 384}), (384, 384), (384, 384)),
    # ViT-style size + crop_size (BEiT): warp to 80 x 96, crop 64
    (
        "BeitImageProcessor",
        dict(size={"height": 80, "width": 96}, crop_size={"height": 64, "width": 64}),
        (80, 96),
        (64, 64),
    ),
    # BiT / DINOv2: short side 72 (long int(72 * 100 / 60) = 120), crop 64
    (
        "BitImageProcessor",
        dict(size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64}),
        (72, 120),
        (64, 64),
    ),
    # ViT / Swin: a plain resize, both axes scaled differently
    ("ViTImageProcessor", dict(size={"height": 48, "width": 64}), (48, 64), (48, 64)),
]


def _processed_by_hand(
    photo: Any, processor: Any, resized: tuple[int, int], crop: tuple[int, int]
) -> Tensor:
    """Pillow resize to ``resized``, centre crop ``(r - c) // 2``, rescale, normalize."""
    import numpy as np
    from PIL import Image

    (rh, rw), (ch, cw) = resized, crop
    top, left = (rh - ch) // 2, (rw - cw) // 2
    pic = Image.fromarray(photo).resize((rw, rh), Image.Resampling(int(processor.resample)))
    x = np.asarray(pic.crop((left, top, left + cw, top + ch)), np.float32) / 255.0
    mean = np.asarray(processor.image_mean, np.float32)
    x = ((x - mean) / np.asarray(processor.image_std, np.float32)).astype(np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


@pytest.mark.parametrize(
    "name, kwargs, resized, crop", PROCESSORS, ids=[f"{p[0]}-{p[2][0]}" for p in PROCESSORS]
)
def test_image_processor_preprocess_and_to_original_within_a_pixel(
    name: str, kwargs: dict[str, Any], resized: tuple[int, int], crop: tuple[int, int]
) -> None:
    """``CAM(model, preprocess=processor)`` on a non-square photo: the input is the
    processor's (equal to a by-hand Pillow resize + centre crop), the maps equal the tensor
    path, and a square marked on the input lands on the photo where the by-hand geometry
    puts it (within a pixel)."""
    from dataclasses import replace

    processor = getattr(transformers, name)(**kwargs)
    model = build("ResNetForImageClassification", "ResNetConfig", embedding_size=8, **_STAGES)
    photo = _photo()
    x = _processed_by_hand(photo, processor, resized, crop)[None]
    cam: Any = cp.CAM(model, preprocess=processor)
    res = cam(photo, targets="all")
    torch.testing.assert_close(res.maps, cam(x, targets="all").maps, rtol=1e-4, atol=1e-4)
    assert res.originals is not None
    prepared = res.originals[0]
    (rh, rw), (ch, cw) = resized, crop
    top, left = (rh - ch) // 2, (rw - cw) // 2
    sy, sx = rh / PHOTO_HW[0], rw / PHOTO_HW[1]
    assert (prepared.top, prepared.left) == (top, left)
    assert prepared.scales == pytest.approx((sy, sx))
    up = res.upsample(placement="bilinear")
    marked = torch.zeros_like(up.maps)
    y0, y1, x0, x1 = ch // 4, ch // 2, cw // 4, cw // 2  # crop pixels [y0, y1) x [x0, x1)
    marked[..., y0:y1, x0:x1] = 1.0
    on_photo = replace(up, maps=marked).to_original(fill=-1.0)[0][0]
    assert on_photo.shape == PHOTO_HW
    ys, xs = torch.nonzero(on_photo > 0.5, as_tuple=True)
    assert abs(int(xs.min()) - (x0 + left) / sx) <= 1
    assert abs(int(xs.max()) + 1 - (x1 + left) / sx) <= 1
    assert abs(int(ys.min()) - (y0 + top) / sy) <= 1
    assert abs(int(ys.max()) + 1 - (y1 + top) / sy) <= 1
    box = prepared.to_original([x0, y0, x1, y1])
    want = [(x0 + left) / sx, (y0 + top) / sy, (x1 + left) / sx, (y1 + top) / sy]
    assert max(abs(a - b) for a, b in zip(box, want)) <= 0.1


def test_model_from_a_directory_uses_its_image_processor(tmp_path: Any) -> None:
    """A model loaded from a directory with a ``preprocessor_config.json``: ``"auto"``
    preprocessing is that processor (as timm's data config is for timm models); the
    config carries it as JSON, so it rebuilds the same preprocessing; ``--input-size`` /
    ``--crop-pct`` overrides edit the processor; a processor whose resize is not modelled is
    refused with what to do."""
    from cam_plugin.preprocess import DataConfig, Preprocess

    model: Any = build("ResNetForImageClassification", "ResNetConfig", embedding_size=8, **_STAGES)
    model.save_pretrained(tmp_path)
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    processor.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    config = DataConfig.for_model(loaded)
    assert config.processor is not None and config.input_size == (3, 64, 64)
    assert "preprocessor_config.json" in config.source
    photo = _photo(1)
    auto = cp.CAM(loaded)(photo, targets="all")  # type: ignore[arg-type]
    given = cp.CAM(loaded, preprocess=processor)(photo, targets="all")  # type: ignore[arg-type]
    torch.testing.assert_close(auto.maps, given.maps)
    fields: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in config.to_dict().items()
    }
    again = DataConfig(**fields)
    from cam_plugin.images import decode_array

    a, b = Preprocess(config)(decode_array(photo)), Preprocess(again)(decode_array(photo))
    torch.testing.assert_close(a.tensor, b.tensor)
    bigger = config.with_overrides(input_size=48, crop_pct=1.0)
    assert bigger.input_size == (3, 48, 48) and bigger.processor is not None
    assert Preprocess(bigger)(decode_array(photo)).tensor.shape == (3, 48, 48)
    vit = DataConfig.for_model(loaded)  # unchanged by the override
    assert vit.input_size == (3, 64, 64)
    with pytest.raises(cp.CAMInputError, match="LevitImageProcessor.*DataConfig"):
        cp.CAM(loaded, preprocess=transformers.LevitImageProcessor())(photo)  # type: ignore[arg-type]


def test_fast_processors_geometry_equals_a_by_hand_torchvision_resize_and_crop() -> None:
    """The torchvision-based ``*Fast`` processors round the crop offset
    (``int(round((r - c) / 2))``: 11 -> 6, where the slow ones take 5): the input equals a
    by-hand torchvision resize + crop at the geometry cam-plugin records."""
    import numpy as np
    from cam_plugin.integrations.hf_processor import ProcessorPreprocess, processor_geometry

    from cam_plugin.images import decode_array

    tv = pytest.importorskip("torchvision.transforms.v2.functional")

    photo = np.random.default_rng(0).integers(0, 256, (61, 107, 3), dtype=np.uint8)
    cases = [
        (transformers.ConvNextImageProcessorFast(size={"shortest_edge": 64}), (73, 128), 4, 32),
        (
            transformers.CLIPImageProcessorFast(
                size={"shortest_edge": 70}, crop_size={"height": 59, "width": 59}
            ),
            (70, 122),
            6,
            32,
        ),
    ]
    for processor, resized, top, left in cases:
        geo = processor_geometry(processor, 61, 107)
        assert (geo.resized, geo.top, geo.left) == (resized, top, left)
        mode = {2: tv.InterpolationMode.BILINEAR, 3: tv.InterpolationMode.BICUBIC}
        t = tv.resize(
            torch.from_numpy(photo).permute(2, 0, 1),
            list(resized),
            interpolation=mode[int(processor.resample)],
            antialias=True,
        )
        (h, w) = geo.output
        crop = t[:, top : top + h, left : left + w].float() / 255.0
        mean = torch.tensor(processor.image_mean)[:, None, None]
        want = (crop - mean) / torch.tensor(processor.image_std)[:, None, None]
        got = ProcessorPreprocess(processor)(decode_array(photo)).tensor
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_input_size_and_crop_pct_overrides_edit_the_processor() -> None:
    """``--input-size`` / ``--crop-pct`` on a processor's config: the crop becomes the
    input size, the resize follows (scaled, or crop / crop_pct); a processor that does not
    crop refuses ``crop_pct``."""
    from cam_plugin.integrations.hf_processor import data_config

    bit = transformers.BitImageProcessor(
        size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64}
    )
    config = data_config(bit, "test")
    smaller = config.with_overrides(input_size=48)
    assert smaller.input_size == (3, 48, 48) and smaller.processor is not None
    assert smaller.processor["size"] == {"shortest_edge": 54}
    assert smaller.processor["crop_size"] == {"height": 48, "width": 48}
    wide = config.with_overrides(crop_pct=0.5)
    assert wide.processor is not None and wide.processor["size"] == {"shortest_edge": 128}
    vit = data_config(transformers.ViTImageProcessor(size={"height": 48, "width": 64}), "t")
    assert vit.input_size == (3, 48, 64)
    assert vit.with_overrides(input_size=32).input_size == (3, 32, 32)
    with pytest.raises(cp.CAMInputError, match="does not centre-crop"):
        vit.with_overrides(crop_pct=0.5)
