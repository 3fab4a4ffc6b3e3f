"""Generic adapter discovery with one probe forward pass.

For a model no registered adapter knows, :func:`discover` runs one forward pass on
a small random input (eval mode on every module, no autograd, the global RNG state
forked, every probe hook removed afterwards; the model's modes are restored) and
reads the structure off the calls it saw:

1. the last *leaf* module whose input is still spatial (``(B, K, h, w)`` with
   ``h·w > 1``, or ``(B, N, K)`` tokens) ends the trunk; when its output is pooled
   (``(B, K)`` or ``(B, K, 1, 1)``) it is the pooling module and its input is the
   feature map, otherwise its output is the feature map (the pool is functional);
2. every leaf module called after it is the head, folded by
   :func:`cam_plugin.heads.fold_head` (a non-affine module is refused by name);
3. the pooled vector the head receives must equal a global *average* of the feature
   map under one layout (NCHW, NHWC, tokens minus a prefix, optionally after a
   functional ReLU), otherwise the pooling is max / attention / CLS and is refused;
4. the folded head must reproduce the model's logits to ``1e-3·max(1, |S|)``.

The feature module is the outermost module whose output *is* the feature tensor
(e.g. ``layer4`` rather than its last ReLU); when none is, the pooling module's input
is captured instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .adapter import Adapter, BranchAverageAdapter, NamedModules
from .errors import CONVERT_HINT, AdapterNotFoundError, UnsupportedHeadError
from .hooks import CaptureKind
from .layout import FeatureLayout

__all__ = ["discover", "guess_input_size", "probe_input"]


@dataclass
class _Call:
    name: str
    module: nn.Module
    inp: Any
    out: Any
    leaf: bool


def _first_tensor(value: Any) -> Optional[Tensor]:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def _spatial(t: Optional[Tensor]) -> bool:
    if t is None:
        return False
    if t.dim() == 4:
        return t.shape[2] * t.shape[3] > 1
    if t.dim() == 3:
        return t.shape[1] > 1
    return False


def _pooled(t: Optional[Tensor]) -> bool:
    if t is None:
        return False
    return t.dim() == 2 or (t.dim() == 4 and t.shape[2] == 1 and t.shape[3] == 1)


def guess_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` for a probe: the model's pretrained config, its patch embedding's
    image size, else the first convolution's input channels at 224 x 224."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size") and len(cfg["input_size"]) == 3:
            c, h, w = (int(v) for v in cfg["input_size"])
            patch = getattr(model, "patch_embed", None)
            img = getattr(patch, "img_size", None)
            if isinstance(img, (tuple, list)) and len(img) == 2:
                h, w = int(img[0]), int(img[1])
            return c, h, w
    channels = 3
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            channels = m.in_channels
            break
    patch = getattr(model, "patch_embed", None)
    img = getattr(patch, "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2:
        return channels, int(img[0]), int(img[1])
    return channels, 224, 224


def probe_input(model: nn.Module, input_size: Sequence[int], batch: int = 2) -> Tensor:
    """A deterministic random probe batch on the model's device and dtype (the global RNG
    is not touched)."""
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *[int(v) for v in input_size]), generator=gen)
    return x.to(device=device, dtype=dtype)


def _trace(model: nn.Module, example: Tensor) -> tuple[list[_Call], Any]:
    names = {id(m): n for n, m in model.named_modules()}
    calls: list[_Call] = []
    handles = []

    def make_hook(module: nn.Module) -> Any:
        leaf = next(module.children(), None) is None

        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            inp = _first_tensor(args)
            calls.append(_Call(names.get(id(mod), "?"), mod, inp, output, leaf))

        return hook

    modes = {m: m.training for m in model.modules()}
    try:
        for m in model.modules():
            if m is not model:
                handles.append(m.register_forward_hook(make_hook(m)))
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            output = model(example)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return calls, output


def _layout_candidates(
    feats: Tensor, prefix_hint: Optional[int], relu_first: bool
) -> list[FeatureLayout]:
    relus = (True, False) if relu_first else (False, True)
    out: list[FeatureLayout] = []
    if feats.dim() == 4:
        for relu in relus:
            out += [FeatureLayout("NCHW", relu=relu), FeatureLayout("NHWC", relu=relu)]
    elif feats.dim() == 3:
        prefixes = [p for p in (prefix_hint, 0, 1, 2, 4, 5, 8) if p is not None]
        seen: list[int] = []
        for p in prefixes:
            if p not in seen and p < feats.shape[1]:
                seen.append(p)
        for relu in relus:
            out += [FeatureLayout("tokens", num_prefix_tokens=p, relu=relu) for p in seen]
    return out


def _close(a: Tensor, b: Tensor, rel: float = 1e-4) -> bool:
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(b.abs().max()))
    return bool((a.float() - b.float()).abs().max() <= rel * scale)


def _passes_through(call: _Call) -> bool:
    """A call that returns its input object (Dropout / Identity in eval mode)."""
    return _first_tensor(call.out) is call.inp


def _branches(head_calls: Sequence[_Call]) -> Optional[tuple[NamedModules, ...]]:
    """Split head calls that fork on one tensor into branches: the first tensor two head
    calls both take as input is the fork (calls that hand their input back unchanged, such
    as Dropout in eval mode, do not count); calls before its first consumer are shared and
    repeated at the start of every branch; a new branch starts at each consumer."""
    seen: dict[int, int] = {}
    fork: Optional[Tensor] = None
    for c in head_calls:
        if isinstance(c.inp, Tensor) and not _passes_through(c):
            seen[id(c.inp)] = seen.get(id(c.inp), 0) + 1
            if seen[id(c.inp)] == 2:
                fork = c.inp
                break
    if fork is None:
        return None
    starts = [i for i, c in enumerate(head_calls) if c.inp is fork and not _passes_through(c)]
    shared = [(c.name, c.module) for c in head_calls[: starts[0]]]
    bounds = [*starts, len(head_calls)]
    return tuple(
        tuple(shared + [(c.name, c.module) for c in head_calls[a:b]])
        for a, b in zip(bounds[:-1], bounds[1:])
    )


def _describe(calls: Sequence[_Call]) -> str:
    return " -> ".join(f"{c.name} ({type(c.module).__name__})" for c in calls) or "(none)"


def discover(
    model: nn.Module,
    example: Optional[Tensor] = None,
    *,
    input_size: Optional[Sequence[int]] = None,
    prefix_tokens: Optional[int] = None,
    name: str = "generic",
    probe_batch: int = 2,
) -> Adapter:
    """Find ``feature map -> global average pool -> affine head`` with one probe forward.

    Args:
        model: any ``nn.Module`` returning ``(B, C)`` logits.
        example: the probe batch; by default a random ``(2, *input_size)`` tensor.
        input_size: ``(C, H, W)`` for the probe (default: :func:`guess_input_size`).
        prefix_tokens: for token models, the number of prefix tokens to try first.
        name: adapter name to report.
        probe_batch: batch size of the default probe input.

    Raises:
        UnsupportedHeadError: the head after the feature map is not affine after an
            average pool (names the module and points to ``cam_plugin.convert``).
        AdapterNotFoundError: the structure could not be read (says why).
    """
    size = tuple(input_size) if input_size is not None else guess_input_size(model)
    x = example if example is not None else probe_input(model, size, batch=probe_batch)
    try:
        calls, output = _trace(model, x)
    except Exception as err:  # the probe itself failed: say so, with the cause
        raise AdapterNotFoundError(
            f"the generic probe forward with an input of shape {tuple(x.shape)} failed "
            f"({type(err).__name__}: {err}); pass input_size=(C, H, W) or register an adapter"
        ) from err
    logits = output if isinstance(output, Tensor) else None
    if logits is None or logits.dim() != 2:
        got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise AdapterNotFoundError(
            f"the model returns {got}, not (B, num_classes) logits; register an adapter "
            "with an output_fn"
        )
    leaves = [c for c in calls if c.leaf]
    trunk_end = next((i for i in range(len(leaves) - 1, -1, -1) if _spatial(leaves[i].inp)), None)
    if trunk_end is None:
        raise AdapterNotFoundError(
            "the probe saw no module that receives a spatial feature map (B, K, h, w) or "
            "tokens (B, N, K)"
        )
    last = leaves[trunk_end]
    out_t = _first_tensor(last.out)
    # candidate feature tensors, the first that pools to the head's input wins
    candidates: list[Tensor] = []
    if _pooled(out_t):
        pool_call: Optional[_Call] = last
        feats = last.inp
        head_calls = leaves[trunk_end + 1 :]
        target = out_t.flatten(1) if out_t is not None else None
    else:
        pool_call = None
        feats = out_t
        head_calls = leaves[trunk_end + 1 :]
        first_in = head_calls[0].inp if head_calls else logits
        target = first_in.flatten(1) if isinstance(first_in, Tensor) else None
        # the pool is functional, and functional code may also finish the feature map
        # after the last spatial leaf (a residual block's `shortcut + drop_path(x)`): the
        # outputs of the enclosing modules that complete before the head are candidates
        start = next(i for i, c in enumerate(calls) if c is last)
        stop = next((i for i, c in enumerate(calls) if head_calls and c is head_calls[0]), None)
        for c in calls[start + 1 : stop if stop is not None else len(calls)]:
            t = _first_tensor(c.out)
            new = t is not None and t is not feats and all(t is not o for o in candidates)
            if new and c.module is not model and _spatial(t):
                candidates.append(t)  # type: ignore[arg-type]
    if feats is None or target is None:
        raise AdapterNotFoundError("could not read the feature map and the pooled vector")
    candidates.insert(0, feats)

    # 2. fold the head (names the first non-affine module); a head that forks into
    # branches on one tensor (distillation heads) is read as their average when the chain
    # reading fails
    k_pooled = target.shape[1]
    head = [(c.name, c.module) for c in head_calls]
    branches = _branches(head_calls)
    from .heads import fold_head

    fold_error: Optional[UnsupportedHeadError] = None
    try:
        fold_head(head, k_pooled)
    except UnsupportedHeadError as err:
        fold_error = UnsupportedHeadError(
            f"{err} (probe: feature map from '{last.name}', then {_describe(head_calls)})"
        )
        if branches is None:
            raise fold_error from None

    # 3. which tensor and layout pool to the target (the last spatial leaf's first, then
    # what encloses it), and which module gives that tensor
    layout: Optional[FeatureLayout] = None
    for cand_feats in candidates:
        for cand in _layout_candidates(cand_feats, prefix_tokens, relu_first=False):
            try:
                pooled = cand.pool(cand_feats)
            except (RuntimeError, IndexError):
                continue
            if _close(pooled, target):
                layout, feats = cand, cand_feats
                break
        if layout is not None:
            break
    producers = [c for c in calls if _first_tensor(c.out) is feats and c.module is not model]
    capture: CaptureKind
    if producers:
        feature_call = producers[-1]  # outermost: it completes last
        feature_module, feature_name, capture = feature_call.module, feature_call.name, "output"
    elif pool_call is not None:
        feature_module, feature_name, capture = pool_call.module, pool_call.name, "input"
    else:
        feature_module, feature_name, capture = last.module, last.name, "output"
    if layout is None:
        where = (
            f"'{pool_call.name}' ({type(pool_call.module).__name__})"
            if pool_call
            else (f"the code between '{last.name}' and the head")
        )
        raise UnsupportedHeadError(
            f"the head does not pool the feature map of '{feature_name}' (shape "
            f"{tuple(feats.shape)}) by a global average: {where} gives a vector that no "
            f"average over the spatial positions or patch tokens reproduces (max, attention "
            f"or CLS-token pooling?). {CONVERT_HINT}"
        )

    common: dict[str, Any] = dict(
        feature_module=feature_module,
        head=head,
        layout=layout,
        capture=capture,
        input_size=(int(size[0]), int(size[1]), int(size[2])) if len(size) == 3 else None,
        num_features=k_pooled,
        feature_name=feature_name,
    )
    readings: list[Adapter] = []
    if fold_error is None:
        readings.append(
            Adapter(name=f"{name}: {feature_name} -> avg pool -> {_describe(head_calls)}", **common)
        )
    if branches is not None:
        described = " | ".join("+".join(n for n, _ in b) for b in branches)
        readings.append(
            BranchAverageAdapter(
                name=f"{name}: {feature_name} -> avg pool -> mean of {described}",
                branches=branches,
                **common,
            )
        )
    # 4. the folded head must reproduce the model's logits
    hw = (x.shape[-2], x.shape[-1])
    problems: list[str] = [str(fold_error)] if fold_error is not None else []
    for adapter in readings:
        try:
            folded = adapter.fold(k_pooled)
        except UnsupportedHeadError as err:
            problems.append(str(err))
            continue
        with torch.no_grad():
            predicted = folded.logits(adapter.features(feats, hw))
        if _close(predicted, logits, rel=1e-3):
            return adapter
        err_abs = float((predicted.float() - logits.float()).abs().max())
        problems.append(
            f"the folded head ({_describe(head_calls)}) reproduces the model's logits only "
            f"to {err_abs:.3g}: something non-affine happens between '{feature_name}' and "
            f"the output that no module shows (a functional op?). {CONVERT_HINT}"
        )
    # the plain chain reading's problem is the one to report
    raise UnsupportedHeadError(problems[0])
