"""mmaction2: space-time CAM on ``Recognizer3D`` (I3D-style heads) and ``Recognizer2D``
(TSN-style heads: segments averaged by the consensus).

A recogniser's ``forward`` returns backbone features, not logits, so it is wrapped:
``CAM(ActionRecognizerLogits(recognizer))(clips)`` with ``clips`` ``(B, C, T, H, W)`` after
the recogniser's ``data_preprocessor``; the maps are ``(B, k, T', h, w)`` and
``mean_{t,x,y} M_c + b_c = S_c`` holds with ``S`` the head's raw logits. The wrapper carries
its own adapter; a bare recogniser given to ``CAM`` is refused with this recipe. The details
are in :mod:`cam_plugin.integrations.mm.action_adapter`.

Importing this module registers the refusal for bare recognisers (the registry imports it
when it meets an mmaction2 model, once ``mmaction`` is in its table of integrations).
"""

from __future__ import annotations

from cam_plugin.registry import register_adapter

from .mm.action_adapter import (
    ActionRecognizerLogits,
    action_head_adapter,
    is_mmaction_model,
    mmaction_adapter,
    recognizer_kind,
)

__all__ = [
    "ActionRecognizerLogits",
    "action_head_adapter",
    "is_mmaction_model",
    "mmaction_adapter",
    "recognizer_kind",
]

register_adapter(is_mmaction_model, mmaction_adapter, name="mmaction")
