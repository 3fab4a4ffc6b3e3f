"""How cam-plugin reads mmaction2 recognisers: space-time CAM on ``Recognizer3D`` with a
single-path average-pooled head (I3D / SlowOnly-style ``ResNet3d`` + ``I3DHead``; tested) and
``Recognizer2D`` (TSN: one 2-D map per segment, averaged by the consensus; tested).

An mmaction2 recogniser called in ``mode='tensor'`` returns the backbone's features, not
logits, and takes ``(N, num_clips, C, T, H, W)`` (3-D) or ``(N, num_segs, C, H, W)`` (2-D)
batches. :class:`ActionRecognizerLogits` wraps one as a classifier of ``(B, C, T, H, W)`` clips
(after the recogniser's ``data_preprocessor``: normalized, one clip / one crop per sample)
that returns the head's raw logits (before ``average_clips``' softmax):

* ``Recognizer3D``: ``f = extract_feat(x[:, None])`` is ``(B, K, T', h, w)``; the head
  (``I3DHead`` and other single-path heads) average-pools it over ``(t, x, y)``, then
  dropout and ``fc_cls``;
* ``Recognizer2D``: the ``T`` frames are the segments; ``extract_feat`` gives
  ``(B·T, K, h, w)``; the head (``TSNHead``) average-pools each segment, the
  ``AvgConsensus`` averages the segments, then dropout and ``fc_cls``: a global average
  over ``(segment, x, y)`` of ``f`` seen as ``(B, K, T, h, w)``.

Either way ``S_c = Σ_k w_ck mean_{t,x,y} f_k + b_c``, so the space-time map
``M_c = Σ_k w_ck f_k`` satisfies ``mean_{t,x,y} M_c + b_c = S_c`` exactly. The wrapper routes
the map through an ``nn.Identity`` (``space_time``) in ``(B, K, T, h, w)`` layout, which the
adapter captures; the head is folded from a head-only probe (its leaf modules other than the
pool and the consensus, in call order) and the fold must reproduce the head's output on a
random map, else the head is refused (``X3DHead``'s hidden layer, a non-average consensus,
``spatial_type`` other than ``'avg'``). Multi-pathway (SlowFast) and token (TimeSformer)
features are refused with the ``convert`` hint.

Nothing here imports ``mmaction`` (the recogniser is read through its attributes), so the
PyPI wheel of mmaction2 1.2.0, whose ``mmaction.models`` import fails on a missing
``localizers/drn`` package (open-mmlab/mmaction2#2714), is needed only to build models.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from cam_plugin.adapter import Adapter
from cam_plugin.errors import CONVERT_HINT, CAMInputError, UnsupportedHeadError
from cam_plugin.heads import fold_head
from cam_plugin.layout import FeatureLayout
from cam_plugin.probing import probe_input, untouched

__all__ = [
    "ActionRecognizerLogits",
    "action_head_adapter",
    "is_mmaction_model",
    "mmaction_adapter",
    "recognizer_kind",
]

#: modules of an mmaction head that pool (they are the GAP of the identity, not folded)
POOL_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool2d, nn.AvgPool3d)
#: the consensus modules that average the segments (the others are refused by the probe)
AVERAGE_CONSENSUS = frozenset({"AvgConsensus"})


def is_mmaction_model(model: nn.Module) -> bool:
    """True when the model's class comes from mmaction2."""
    return type(model).__module__.split(".")[0] == "mmaction"


def recognizer_kind(recognizer: nn.Module) -> str:
    """``"3d"`` (``Recognizer3D``-like: ``(N, clips, C, T, H, W)``) or ``"2d"``
    (``Recognizer2D``-like: ``(N, segments, C, H, W)``).

    Raises:
        UnsupportedHeadError: another recogniser (audio, skeleton GCN, multimodal) or no
            ``cls_head``.
    """
    name = type(recognizer).__name__
    if getattr(recognizer, "cls_head", None) is None:
        raise UnsupportedHeadError(
            f"mmaction2 {name} has no cls_head: there is no class to map. {CONVERT_HINT}"
        )
    if name == "Recognizer3D" or name.endswith("Recognizer3D"):
        return "3d"
    if name == "Recognizer2D" or name.endswith("Recognizer2D"):
        return "2d"
    raise UnsupportedHeadError(
        f"mmaction2 {name} is not a Recognizer3D / Recognizer2D (video clips in, an "
        f"average-pooled head out); cam-plugin reads only those. {CONVERT_HINT}"
    )


class ActionRecognizerLogits(nn.Module):
    """An mmaction2 recogniser as a ``(B, C, T, H, W) -> (B, num_classes)`` classifier of
    preprocessed clips (module doc); ``CAM(ActionRecognizerLogits(recognizer))`` resolves
    through :meth:`__cam_adapter__`.

    Args:
        recognizer: a ``Recognizer3D`` or ``Recognizer2D`` (not copied); the wrapper starts in
            its train / eval mode.
    """

    def __init__(self, recognizer: nn.Module) -> None:
        super().__init__()
        self.kind = recognizer_kind(recognizer)
        self.recognizer: Any = recognizer  # mmaction's API (extract_feat, cls_head)
        #: the space-time map ``(B, K, T, h, w)`` the head pools (captured by the adapter)
        self.space_time = nn.Identity()
        self.train(recognizer.training)  # the recogniser's mode, not nn.Module's default

    def forward(self, x: Tensor) -> Tensor:
        """Raw head logits ``(B, num_classes)`` of clips ``(B, C, T, H, W)``."""
        if not isinstance(x, Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise CAMInputError(
                f"an mmaction2 recogniser takes preprocessed clips (B, C, T, H, W), got {shape}"
            )
        rec: Any = self.recognizer
        if self.kind == "3d":
            feats, kwargs = rec.extract_feat(x[:, None], stage="neck")
            _check_map(feats, 5, rec)
            return rec.cls_head(self.space_time(feats), **kwargs)
        b, t = int(x.shape[0]), int(x.shape[2])
        frames = x.transpose(1, 2).contiguous()  # (B, T, C, H, W): the segments
        feats, kwargs = rec.extract_feat(frames, stage="neck")  # (B·T, K, h, w)
        _check_map(feats, 4, rec)
        clip = feats.reshape(b, t, *feats.shape[1:]).transpose(1, 2)
        clip = self.space_time(clip)  # (B, K, T, h, w)
        return rec.cls_head(clip.transpose(1, 2).reshape(feats.shape), **kwargs)

    def __cam_adapter__(self) -> Adapter:
        """The adapter (:func:`action_head_adapter`)."""
        return action_head_adapter(self)


def _check_map(feats: Any, rank: int, rec: nn.Module) -> None:
    if not (isinstance(feats, Tensor) and feats.dim() == rank):
        got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        raise UnsupportedHeadError(
            f"mmaction2 {type(rec).__name__}: the head's input is {got}, not one "
            f"{rank}-D feature map (multi-pathway SlowFast or token features); cam-plugin "
            f"reads single-path average-pooled heads. {CONVERT_HINT}"
        )


def _head_channels(head: nn.Module) -> int:
    value = getattr(head, "in_channels", None)
    if isinstance(value, int) and value > 0:
        return value
    fc = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
    if fc is None:
        raise UnsupportedHeadError(
            f"mmaction2 head {type(head).__name__}: no in_channels and no Linear layer, so the "
            f"class weights are unknown. {CONVERT_HINT}"
        )
    return int(fc.in_features)


def _probe_head(
    wrapper: ActionRecognizerLogits, k: int
) -> tuple[list[tuple[str, nn.Module]], Tensor, Tensor]:
    """Run the head alone on a random map; return its folded leaf calls (pool and consensus
    left out) in call order, the map as ``(B, K, T, h, w)`` and the head's output."""
    head: nn.Module = wrapper.recognizer.cls_head
    _check_consensus(head)
    names = {id(m): f"cls_head.{n}" for n, m in head.named_modules() if n}
    calls: list[tuple[str, nn.Module]] = []

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(mod, POOL_TYPES) and type(mod).__name__ not in AVERAGE_CONSENSUS:
            calls.append((names.get(id(mod), "?"), mod))

    segments = int(getattr(head, "num_segments", 0) or 3)  # TSM heads reshape by their own
    size = (k, segments, 5, 4) if wrapper.kind == "3d" else (k, 5, 4)
    x = probe_input(head, size, batch=2 if wrapper.kind == "3d" else 2 * segments)
    kwargs: dict[str, Any] = {} if wrapper.kind == "3d" else {"num_segs": segments}
    handles = [
        m.register_forward_hook(hook)
        for m in head.modules()
        if m is not head and next(m.children(), None) is None
    ]
    try:
        with untouched(head):
            out = head(x, **kwargs)
    except Exception as err:
        raise UnsupportedHeadError(
            f"mmaction2 head {type(head).__name__} failed on a probe map of shape "
            f"{tuple(x.shape)} ({type(err).__name__}: {err}); cam-plugin reads heads that "
            f"average-pool one feature map. {CONVERT_HINT}"
        ) from err
    finally:
        for h in handles:
            h.remove()
    if wrapper.kind == "2d":  # (B·T, K, h, w) -> (B, K, T, h, w)
        x = x.reshape(2, segments, *x.shape[1:]).transpose(1, 2)
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise UnsupportedHeadError(
            f"mmaction2 head {type(head).__name__} did not return (B, num_classes) logits for a "
            f"feature map. {CONVERT_HINT}"
        )
    return calls, x, out


def _check_consensus(head: nn.Module) -> None:
    consensus = getattr(head, "consensus", None)
    if consensus is not None and type(consensus).__name__ not in AVERAGE_CONSENSUS:
        raise UnsupportedHeadError(
            f"mmaction2 head {type(head).__name__} merges the segments with "
            f"{type(consensus).__name__}, not an average: CAM cannot be exact. {CONVERT_HINT}"
        )
    if getattr(head, "avg_pool", True) is None:
        raise UnsupportedHeadError(
            f"mmaction2 head {type(head).__name__} has no average pool (spatial_type is not "
            f"'avg'): its input is already pooled. Build it with spatial_type='avg'. "
            + CONVERT_HINT
        )


def action_head_adapter(wrapper: ActionRecognizerLogits) -> Adapter:
    """The :class:`~cam_plugin.Adapter` of a wrapped recogniser: capture ``space_time``'s
    output (layout ``NCTHW``), fold the head's leaf calls after the pool.

    Raises:
        UnsupportedHeadError: the head is not average pool -> affine (module doc).
    """
    rec = wrapper.recognizer
    head: nn.Module = rec.cls_head
    arch = f"mmaction:{type(rec).__name__}+{type(head).__name__}"
    k = _head_channels(head)
    calls, x, out = _probe_head(wrapper, k)
    if not calls:
        raise UnsupportedHeadError(f"{arch}: the head calls no layer to fold. {CONVERT_HINT}")
    try:
        folded = fold_head(calls, k)
    except UnsupportedHeadError as err:
        raise UnsupportedHeadError(f"{arch}: {err}") from None
    with torch.no_grad():
        folded.check_reproduces(x.detach().float(), out.float(), name=arch)
    return Adapter(
        feature_module=wrapper.space_time,
        head=calls,
        layout=FeatureLayout("NCTHW"),
        num_features=k,
        name=f"{arch}: space_time -> avg pool (t, x, y) -> " + " -> ".join(n for n, _ in calls),
        feature_name="space_time",
    )


def mmaction_adapter(model: nn.Module) -> Optional[Adapter]:
    """For a bare mmaction2 recogniser: ``None`` for other models, else refuse with the way
    in (its ``forward`` returns backbone features, not logits, on 6-D / 5-D batches).

    Raises:
        UnsupportedHeadError: always, for an mmaction2 model: wrap it in
            :class:`ActionRecognizerLogits`.
    """
    if not is_mmaction_model(model) or isinstance(model, ActionRecognizerLogits):
        return None
    raise UnsupportedHeadError(
        f"mmaction2 {type(model).__name__}: its forward returns backbone features, not "
        "logits. Wrap it: from cam_plugin.integrations.mmaction import "
        "ActionRecognizerLogits; CAM(ActionRecognizerLogits(model))(clips) with clips "
        "(B, C, T, H, W) after model.data_preprocessor"
    )
