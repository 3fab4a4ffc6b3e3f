"""CAM vs the others: a scoreboard users can run (``make compare``).

``python -m benchmarks.compare`` explains the same images for the same class with every
method -- CAM, pytorch-grad-cam's GradCAM / GradCAM++ / ScoreCAM / LayerCAM, Captum's
LayerGradCam / IntegratedGradients / Saliency / InputXGradient / Occlusion, and the
centre-Gaussian and brightness baselines -- times each one per image, and scores every map
with every metric of :mod:`cam_plugin.evaluate` (plus Captum's infidelity / sensitivity on
the photos and MaxBoxAccV2 / PxAP on the digits), all in one run:

* the real EfficientNet-Lite0 on the bundled scikit-image photos (:mod:`.photos`);
* the cluttered-digits model of the localization benchmark (:mod:`.digits`);
* the CAM / Grad-CAM bridge table of ``docs/captum.md`` (:mod:`.bridge`).

Outputs: ``docs/cam-vs-others.md`` (tables between markers), figures in
``docs/assets/compare/`` and ``docs/assets/captum/``, ``benchmarks/results/compare.json``,
and everything under ``--out-dir`` (default ``outputs/compare``). ``--quick`` is a smoke run
that writes only under ``--out-dir``.

Modules: :mod:`.config` (settings, flags), :mod:`.methods` (every method as
``(x, classes) -> (B, H, W)``), :mod:`.metrics` / :mod:`.captum_metrics` (the scores, through
the libraries' public functions), :mod:`.scoreboard` (maps, timing, scores of one data set),
:mod:`.photos`, :mod:`.digits` / :mod:`.digits_model`, :mod:`.bridge`, :mod:`.figures`,
:mod:`.report` (tables, docs, JSON) and :mod:`.runner`.
"""
