# RetinaNet with a ResNet-18 + FPN trained on cluttered digits (three handwritten digits per
# 128x128 image, boxes known), with a CAM probe on its backbone: every validation reports the
# probe's multi-label mAP (cam_probe/mAP) and draws the CAM of each digit present. Run it with
#   python -c "from mmengine.config import Config; from mmengine.runner import Runner; \
#     Runner.from_cfg(Config.fromfile('mmdet_retinanet_r18_digits_probe.py')).train()"
# (or mmdet's tools/train.py). The two CAM entries are marked "CAM"; the probe's weights go to
# work_dirs/.../cam_probe/iter_N.pth next to every checkpoint.

custom_imports = dict(
    imports=["cam_plugin.integrations.mmdet"], allow_failed_imports=False
)  # CAM (also registers the ClutteredDigitsDetection data set)
default_scope = "mmdet"

num_classes = 10
canvas_size = 128

model = dict(
    type="RetinaNet",
    data_preprocessor=dict(
        type="DetDataPreprocessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32,
    ),
    backbone=dict(
        type="ResNet",
        depth=18,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=False,
        style="pytorch",
    ),
    neck=dict(
        type="FPN",
        in_channels=[64, 128, 256, 512],
        out_channels=64,
        start_level=1,
        add_extra_convs="on_input",
        num_outs=5,
    ),
    bbox_head=dict(
        type="RetinaHead",
        num_classes=num_classes,
        in_channels=64,
        stacked_convs=2,
        feat_channels=64,
        anchor_generator=dict(
            type="AnchorGenerator",
            octave_base_scale=4,
            scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0],
            strides=[8, 16, 32, 64, 128],
        ),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0),
    ),
    train_cfg=dict(
        assigner=dict(
            type="MaxIoUAssigner",
            pos_iou_thr=0.5,
            neg_iou_thr=0.4,
            min_pos_iou=0,
            ignore_iof_thr=-1,
        ),
        sampler=dict(type="PseudoSampler"),
        allowed_border=-1,
        pos_weight=-1,
        debug=False,
    ),
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms=dict(type="nms", iou_threshold=0.5),
        max_per_img=100,
    ),
)

# images are rendered on access (no files): the pipeline starts with LoadAnnotations
train_pipeline = [
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=(canvas_size, canvas_size), keep_ratio=True),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=(canvas_size, canvas_size), keep_ratio=True),  # scale_factor
    dict(
        type="PackDetInputs",
        meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
    ),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=True),
    dataset=dict(
        type="ClutteredDigitsDetection",
        split="train",
        length=4000,
        canvas_size=canvas_size,
        digits_per_image=3,
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type="ClutteredDigitsDetection",
        split="test",
        length=400,
        canvas_size=canvas_size,
        digits_per_image=3,
        test_mode=True,
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="VOCMetric", metric="mAP", eval_mode="area")
test_evaluator = val_evaluator

train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=12, val_interval=2)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(max_norm=35, norm_type=2),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=200),
    dict(type="MultiStepLR", begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]

custom_hooks = [  # CAM
    dict(
        type="CAMProbeHook",
        feature="backbone",  # the probed map: ResNet-18's layer3 output (stride 16, 8x8 here);
        index=2,  # index=-1 is layer4, or feature="neck", index=0 the finest FPN level
        optimizer=dict(type="Adam", lr=1e-3),
        interval=10,  # draw every 10th validation batch
        num_images=1,
        max_classes=3,
    )
]

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", interval=2, max_keep_ckpts=2),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="DetVisualizationHook"),
)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="DetLocalVisualizer", vis_backends=vis_backends)
log_processor = dict(type="LogProcessor", window_size=50, by_epoch=True)
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0)
work_dir = "./work_dirs/mmdet_retinanet_r18_digits_probe"
