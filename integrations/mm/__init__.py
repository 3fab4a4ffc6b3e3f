"""The OpenMMLab faces of cam-plugin, one module per role.

Nothing is registered by importing this package or any module in it: the classes here are
plain classes. The registration modules do that, each for its own face:

* ``cam_plugin.integrations.mmengine`` registers :class:`~.vis_hook.CAMVisualizationHook`
  (``HOOKS``), :class:`~.loc_metric.CAMLocalizationMetric` and
  :class:`~.faith_metric.CAMFaithfulnessMetric` (``METRICS``) and
  :class:`~.datasets.ClutteredDigitsDataset` (``DATASETS``);
* ``cam_plugin.integrations.mmdet`` registers :class:`~.probe_hook.CAMProbeHook`,
  :class:`~.datasets.ClutteredDigitsDetection` and the mmdet adapter;
* ``cam_plugin.integrations.mmpretrain`` registers the mmpretrain adapter;
* ``cam_plugin.integrations.mmaction`` registers the mmaction2 adapter (recognisers wrapped
  in :class:`~.action_adapter.ActionRecognizerLogits`).

Modules:

* ``common``: unwrapping model wrappers, autocast off, option checks and one-time warnings
  shared by the hooks;
* ``samples``: what is read from and written to data samples (boxes, labels, and the
  ``cam_maps`` contract between the visualization hook and the localization metric);
* ``geometry``: feature maps over the padded batch -> the image (crop, un-flip, resize),
  the valid-cell mask, box conventions;
* ``sample_maps``: one predict forward's capture -> the ``cam_maps`` of its samples;
* ``vis_hook`` / ``loc_metric`` / ``faith_metric``: the hook and the metrics of mmengine runs
  (the hook binds the model to the faithfulness metric for its perturbed forwards);
* ``probe_model``, ``probe_options``, ``probe_setup``, ``probe_capture``, ``probe_eval``,
  ``probe_pictures``, ``probe_storage``, ``probe_hook``: the CAM probe trained inside an
  mmdet run (the hook decides when; each other module is one part of what it does);
* ``datasets``: the cluttered-digits data sets (classification and detection);
* ``pretrain_adapter`` / ``det_adapter`` / ``action_adapter``: how the registry reads
  mmpretrain, mmdet and mmaction2 models.
"""
