"""Deletion / insertion AUC of the CAMs in mmengine runs (RISE, Petsiuk et al., BMVC 2018).

:class:`CAMFaithfulnessMetric` reads the ``cam_maps`` that
:class:`~.vis_hook.CAMVisualizationHook` writes into every predicted data sample (the
contract is in :mod:`.samples`) and scores them with
:class:`cam_plugin.evaluate.DeletionInsertion` -- the same batched implementation, the same
numbers. Unlike a localization score, faithfulness needs the model: every map's perturbed
images are run through it. An mmengine metric sees no model, so the model is **bound** to the
metric: the hook calls :func:`bind_faithfulness_metrics` on the loop's evaluator at the start
of every val / test epoch and unbinds at its end (outside a runner, call
:meth:`CAMFaithfulnessMetric.bind_model` yourself). The metric keeps only a weak reference.

A plain class here; ``cam_plugin.integrations.mmengine`` registers it in mmengine's root
``METRICS``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Hashable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log
from torch import Tensor, nn

from cam_plugin.errors import CAMInputError
from cam_plugin.evaluate import DeletionInsertion
from cam_plugin.probing import untouched

from .common import no_autocast, reject_unknown, unwrap
from .sample_maps import placed_maps
from .samples import as_array, cam_maps_of, get_field, gt_classes, has_cam_maps

__all__ = ["CAMFaithfulnessMetric", "TensorForward", "bind_faithfulness_metrics"]

_OWNER = "CAMFaithfulnessMetric"
_DI_OPTIONS = (
    "step",
    "deletion_substrate",
    "insertion_substrate",
    "score",
    "auc_x",
    "blur_kernel",
    "blur_sigma",
    "max_batch",
)


class TensorForward(nn.Module):
    """``x -> model(x, mode="tensor")``: an mmengine model as a plain classifier returning
    its logits ``(B, C)`` (what :mod:`cam_plugin.evaluate` runs). The model is a child, so
    :func:`cam_plugin.probing.untouched` on this wrapper covers every module of it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        """The model's ``forward(x, mode='tensor')`` output."""
        return self.model(x, mode="tensor")


class CAMFaithfulnessMetric(BaseMetric):
    """Deletion and insertion AUC of the CAMs of a val / test set (RISE).

    For every sample the maps chosen by ``maps`` are taken from its ``cam_maps`` (at feature
    resolution; placed on the batch tensor as the hook traced it, else resized bilinearly),
    the sample's input is rebuilt with the model's own ``data_preprocessor(data_batch,
    False)`` (the maps live on that preprocessed tensor, padding included), and
    :class:`cam_plugin.evaluate.DeletionInsertion` scores every map: pixels ranked by the map
    are deleted from the image (replaced by ``deletion_substrate``) / inserted into the
    ``insertion_substrate``, ``step`` pixels at a time, and the softmax probability (or the
    logit) of the map's class is read from ``model(x, mode='tensor')`` at every point;
    ``AUC = trapezoid(curve, x)`` (definitions: ``docs/evaluate.md``). One record per map,
    keyed by ``(sample_idx, class)``, one result per sample for mmengine's collect; records
    from several processes merge and a repeated key counts once. Logged with the prefix
    ``cam/``: ``deletion_auc`` (lower is better), ``insertion_auc`` (higher is better),
    ``insertion_minus_deletion``.

    **Cost**: per batch one preprocessing and one forward of the batch, then per map
    ``2 ceil(H W / step)`` forwards of perturbed images (``max_batch`` per forward) -- 2 x 224
    = 448 per map at the default step (one image row) on 224 x 224 inputs; ``step=H*W//16``
    gives 32. All run after the loop's own ``val_step``, in eval mode, without autograd, with
    autocast off and the RNG streams forked: the model is left exactly as it was.

    Args:
        maps: ``"targets"`` (the hook's target maps: its ``topk`` predicted or ground-truth
            classes) or ``"gt"`` (the map of each sample's ground-truth class, which the hook
            adds with ``target='pred'`` too).
        step, deletion_substrate, insertion_substrate, score, auc_x, blur_kernel, blur_sigma,
            max_batch: the settings of :class:`cam_plugin.evaluate.DeletionInsertion`
            (defaults: RISE's -- one image row per step, zeros / blur, probability).
        collect_device: ``"cpu"`` or ``"gpu"``, as any mmengine metric.
        prefix: metric name prefix (default ``"cam"``).
        collect_dir: temporary folder for ``collect_device="cpu"``.
    """

    default_prefix: Optional[str] = "cam"
    _OPTIONS = ("maps", *_DI_OPTIONS, "collect_device", "prefix", "collect_dir")

    def __init__(
        self,
        maps: str = "targets",
        collect_device: str = "cpu",
        prefix: Optional[str] = None,
        collect_dir: Optional[str] = None,
        **options: Any,
    ) -> None:
        unknown = {k: v for k, v in options.items() if k not in _DI_OPTIONS}
        reject_unknown(_OWNER, unknown, self._OPTIONS)
        if maps not in ("targets", "gt"):
            raise CAMInputError(
                f"{_OWNER}: maps must be 'targets' (the hook's target maps) or 'gt' (the "
                f"ground-truth class's map), got {maps!r}"
            )
        super().__init__(collect_device=collect_device, prefix=prefix, collect_dir=collect_dir)
        self.maps = maps
        self.options = dict(options)
        DeletionInsertion(**self.options)  # validates the settings now, at build time
        self._model: Optional[weakref.ref[nn.Module]] = None
        self._missing = 0

    # -- the model ----------------------------------------------------------------------
    def bind_model(self, model: nn.Module) -> None:
        """Run the perturbed images through ``model`` (unwrapped from DDP / mmengine
        wrappers; held weakly). :class:`~.vis_hook.CAMVisualizationHook` calls this at the
        start of every val / test epoch."""
        if not isinstance(model, nn.Module):
            raise CAMInputError(f"{_OWNER}.bind_model needs an nn.Module, got {type(model)!r}")
        self._model = weakref.ref(unwrap(model))

    def unbind_model(self) -> None:
        """Forget the bound model (the hook calls this at the end of every epoch)."""
        self._model = None

    @property
    def model(self) -> Optional[nn.Module]:
        """The bound model, ``None`` when none is bound (or it was collected)."""
        return self._model() if self._model is not None else None

    # -- per batch ----------------------------------------------------------------------
    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Score the chosen maps of every sample with maps; keep one record per map."""
        rows, maps, classes, ids = self._select(data_samples)
        if not rows:
            return
        model = self.model
        if model is None:
            raise CAMInputError(
                f"{_OWNER}: no model is bound, so the perturbed images cannot be scored. "
                "Add dict(type='CAMVisualizationHook') to custom_hooks (it binds the runner's "
                "model at the start of every val / test epoch), or call "
                "metric.bind_model(model) when you drive the evaluator yourself."
            )
        shape = tuple(int(v) for v in get_field(cam_maps_of(data_samples[rows[0]]), "input_shape"))
        with untouched(model, all_rngs=True):
            inputs = _preprocessed(model, data_batch, len(data_samples), shape)
            metric = DeletionInsertion(**self.options)
            with no_autocast(inputs.device):
                metric.update(
                    TensorForward(model),
                    inputs[rows],
                    maps.to(inputs.device),
                    classes,
                    sample_ids=ids,
                )
        self.results.extend(state for _, state in metric.sample_states())

    def _select(
        self, data_samples: Sequence[Any]
    ) -> tuple[list[int], Tensor, Tensor, Optional[list[Hashable]]]:
        """The maps to score: ``(sample row of each map, maps (N, h, w), classes (N,),
        sample ids (N,) or None when a sample has no ``sample_idx``)``."""
        rows: list[int] = []
        maps: list[Tensor] = []
        classes: list[int] = []
        ids: list[Any] = []
        for i, sample in enumerate(data_samples):
            cam = cam_maps_of(sample)
            if cam is None:
                raise CAMInputError(
                    f"{_OWNER}: the predictions carry no 'cam_maps'. Add dict(type="
                    "'CAMVisualizationHook') to custom_hooks: it computes the maps during the "
                    "forward pass and binds the model for the perturbed forwards."
                )
            if not has_cam_maps(cam):  # the hook saw the sample but had no map for it
                self._missing += 1
                continue
            cam_classes = as_array(get_field(cam, "classes"))
            assert cam_classes is not None
            picks = self._picks(sample, cam, cam_classes.reshape(-1))
            placed = placed_maps(cam, get_field(cam, "maps")[picks].detach().float())
            sid = get_field(sample, "sample_idx")
            for j, pick in enumerate(picks):
                rows.append(i)
                maps.append(placed[j])
                classes.append(int(cam_classes.reshape(-1)[pick]))
                ids.append(int(sid) if isinstance(sid, (int, np.integer)) else sid)
        if not rows:
            return [], torch.zeros(0), torch.zeros(0), None
        sample_ids = None if any(s is None for s in ids) else ids
        return rows, torch.stack(maps), torch.tensor(classes), sample_ids

    def _picks(self, sample: Any, cam: Any, classes: np.ndarray) -> list[int]:
        """Indices into the sample's ``cam_maps`` of the maps to score."""
        if self.maps == "targets":
            return list(range(int(get_field(cam, "num_targets") or len(classes))))
        gt = gt_classes(sample)
        where = np.flatnonzero(classes == gt[0]) if gt else np.zeros(0, dtype=np.int64)
        if where.size == 0:
            raise CAMInputError(
                f"{_OWNER}: maps='gt', but sample {get_field(sample, 'sample_idx')} has no "
                "ground-truth class or its cam_maps hold no map of it."
            )
        return [int(where[0])]

    # -- the epoch ----------------------------------------------------------------------
    def compute_metrics(self, results: list) -> dict[str, float]:
        """Merge the per-sample records of every process and average the AUCs."""
        missing, self._missing = self._missing, 0
        if not results:
            print_log(
                f"{_OWNER}: no sample carried maps in its cam_maps ({missing} without: the "
                "hook is disabled or could not map them); no faithfulness scores this time.",
                logger="current",
                level=logging.WARNING,
            )
            return {}
        metric = DeletionInsertion(**self.options)
        metric.merge(results)
        return {key: float(v) for key, v in metric.compute().items()}


def _preprocessed(model: nn.Module, data_batch: Any, n: int, shape: tuple[int, ...]) -> Tensor:
    """The batch tensor the model saw: ``model.data_preprocessor(data_batch, False)``'s
    ``inputs`` (checked: ``(n, C, H, W)`` with ``(H, W)`` the maps' ``input_shape``)."""
    pre = getattr(model, "data_preprocessor", None)
    data = pre(data_batch, False) if callable(pre) else data_batch
    inputs = data.get("inputs") if isinstance(data, dict) else None
    if not isinstance(inputs, Tensor) or inputs.dim() != 4 or inputs.shape[0] != n:
        got = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise CAMInputError(
            f"{_OWNER}: the model's data_preprocessor must give the batch as one tensor "
            f"inputs (B, C, H, W) with B = {n} samples; got {got}."
        )
    if tuple(inputs.shape[-2:]) != shape:
        raise CAMInputError(
            f"{_OWNER}: the preprocessed batch is {tuple(inputs.shape[-2:])}, but the maps "
            f"were computed on {shape}; the data_preprocessor must be deterministic in "
            "evaluation (training=False)."
        )
    return inputs


def bind_faithfulness_metrics(
    evaluator: Any, model: Union[nn.Module, None]
) -> list[CAMFaithfulnessMetric]:
    """Bind ``model`` to (``None``: unbind from) every :class:`CAMFaithfulnessMetric` of an
    mmengine ``Evaluator`` (its public ``metrics`` list); returns them."""
    metrics = [
        m for m in getattr(evaluator, "metrics", None) or [] if isinstance(m, CAMFaithfulnessMetric)
    ]
    for metric in metrics:
        if model is None:
            metric.unbind_model()
        else:
            metric.bind_model(model)
    return metrics
