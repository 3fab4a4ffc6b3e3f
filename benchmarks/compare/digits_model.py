"""The cluttered-digits data set and model: ``benchmarks/wsol_digits.py``'s own generator,
network and training code, the trained weights cached in a checkpoint keyed by the recipe."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .config import ROOT, Config

#: fields of the localization benchmark's config that do not change the trained model
#: (evaluation and output); every other field is part of the checkpoint's recipe
NOT_RECIPE = frozenset(
    {
        "test_size",
        "threads",
        "eval_batch",
        "cam_curve_interval",
        "grid",
        "out_md",
        "out_png",
        "out_json",
        "methods",
    }
)


def load_wsol() -> Optional[Any]:
    """``benchmarks/wsol_digits.py`` as a module, or ``None`` (with a note) when the
    localization modules it needs are not importable."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import wsol_digits

        from cam_plugin import data, metrics  # noqa: F401  (the localization modules)
    except ImportError as err:
        print(f"[digits] skipped: {err}")
        return None
    finally:
        sys.path.pop(0)
    return wsol_digits


def recipe_of(wcfg: Any) -> dict[str, Any]:
    """The training recipe of a ``wsol_digits.Config`` (JSON-compatible, the cache key)."""
    fields = {k: v for k, v in asdict(wcfg).items() if k not in NOT_RECIPE}
    return dict(json.loads(json.dumps(fields, default=str)))


def digits_config(wsol: Any, cfg: Config) -> Any:
    """The ``wsol_digits.Config`` of this run: its ``QUICK`` recipe (lighter clutter, 112
    steps; ``digits_recipe="quick"``) or its full one (``"full"``), with the overrides."""
    base = wsol.QUICK if cfg.digits_recipe == "quick" else wsol.Config()
    wcfg = replace(base, test_size=cfg.digits_test, seed=cfg.seed, threads=cfg.threads)
    if cfg.digits_steps:
        wcfg = replace(wcfg, steps=cfg.digits_steps, warmup=min(base.warmup, cfg.digits_steps))
    if cfg.digits_train:
        wcfg = replace(wcfg, train_size=cfg.digits_train)
    return wcfg


def digits_model(wsol: Any, wcfg: Any, path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The benchmark's GAP model: loaded from ``path`` when it was trained with the same
    recipe, else trained with ``wsol_digits``' own ``build`` / ``train`` and saved there."""
    recipe = recipe_of(wcfg)
    model = wsol.build(wcfg, "avg")
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(saved, dict) and saved.get("recipe") == recipe:
            model.load_state_dict(saved["state_dict"])
            print(f"[digits] loaded the trained model from {path}", flush=True)
            return model.eval(), dict(saved.get("stats", {}), loaded=str(path))
    train_data = wsol.render("train", wcfg.train_size, wcfg)
    stats = wsol.train(model, train_data, wcfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"recipe": recipe, "state_dict": model.state_dict(), "stats": stats}, path)
    print(f"[digits] trained {wcfg.steps} steps in {stats['train_seconds']:.0f} s -> {path}")
    return model.eval(), dict(stats, loaded="")


def no_inplace_relu(model: nn.Module) -> nn.Module:
    """Gradient hooks (Captum's, grad-cam's) break on in-place ReLUs; same function, not in
    place."""
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model
