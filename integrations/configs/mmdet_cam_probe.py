# CAM probe for any mmdet detection config: add these two entries to your config (or put
# this file in its `_base_` list; a `custom_hooks` of your own then replaces this one, so
# append the probe to it). The probe trains on detached backbone features with its own
# optimizer: the detector's losses, gradients and parameters are unchanged.
#   feature/index: which map to probe, e.g. feature="backbone", index=-1 (last stage) or
#                  feature="neck", index=0 (the finest FPN level)
#   optimizer:     the probe's own optimizer
#   interval, num_images: draw CAM overlays every `interval` val batches, for `num_images`
#                  images each (through the config's visualizer; add out_dir="cam_probe_vis"
#                  for plain PNG files)
custom_imports = dict(imports=["cam_plugin.integrations.mmdet"], allow_failed_imports=False)
custom_hooks = [
    dict(
        type="CAMProbeHook",
        feature="backbone",
        index=-1,
        optimizer=dict(type="Adam", lr=1e-3),
        interval=50,
        num_images=1,
        max_classes=4,
    )
]
