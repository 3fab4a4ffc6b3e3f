"""Generic adapter discovery from one forward pass.

For a model no registered adapter knows, :func:`discover` reads the structure off the
calls of one forward pass (a :class:`~cam_plugin.forward.ForwardTrace`). That forward is
the user's own first call whenever there is one (:class:`cam_plugin.CAM` resolves on its
first call and reuses that forward for the maps, so the user's model never runs on data of
ours); only an explicit :func:`cam_plugin.resolve` before any call probes, with the user's
``example`` or, failing that, a small random input (eval mode on every module, no autograd,
the RNG forked, modes restored: :func:`cam_plugin.probing.untouched`). The reading, in four
steps:

1. the last *leaf* module whose input is still spatial (``(B, K, h, w)`` with
   ``h·w > 1``, or ``(B, N, K)`` tokens) ends the trunk; when its output is pooled
   (``(B, K)`` or ``(B, K, 1, 1)``) it is the pooling module and its input is the
   feature map; a 1-D pool ``(B, K, N) -> (B, K, 1)`` over channel-first tokens (HF Swin)
   is one too, its feature map the ``(B, N, K)`` tokens of which its input is a transpose;
   otherwise its output is the feature map (the pool is functional);
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .adapter import Adapter, BranchAverageAdapter, NamedModules
from .errors import CONVERT_HINT, AdapterNotFoundError, UnsupportedHeadError
from .forward import Call, CallRecorder, ForwardNeededError, ForwardTrace, current_request
from .heads import fold_head
from .hooks import CaptureKind
from .layout import FeatureLayout
from .probing import first_tensor, probe_input, untouched

__all__ = ["discover", "expected_channels", "guess_input_size", "probe_input", "record_forward"]


def _spatial(t: Optional[Tensor]) -> bool:
    if t is None:
        return False
    if t.dim() == 5:  # a clip (B, K, T, h, w) or (B, T, h, w, K)
        return int(t.shape[2:].numel()) > 1
    if t.dim() == 4:
        return t.shape[2] * t.shape[3] > 1
    if t.dim() == 3:
        return t.shape[1] > 1
    return False


def _pooled(t: Optional[Tensor]) -> bool:
    if t is None:
        return False
    if t.dim() in (4, 5):
        return all(int(v) == 1 for v in t.shape[2:])
    return t.dim() == 2


def _pooled_1d(inp: Optional[Tensor], out: Optional[Tensor]) -> bool:
    """A 1-D pool over channel-first tokens, ``(B, K, N) -> (B, K, 1)``:
    ``nn.AdaptiveAvgPool1d(1)`` on ``tokens.transpose(1, 2)`` (HF Swin, Swinv2, FocalNet)."""
    if inp is None or out is None or inp.dim() != 3 or out.dim() != 3:
        return False
    return out.shape[2] == 1 and out.shape[:2] == inp.shape[:2]


def _same_view(a: Optional[Tensor], b: Tensor) -> bool:
    """``a`` and ``b`` view the same elements the same way (same storage address, shape,
    strides, dtype): a module's output and a transpose of a transpose of it."""
    return (
        isinstance(a, Tensor)
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
        and a.data_ptr() == b.data_ptr()
    )


def expected_channels(model: nn.Module) -> Optional[int]:
    """The input channel count the model states without running it: its pretrained
    config's ``input_size``, else its first convolution's ``in_channels``; ``None`` when
    neither says."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size") and len(cfg["input_size"]) == 3:
            return int(cfg["input_size"][0])
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(m.in_channels)
    return None


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


def record_forward(model: nn.Module, example: Tensor) -> ForwardTrace:
    """Probe: one forward of ``model`` on ``example`` with every call recorded, the model
    left untouched (:func:`cam_plugin.probing.untouched`: eval mode, no grad, RNG forked,
    modes restored)."""
    with untouched(model), CallRecorder(model) as recorder:
        output = model(example)
    return recorder.trace(example, output)


def _layout_candidates(
    feats: Tensor, prefix_hint: Optional[int], relu_first: bool
) -> list[FeatureLayout]:
    relus = (True, False) if relu_first else (False, True)
    out: list[FeatureLayout] = []
    if feats.dim() == 4:
        for relu in relus:
            out += [FeatureLayout("NCHW", relu=relu), FeatureLayout("NHWC", relu=relu)]
    elif feats.dim() == 5:
        for relu in relus:
            out += [FeatureLayout("NCTHW", relu=relu), FeatureLayout("NTHWC", relu=relu)]
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


def _passes_through(call: Call) -> bool:
    """A call that returns its input object (Dropout / Identity in eval mode)."""
    return first_tensor(call.out) is call.inp


def _branches(head_calls: Sequence[Call]) -> Optional[tuple[NamedModules, ...]]:
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


def _describe(calls: Sequence[Call]) -> str:
    return " -> ".join(f"{c.name} ({type(c.module).__name__})" for c in calls) or "(none)"


@dataclass
class _TrunkReading:
    """Step 1's result: where the trunk ends and what the head receives."""

    last: Call  # the last leaf whose input is spatial
    pool_call: Optional[Call]  # that leaf when it is the pooling module
    head_calls: list[Call]  # the leaf calls after it
    target: Tensor  # the pooled vector the head receives, (B, K)
    candidates: list[Tensor]  # feature tensors to try, most likely first
    channels_first: bool = False  # the pool's input is (B, K, N): candidates are its transpose


def _obtain_trace(
    model: nn.Module,
    example: Optional[Tensor],
    input_size: Optional[Sequence[int]],
    probe_batch: int,
) -> tuple[ForwardTrace, tuple[int, ...]]:
    """The trace to read: the caller's example, else the active request's trace / example /
    size, else a random probe at ``input_size`` or the guessed size."""
    request = current_request(model)
    if example is None and request is not None:
        if request.trace is not None:
            return request.trace, tuple(int(v) for v in request.trace.example.shape[1:])
        example = request.example
        if request.input_size is not None:
            input_size = request.input_size
        if example is None and not request.allow_probe:
            raise ForwardNeededError("resolution needs a forward pass of the model")
    if example is not None:
        size = tuple(int(v) for v in example.shape[1:])
        x = example
    else:
        size = tuple(int(v) for v in input_size) if input_size else guess_input_size(model)
        x = probe_input(model, size, batch=probe_batch)
    try:
        return record_forward(model, x), size
    except Exception as err:  # the probe itself failed: say so, with the cause
        raise AdapterNotFoundError(
            f"the generic probe forward with an input of shape {tuple(x.shape)} failed "
            f"({type(err).__name__}: {err}); pass input_size=(C, H, W) or an example input, "
            "or register an adapter"
        ) from err


def _read_trunk(trace: ForwardTrace, logits: Tensor) -> _TrunkReading:
    """Step 1: the last leaf with a spatial input ends the trunk; what follows is the head."""
    calls = trace.calls
    leaves = [c for c in calls if c.leaf]
    trunk_end = next((i for i in range(len(leaves) - 1, -1, -1) if _spatial(leaves[i].inp)), None)
    if trunk_end is None:
        shape = tuple(trace.example.shape)
        raise AdapterNotFoundError(
            f"the forward on an input of shape {shape} showed no module that receives a "
            "spatial feature map (B, K, h, w) with h·w > 1 or tokens (B, N, K) (is the input "
            "so small that the last feature map is 1x1? then resolve once with a larger "
            "example: cam_plugin.resolve(model, example=...))"
        )
    last = leaves[trunk_end]
    out_t = first_tensor(last.out)
    head_calls = leaves[trunk_end + 1 :]
    candidates: list[Tensor] = []
    channels_first = False
    if _pooled(out_t):
        pool_call: Optional[Call] = last
        feats = last.inp
        target = out_t.flatten(1) if out_t is not None else None
    elif _pooled_1d(last.inp, out_t) and last.inp is not None and out_t is not None:
        # (B, K, N) -> (B, K, 1): the feature map is the (B, N, K) tokens it transposes
        pool_call, channels_first = last, True
        feats = last.inp.transpose(1, 2)
        target = out_t.flatten(1)
    else:
        pool_call = None
        feats = out_t
        first_in = head_calls[0].inp if head_calls else logits
        target = first_in.flatten(1) if isinstance(first_in, Tensor) else None
        # the pool is functional, and functional code may also finish the feature map
        # after the last spatial leaf (a residual block's `shortcut + drop_path(x)`): the
        # outputs of the enclosing modules that complete before the head are candidates
        start = next(i for i, c in enumerate(calls) if c is last)
        stop = next((i for i, c in enumerate(calls) if head_calls and c is head_calls[0]), None)
        for c in calls[start + 1 : stop if stop is not None else len(calls)]:
            t = first_tensor(c.out)
            new = t is not None and t is not feats and all(t is not o for o in candidates)
            if new and c.module is not trace.model and _spatial(t):
                candidates.append(t)  # type: ignore[arg-type]
    if feats is None or target is None:
        raise AdapterNotFoundError("could not read the feature map and the pooled vector")
    candidates.insert(0, feats)
    return _TrunkReading(last, pool_call, head_calls, target, candidates, channels_first)


def _fold_chain(
    reading: _TrunkReading,
) -> tuple[Optional[UnsupportedHeadError], Optional[tuple[NamedModules, ...]]]:
    """Step 2: fold the head as a chain (the error names the first non-affine module); a
    head that forks into branches on one tensor (distillation heads) is also read as their
    average. Raises when neither reading is possible."""
    head = [(c.name, c.module) for c in reading.head_calls]
    branches = _branches(reading.head_calls)
    try:
        fold_head(head, reading.target.shape[1])
    except UnsupportedHeadError as err:
        fold_error = UnsupportedHeadError(
            f"{err} (probe: feature map from '{reading.last.name}', then "
            f"{_describe(reading.head_calls)})"
        )
        if branches is None:
            raise fold_error from None
        return fold_error, branches
    return None, branches


def _match_layout(
    trace: ForwardTrace, reading: _TrunkReading, prefix_tokens: Optional[int]
) -> tuple[FeatureLayout, Tensor, nn.Module, str, CaptureKind]:
    """Step 3: which candidate tensor, under which layout, averages to the pooled vector,
    and which module gives that tensor (the outermost producer, else the pool's input)."""
    layout: Optional[FeatureLayout] = None
    feats = reading.candidates[0]
    for cand_feats in reading.candidates:
        for cand in _layout_candidates(cand_feats, prefix_tokens, relu_first=False):
            try:
                pooled = cand.pool(cand_feats)
            except (RuntimeError, IndexError):
                continue
            if _close(pooled, reading.target):
                layout, feats = cand, cand_feats
                break
        if layout is not None:
            break
    model, pool_call, last = trace.model, reading.pool_call, reading.last
    if reading.channels_first:  # feats is a new view object: match the producer by view
        producers = [
            c
            for c in trace.calls
            if _same_view(first_tensor(c.out), feats) and c.module is not model
        ]
    else:
        producers = [
            c for c in trace.calls if first_tensor(c.out) is feats and c.module is not model
        ]
    capture: CaptureKind
    if producers:
        feature_call = producers[-1]  # outermost: it completes last
        feature_module, feature_name, capture = feature_call.module, feature_call.name, "output"
    elif reading.channels_first:
        raise AdapterNotFoundError(
            f"'{reading.last.name}' pools a (B, K, N) tensor that is the transpose of no "
            "module's output, so there is no module to capture the tokens from; register an "
            "adapter"
        )
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
    return layout, feats, feature_module, feature_name, capture


def _first_reproducing(
    readings: Sequence[Adapter],
    feats: Tensor,
    logits: Tensor,
    hw: tuple[int, int],
    described: str,
    problems: list[str],
) -> Adapter:
    """Step 4: the first reading whose folded head reproduces the model's logits."""
    for adapter in readings:
        try:
            folded = adapter.fold(adapter.num_features)
        except UnsupportedHeadError as err:
            problems.append(str(err))
            continue
        with torch.no_grad():
            features = adapter.features(feats.detach(), hw)
            if folded.reproduces(features, logits.detach()):
                return adapter
            predicted = folded.logits(features)
        err_abs = float((predicted.float() - logits.detach().float()).abs().max())
        problems.append(
            f"the folded head ({described}) reproduces the model's "
            f"logits only to {err_abs:.3g}: something non-affine happens between "
            f"'{adapter.feature_name}' and the output that no module shows (a functional op?). "
            f"{CONVERT_HINT}"
        )
    # the plain chain reading's problem is the one to report
    raise UnsupportedHeadError(problems[0])


def discover(
    model: nn.Module,
    example: Optional[Tensor] = None,
    *,
    input_size: Optional[Sequence[int]] = None,
    prefix_tokens: Optional[int] = None,
    name: str = "generic",
    probe_batch: int = 2,
    output_fn: Optional[Callable[[Any], Tensor]] = None,
) -> Adapter:
    """Find ``feature map -> global average pool -> affine head`` from one forward pass.

    The forward read is, in order: ``example`` when given; else, inside
    :func:`cam_plugin.registry.resolve`, the trace of the user's real call (or the example
    / input size the user gave to ``resolve``); else a probe on a random
    ``(probe_batch, *input_size)`` batch.

    Args:
        model: any ``nn.Module`` returning ``(B, C)`` logits.
        example: the probe batch.
        input_size: ``(C, H, W)`` for a random probe (default: :func:`guess_input_size`).
        prefix_tokens: for token models, the number of prefix tokens to try first.
        name: adapter name to report.
        probe_batch: batch size of the random probe.
        output_fn: reads the ``(B, C)`` logits from what the model returns (e.g.
            ``lambda out: out.logits`` for HuggingFace outputs); kept on the adapter.

    Raises:
        UnsupportedHeadError: the head after the feature map is not affine after an
            average pool (names the module and points to ``cam_plugin.convert``).
        AdapterNotFoundError: the structure could not be read (says why).
    """
    if prefix_tokens is None and isinstance(getattr(model, "num_prefix_tokens", None), int):
        prefix_tokens = int(model.num_prefix_tokens)  # type: ignore[arg-type]
    trace, size = _obtain_trace(model, example, input_size, probe_batch)
    output = output_fn(trace.output) if output_fn is not None else trace.output
    logits = output if isinstance(output, Tensor) else None
    if logits is None or logits.dim() != 2:
        got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise AdapterNotFoundError(
            f"the model returns {got}, not (B, num_classes) logits; register an adapter "
            "with an output_fn"
        )
    with torch.no_grad():
        reading = _read_trunk(trace, logits)
        fold_error, branches = _fold_chain(reading)
        layout, feats, feature_module, feature_name, capture = _match_layout(
            trace, reading, prefix_tokens
        )
    k_pooled = reading.target.shape[1]
    described = _describe(reading.head_calls)
    common: dict[str, Any] = dict(
        feature_module=feature_module,
        head=[(c.name, c.module) for c in reading.head_calls],
        layout=layout,
        capture=capture,
        input_size=(int(size[0]), int(size[1]), int(size[2])) if len(size) == 3 else None,
        num_features=k_pooled,
        feature_name=feature_name,
        output_fn=output_fn,
    )
    readings: list[Adapter] = []
    if fold_error is None:
        readings.append(
            Adapter(name=f"{name}: {feature_name} -> avg pool -> {described}", **common)
        )
    if branches is not None:
        forks = " | ".join("+".join(n for n, _ in b) for b in branches)
        readings.append(
            BranchAverageAdapter(
                name=f"{name}: {feature_name} -> avg pool -> mean of {forks}",
                branches=branches,
                **common,
            )
        )
    hw = (int(trace.example.shape[-2]), int(trace.example.shape[-1]))
    problems: list[str] = [str(fold_error)] if fold_error is not None else []
    return _first_reproducing(readings, feats, logits, hw, described, problems)
