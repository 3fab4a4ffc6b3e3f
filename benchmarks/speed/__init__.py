"""Speed and memory of cam-plugin's CAM against a plain forward pass, torchcam, pytorch-grad-cam
and Captum, plus the bulk fast path (channels_last, torch.compile, ONNX Runtime).

Run from the repository root:

    python -m benchmarks.speed                  # `make bench`: ~13 min on 2 CPU threads
    python -m benchmarks.speed --device cuda    # the same on a GPU (CUDA events + sync)
    python -m benchmarks.speed --smoke --out-dir /tmp/bench   # batch 2, tiny model (tests)

The package, by role:

* :mod:`.methods` -- the model, the inputs and the callable of every method compared, and the
  agreement check of the comparators' maps against cam-plugin's;
* :mod:`.measure` -- interleaved timing rounds, peak RSS and peak tensor memory readers, the
  environment record;
* :mod:`.workers` -- what each child process measures (``--worker time | memory | tensors |
  fast | breakdown``), printed as one ``@@RESULT`` JSON line;
* :mod:`.orchestrate` -- the torch-free parent: which children run, with which allocator
  environment, and the report they add up to;
* :mod:`.report` -- the Markdown table of ``docs/benchmarks.md`` and the JSON file;
* :mod:`.cli` -- the command line (parent and child modes).

How it measures (see docs/benchmarks.md):

* The parent process never imports torch. Every measurement runs in a fresh child
  interpreter: two *timing* children per (model, batch, allocator setting) (the autograd
  methods apart, see ``GROUPS``), one *tensor-memory* child per (model, batch), one *RSS*
  child per (model, method) at the largest batch, one *fast-path* child per (model,
  allocator). glibc reads ``MALLOC_MMAP_MAX_`` only at start-up, so the allocator setting is
  given to the child's environment, and peak RSS is not inherited from a parent that
  already holds torch.
* Same model, inputs, thread count and dtype for every method. Warm-up rounds, then rounds
  in which every method runs once, in rotating order (A B C … then B C … A), so that drift
  on a shared machine hits all methods alike. Reported: median and min–max of the wall time,
  and the median over rounds of the time divided by the same round's plain forward; the
  targets "A / B" are medians of per-round A / B within one child.
* Peak memory: the peak of live tensor bytes during one call (torch's profiler,
  deterministic), and the peak RSS in a child per method: after set-up (imports, model,
  inputs, extractor) the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``;
  ``ru_maxrss`` where that is not allowed) and the method runs twice; reported is the peak
  over those calls minus the RSS before them, the forward's in several children for the
  noise band. On CUDA: ``torch.cuda.max_memory_allocated``.
* Agreement, checked before any timing: cam-plugin's top-1 map at feature resolution against
  torchcam's ``CAM(normalized=False)`` and against Captum's ``LayerGradCam`` (× h·w, which is
  CAM for a GAP network) to 1e-4 × the map's max magnitude; pytorch-grad-cam's ``GradCAM``
  against cam-plugin's ReLU-ed, min-max-normalized, bilinearly upsampled map (Pearson
  correlation ≥ 0.999 per image). A method that disagrees is reported as such, not as a ratio.
"""
