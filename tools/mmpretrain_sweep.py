"""Resolve a set of mmpretrain model-zoo configs with ``cam_plugin.CAM`` and print the result.

Each config is built with random weights (``get_model(name, pretrained=False)``: nothing is
downloaded), run on a seeded ``(2, 3, 224, 224)`` batch with ``targets="all"``, and reported
as ``OK`` with the adapter's description, the map shape and the largest identity residual
``|mean_xy M_c + b_c − S_c|`` next to the largest logit, or as ``REFUSED`` with the reason
the library gives. ``--avg-featmap`` rebuilds the ViT-family configs with
``backbone.out_type='avg_featmap'``. docs/mmpretrain.md summarises a run.

Run: ``.venv/bin/python tools/mmpretrain_sweep.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import warnings

MODELS = [
    "resnet18_8xb32_in1k",
    "resnet50_8xb32_in1k",
    "resnext50-32x4d_8xb32_in1k",
    "seresnet50_8xb32_in1k",
    "regnetx-400mf_8xb128_in1k",
    "mobilenet-v2_8xb32_in1k",
    "mobilenet-v3-small_8xb128_in1k",
    "efficientnet-b0_3rdparty_8xb32_in1k",
    "efficientnetv2-b0_3rdparty_in1k",
    "shufflenet-v2-1x_16xb64_in1k",
    "densenet121_3rdparty_in1k",
    "hrnet-w18_3rdparty_8xb32_in1k",
    "mobileone-s0_8xb32_in1k",
    "poolformer-s12_3rdparty_32xb128_in1k",
    "riformer-s12_in1k",
    "swin-tiny_16xb64_in1k",
    "convnext-tiny_32xb128_in1k",
    "convnext-v2-atto_fcmae-pre_3rdparty_in1k",
    "edgenext-xxsmall_3rdparty_in1k",
    "tinyvit-5m_3rdparty_in1k",
    "levit-128s_3rdparty_in1k",
    "deit-tiny_4xb256_in1k",
    "vit-base-p16_32xb128-mae_in1k",
]
VIT_FAMILY = ("deit", "vit-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--avg-featmap", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import torch
    from mmengine.logging import MMLogger
    from mmpretrain import get_model, list_models

    import cam_plugin as cp

    MMLogger.get_current_instance().setLevel("WARNING")
    available = set(list_models())
    for name in args.models:
        if name not in available:
            print(f"MISSING  {name} (not in this mmpretrain's model zoo)")
            continue
        kwargs = {}
        if args.avg_featmap and name.startswith(VIT_FAMILY):
            kwargs = {"backbone": {"out_type": "avg_featmap"}}
        torch.manual_seed(0)
        model = get_model(name, pretrained=False, **kwargs).eval()
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        try:
            with cp.CAM(model) as cam:
                res = cam(x, targets="all")
        except cp.UnsupportedHeadError as err:
            print(f"REFUSED  {name}: {str(err)[:160]}")
            continue
        residual = float(res.identity_residual().abs().max())
        scale = float(res.logits.abs().max())
        print(
            f"OK       {name}: {cam.adapter.name}; maps {tuple(res.maps.shape)}; "
            f"residual {residual:.1e} (max |logit| {scale:.1e})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
