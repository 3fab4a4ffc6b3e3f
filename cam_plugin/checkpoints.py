"""Loading a checkpoint safely into a model, with errors that say what does not fit.

:func:`read_state_dict` loads a file with ``torch.load(..., weights_only=True)`` only: no code
from the file ever runs. It accepts a plain state dict and the checkpoints of training
frameworks that wrap one (``state_dict`` for mmengine and Lightning, ``model``,
``model_state_dict``, ``module``, ``net``). Training frameworks also store Python objects
next to the weights (mmengine's ``HistoryBuffer``, an ``argparse.Namespace`` of
hyper-parameters, numpy arrays) that ``weights_only`` refuses; those objects are replaced by
inert placeholders (:class:`OpaqueObject`: the class is never imported and none of its
code runs), and only the tensors of the wrapped state dict are used. A file that needs a
blocked module (``os``, ``sys``, ...) is refused outright, and so is any file whose state
dict itself would need such objects.

:func:`apply_state_dict` compares keys and shapes before loading (after dropping a prefix
that every key shares and the model does not have, e.g. ``module.`` of DDP or ``model.`` of a
LightningModule attribute) and raises one message with the counts of missing, unexpected
and mismatched keys, and the checkpoint's number of classes when the classifier differs.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CAMInputError

__all__ = ["Checkpoint", "OpaqueObject", "apply_state_dict", "read_state_dict"]

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_BLOCKED = ("os.", "sys.", "posix.", "nt.", "subprocess.", "builtins.eval", "builtins.exec")
_REFUSAL = re.compile(
    r"Unsupported global|is blocked|Can only (?:create|build)|call reduce for unrecognized"
)
_SAFETY = "refused for safety: torch.load(weights_only=True) loads tensors, not code"


class OpaqueObject:
    """Stands in for a Python object of a checkpoint that ``weights_only`` loading does not
    allow. It keeps the constructor arguments and state it was given (plain data) and never
    imports or runs anything of the class it replaces (named by ``global_name``)."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
        obj = super().__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<{self.global_name} (not loaded)>"


@dataclass(frozen=True)
class Checkpoint:
    """A state dict read from ``path``: ``state`` (name -> tensor), the ``wrapper`` key it
    was found under (None for a plain state dict) and the ``ignored`` Python objects of the
    file (global names) that were replaced by placeholders."""

    path: str
    state: dict[str, Tensor]
    wrapper: str | None = None
    ignored: tuple[str, ...] = field(default=())


def read_state_dict(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a state dict with ``weights_only=True`` (see the module doc).

    Raises:
        CAMInputError: no such file; not a PyTorch checkpoint; refused for safety; no state
            dict of tensors inside.
    """
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise CAMInputError(f"checkpoint {where}: no such file")
    ignored: tuple[str, ...] = ()
    try:
        obj = torch.load(where, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not _REFUSAL.search(str(err)):
            raise CAMInputError(f"{where} is not a PyTorch checkpoint ({_reason(err)})") from err
        obj, ignored = _load_with_placeholders(where, err)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a non-checkpoint
        raise CAMInputError(f"{where} is not a PyTorch checkpoint ({_reason(err)})") from err
    state, wrapper = _find_state_dict(obj, where, ignored)
    return Checkpoint(path=where, state=state, wrapper=wrapper, ignored=ignored)


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    if match:
        text = match.group(1)
    first = " ".join(text.split())[:160]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _load_with_placeholders(where: str, refusal: Exception) -> tuple[Any, tuple[str, ...]]:
    """Load again with every disallowed global replaced by an :class:`OpaqueObject` type."""
    serialization: Any = torch.serialization
    names: list[str] = []
    if hasattr(serialization, "get_unsafe_globals_in_checkpoint"):
        try:
            names = list(serialization.get_unsafe_globals_in_checkpoint(where))
        except Exception:  # noqa: BLE001 - a legacy (non-zip) file: no listing
            names = []
    named = ", ".join(sorted(names)[:3]) or "Python objects"
    if not names or any(n.startswith(_BLOCKED) for n in names):
        raise CAMInputError(f"{where}: {_SAFETY}, and this file needs {named}") from refusal
    stubs = [(type(n.rsplit(".", 1)[-1], (OpaqueObject,), {"global_name": n}), n) for n in names]
    try:
        with serialization.safe_globals(stubs):
            obj = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - still refused: say so, never how to bypass
        raise CAMInputError(f"{where}: {_SAFETY}, and this file needs {named}") from err
    return obj, tuple(sorted(names))


def _find_state_dict(
    obj: Any, where: str, ignored: tuple[str, ...]
) -> tuple[dict[str, Tensor], str | None]:
    def is_state(value: Any) -> bool:
        return (
            isinstance(value, Mapping)
            and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())
        )

    if is_state(obj):
        return dict(obj), None
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if is_state(obj.get(key)):
                return dict(obj[key]), key
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        what = f"a dict with keys {keys}" if obj else "an empty dict"
        detail = f"{what} and no {' / '.join(WRAPPER_KEYS)} entry of tensors"
    else:
        detail = f"a {type(obj).__name__}, not a dict of tensors"
    if ignored:
        raise CAMInputError(
            f"{where}: {_SAFETY}; without its {', '.join(ignored[:3])} objects it holds {detail}"
        )
    raise CAMInputError(
        f"{where} is not a state dict: it holds {detail}; "
        "save one with torch.save(model.state_dict(), path)"
    )


def _strip_prefix(state: dict[str, Tensor], model_keys: set[str]) -> tuple[dict, str]:
    """Drop the leading components (up to two) that every key shares, when that makes more
    keys match the model's (``module.`` of DDP, ``model.`` of a LightningModule)."""
    best, best_prefix = state, ""
    best_hits = len(set(state) & model_keys)
    current, prefix = state, ""
    for _ in range(2):
        heads = {k.split(".", 1)[0] for k in current}
        if len(heads) != 1 or any("." not in k for k in current):
            break
        head = heads.pop() + "."
        current = {k[len(head) :]: v for k, v in current.items()}
        prefix += head
        hits = len(set(current) & model_keys)
        if hits > best_hits:
            best, best_prefix, best_hits = current, prefix, hits
    return best, best_prefix


def apply_state_dict(model: nn.Module, checkpoint: Checkpoint, *, model_name: str) -> str:
    """Load ``checkpoint`` into ``model`` (strict), after checking keys and shapes.

    Returns the key prefix that was dropped (``""`` if none).

    Raises:
        CAMInputError: keys missing / unexpected or shapes that differ, with their counts,
            the first examples and, when the classifier differs, ``--num-classes N``.
    """
    target = model.state_dict()
    state, prefix = _strip_prefix(checkpoint.state, set(target))
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [k for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        examples = [f"missing {k}" for k in missing[:2]]
        examples += [f"unexpected {k}" for k in unexpected[:2]]
        examples += [
            f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(target[k].shape)}"
            for k in mismatched[:2]
        ]
        hint = _classes_hint(model, state, mismatched)
        raise CAMInputError(
            f"{checkpoint.path} does not fit {model_name}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} mismatched keys "
            f"(e.g. {'; '.join(examples)}); {hint}"
        )
    model.load_state_dict(state, strict=True)
    return prefix


def _classes_hint(model: nn.Module, state: dict[str, Tensor], mismatched: list[str]) -> str:
    """``pass --num-classes N`` when a mismatched tensor is the classifier's weight."""
    classes = getattr(model, "num_classes", None)
    for key in mismatched:
        want, have = model.state_dict()[key].shape, state[key].shape
        if (
            len(want) == len(have) == 2
            and want[1] == have[1]
            and want[0] != have[0]
            and (classes is None or want[0] == classes)
        ):
            return f"the checkpoint has {have[0]} classes: pass --num-classes {have[0]}"
    return "check --model, --num-classes and --model-kwargs against the checkpoint"
