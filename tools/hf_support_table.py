"""Which transformers image classifiers cam-plugin resolves: writes docs/hf-support.md.

For every class in the installed transformers' image-classification mapping
(``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``; no downloads, random weights):

1. the model is built from a small random config (:data:`TINY`: the family's config with
   tiny widths and depths); a class that does not build here is listed with the reason;
2. the classifier's weights and bias are redrawn (``N(0, 0.5)``) so that the logits are
   not near zero, and every model is put in eval mode;
3. ``cam_plugin.CAM(model)(images, targets="all")`` resolves the model from that first
   call, and the identity ``mean_xy M_c + bias_c == logit_c`` is checked for every class
   of two random images against the model's own ``ImageClassifierOutput.logits``
   (relative error ``max |mean M + bias - S| / max(1, |S|)`` at most 1e-4);
4. a refusal reports the library's own message (the first sentence).

Run: ``.venv/bin/python tools/hf_support_table.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from cam_plugin.integrations.hf import REFUSED, hf_input_size, hf_logits, refusal
from torch import Tensor, nn
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

import cam_plugin as cp

BEGIN, END = "<!-- table:begin -->", "<!-- table:end -->"
TOLERANCE = 1e-4
SIZE = 64  # input side when the config names no image size

_VIT = dict(
    image_size=32,
    patch_size=8,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
)
_FOUR = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 16, 16])

#: model type -> config overrides giving a small, quick model
TINY: dict[str, dict[str, Any]] = {
    "beit": dict(_VIT, use_mean_pooling=True),
    "bit": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=2),
    "clip": dict(vision_config=dict(_VIT)),
    "convnext": dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=64),
    "convnextv2": dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=64),
    "cvt": dict(embed_dim=[8, 16, 16], num_heads=[1, 1, 1], depth=[1, 2, 3]),
    "data2vec-vision": dict(_VIT, use_mean_pooling=True),
    "deit": dict(_VIT),
    "dinat": dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]),
    "dinov2": dict(_VIT, mlp_ratio=1),
    "dinov2_with_registers": dict(_VIT, mlp_ratio=1, num_register_tokens=2),
    "efficientformer": dict(
        hidden_sizes=[8, 16, 16, 32],
        depths=[1, 1, 1, 2],
        dim=32,
        hidden_size=32,
        key_dim=8,
        num_attention_heads=2,
        image_size=64,
        resolution=2,
    ),
    "efficientnet": dict(
        image_size=64, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128
    ),
    "focalnet": dict(embed_dim=8, depths=[1, 1], image_size=64),
    "hiera": dict(embed_dim=8, depths=[1, 1, 1, 1], image_size=[64, 64]),
    "ijepa": dict(_VIT),
    "imagegpt": dict(n_embd=16, n_layer=1, n_head=2, n_positions=64),
    "levit": dict(
        image_size=128,
        hidden_sizes=[16, 32, 48],
        num_attention_heads=[1, 2, 3],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
        down_ops=[["Subsample", 8, 1, 4, 2, 2], ["Subsample", 8, 2, 4, 2, 2]],
    ),
    "mobilenet_v1": dict(depth_multiplier=0.25, image_size=64),
    "mobilenet_v2": dict(depth_multiplier=0.25, image_size=64),
    "mobilevit": dict(
        image_size=64, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16]
    ),
    "mobilevitv2": dict(image_size=64, width_multiplier=0.25),
    "nat": dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]),
    "perceiver": dict(
        num_latents=4,
        d_latents=16,
        d_model=16,
        num_self_attends_per_block=1,
        num_self_attention_heads=1,
        num_cross_attention_heads=1,
        image_size=32,
    ),
    "poolformer": dict(_FOUR),
    "pvt": dict(_FOUR, image_size=64, num_attention_heads=[1, 1, 1, 1]),
    "pvt_v2": dict(_FOUR, image_size=64, num_attention_heads=[1, 1, 1, 1]),
    "regnet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8),
    "resnet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
    "segformer": dict(_FOUR, num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16),
    "siglip": dict(vision_config=dict(_VIT)),
    "siglip2": dict(vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)),
    "swiftformer": dict(depths=[1, 1, 1, 1], embed_dims=[8, 16, 16, 16], image_size=64),
    "swin": dict(image_size=64, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4),
    "swinv2": dict(image_size=64, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4),
    "textnet": dict(
        stem_out_channels=8,
        hidden_sizes=[8, 8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        conv_layer_kernel_sizes=[[[3, 3]], [[3, 3]], [[3, 3]], [[3, 3]]],
        conv_layer_strides=[[1], [2], [2], [2]],
        image_size=[64, 64],
    ),
    "timm_wrapper": dict(architecture="resnet10t"),
    "van": dict(_FOUR, mlp_ratios=[2, 2, 2, 2], image_size=64),
    "vit": dict(_VIT),
    "vit_hybrid": dict(
        _VIT,
        patch_size=1,
        backbone_config=dict(
            model_type="bit",
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_groups=2,
            out_features=["stage2"],
            layer_type="bottleneck",
        ),
    ),
    "vit_msn": dict(_VIT),
}
#: classes not built here, and why
NOT_BUILT = {
    "ShieldGemma2ForImageClassification": "(by name, not built: a Gemma 3 vision-language "
    "model) scores the answer of a vision-language model, not a pooled feature map",
}


def classes() -> list[tuple[str, str]]:
    """``(model type, class name)`` of every image classifier the installed transformers
    maps, in mapping order."""
    out: list[tuple[str, str]] = []
    for model_type, names in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.items():
        for name in (names,) if isinstance(names, str) else names:
            out.append((model_type, name))
    return out


def build(model_type: str, class_name: str) -> nn.Module:
    """The class built from its tiny random config, classifier redrawn, in eval mode."""
    config = transformers.AutoConfig.for_model(model_type, **TINY.get(model_type, {}))
    config.num_labels = 5
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config)
    _nontrivial(model, config.num_labels)
    return model.eval()


def _nontrivial(model: nn.Module, num_labels: int) -> None:
    """Random weights whose maps and logits are far from zero: convolutions He-initialised,
    norms' affine parameters and BatchNorm statistics redrawn, the classifier ``N(0, 0.5)``."""
    gen = torch.Generator().manual_seed(0)

    def draw(t: Tensor, mean: float, std: float) -> None:
        t.copy_(mean + std * torch.randn(t.shape, generator=gen))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
                if m.weight is not None:
                    draw(m.weight, 1.0, 0.3)
                if m.bias is not None:
                    draw(m.bias, 0.0, 0.3)
                mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
                if isinstance(mean, Tensor) and isinstance(var, Tensor):
                    draw(mean, 0.0, 0.1)
                    var.copy_(0.5 + torch.rand(var.shape, generator=gen))
            elif isinstance(m, nn.Linear) and m.out_features == num_labels:
                draw(m.weight, 0.0, 0.5)
                if m.bias is not None:
                    draw(m.bias, 0.0, 0.5)


def _images(model: nn.Module) -> Tensor:
    config: Any = model.config
    vision = getattr(config, "vision_config", None)
    size = getattr(config, "image_size", None) or getattr(vision, "image_size", None)
    c, h, w = hf_input_size(model) if size else (3, SIZE, SIZE)
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, c, h, w, generator=gen)


def _first_sentence(message: str) -> str:
    return message.split(" CAM is exact only")[0].strip()


def check(model_type: str, class_name: str) -> dict[str, Any]:
    """One table row: build, resolve through ``CAM(model)``, check the identity."""
    row: dict[str, Any] = {"type": model_type, "name": class_name}
    if class_name in NOT_BUILT:
        return dict(row, status="refused", detail=NOT_BUILT[class_name])
    try:
        model = build(model_type, class_name)
    except Exception as err:  # a class that does not build here is listed, not hidden
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        why = f"{type(err).__name__}: {first}"[:200]
        if class_name in REFUSED:
            return dict(row, status="refused", detail=f"(by name) {REFUSED[class_name]}; {why}")
        return dict(row, status="not built", detail=why)
    row["params_k"] = round(sum(p.numel() for p in model.parameters()) / 1e3, 1)
    named = refusal(model)
    x = _images(model)
    try:
        cp.resolve(model, example=x)  # the reading CAM's first call makes, errors as they are
        cam = cp.CAM(model)
        res = cam(x, targets="all")
        adapter = cam.adapter
    except cp.UnsupportedHeadError as err:
        by = "by name" if named else "by discovery"
        return dict(row, status="refused", detail=f"({by}) {_first_sentence(str(err))}"[:300])
    except Exception as err:
        return dict(row, status="not resolved", detail=f"{type(err).__name__}: {err}"[:300])
    with torch.no_grad():
        logits = hf_logits(model(x))
    worst = float((res.maps.mean(dim=(2, 3)) + res.bias - logits).abs().max())
    rel = worst / max(1.0, float(logits.abs().max()))
    kind = str(adapter.layout.kind)
    if kind == "tokens":
        kind += f", {adapter.layout.num_prefix_tokens} prefix"
    h, w = res.maps.shape[-2:]
    status = "resolved" if rel <= TOLERANCE else "identity fails"
    spread = float(res.maps.std())
    if spread < 1e-4 and status == "resolved":
        status = "resolved (maps ~0 here)"
    detail = (
        f"`{adapter.feature_name}` ({kind}), maps {h}x{w} at {x.shape[-2]}x{x.shape[-1]} "
        f"(std {spread:.2g}), identity {rel:.1e}"
    )
    return dict(row, status=status, detail=detail)


def render(rows: list[dict[str, Any]], version: str) -> str:
    """The markdown table (with a count per status)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [
        f"Generated by `tools/hf_support_table.py` on {datetime.date.today()} with transformers "
        f"{version}, Python {platform.python_version()}: {len(rows)} classes from "
        "`MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES`.",
        "",
        "| status | count |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(counts.items())],
        "",
        "| class | model type | params (k) | status | detail |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        detail = str(r.get("detail", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| `{r['name']}` | {r['type']} | {r.get('params_k', '')} | {r['status']} | {detail} |"
        )
    return "\n".join(lines)


def write_page(page: Path, table: str) -> None:
    """Replace the table between the markers of ``page`` (the rest is kept)."""
    text = (
        page.read_text() if page.exists() else f"# transformers support table\n\n{BEGIN}\n{END}\n"
    )
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    page.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated class names (default: all)")
    parser.add_argument("--page", default="docs/hf-support.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    wanted = set(args.only.split(",")) if args.only else None
    rows = []
    for model_type, name in classes():
        if wanted is not None and name not in wanted:
            continue
        start = time.perf_counter()
        rows.append(check(model_type, name))
        took = time.perf_counter() - start
        print(f"{name}: {rows[-1]['status']} ({took:.1f} s) {rows[-1]['detail']}", flush=True)
    if wanted is None:
        write_page(Path(args.page), render(rows, transformers.__version__))
        print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
