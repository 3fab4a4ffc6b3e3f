# A ResNet classifier (mmpretrain) trained on the cluttered-digits WSOL data set, with class
# activation maps and localization scores in every validation. Run it with
#   python -c "from mmengine.config import Config; from mmengine.runner import Runner; \
#     Runner.from_cfg(Config.fromfile('mmpretrain_resnet_digits.py')).train()"
# (or mmpretrain's tools/train.py). The three CAM lines are marked "CAM".

custom_imports = dict(
    imports=["cam_plugin.integrations.mmengine"], allow_failed_imports=False
)  # CAM
default_scope = "mmpretrain"

num_classes = 10
canvas_size = 64

model = dict(
    type="ImageClassifier",
    # CIFAR-style stem (3x3 conv, no max-pool): a 64x64 input gives an 8x8 last feature map
    backbone=dict(
        type="ResNet_CIFAR",
        depth=18,
        stem_channels=32,
        base_channels=32,
        num_stages=4,
        out_indices=(3,),
        style="pytorch",
    ),
    neck=dict(type="GlobalAveragePooling"),  # the GAP the CAM needs
    head=dict(
        type="LinearClsHead",
        num_classes=num_classes,
        in_channels=256,
        loss=dict(type="CrossEntropyLoss", loss_weight=1.0),
        topk=(1,),
    ),
    data_preprocessor=dict(
        num_classes=num_classes,
        mean=[127.5, 127.5, 127.5],
        std=[127.5, 127.5, 127.5],
        to_rgb=False,
    ),
)

# the boxes travel in the data samples, so the localization metric can read them
pipeline = [dict(type="PackInputs", algorithm_keys=("gt_bboxes", "gt_bboxes_labels"))]

train_dataloader = dict(
    batch_size=64,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=True),
    collate_fn=dict(type="default_collate"),
    dataset=dict(
        type="ClutteredDigitsDataset",
        split="train",
        length=5000,
        canvas_size=canvas_size,
        seed=0,
        pipeline=pipeline,
    ),
)
val_dataloader = dict(
    batch_size=64,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    collate_fn=dict(type="default_collate"),
    dataset=dict(
        type="ClutteredDigitsDataset",
        split="test",
        length=1000,
        canvas_size=canvas_size,
        seed=0,
        test_mode=True,
        pipeline=pipeline,
    ),
)
test_dataloader = val_dataloader

val_evaluator = [
    dict(type="Accuracy", topk=(1,)),
    dict(type="CAMLocalizationMetric", cam_curve_interval=0.01, fixed_threshold=0.2),  # CAM
]
test_evaluator = val_evaluator

# from scratch on this data, AdamW learns where SGD (lr 0.05) stays at chance for 6 epochs
optim_wrapper = dict(optimizer=dict(type="AdamW", lr=2e-3, weight_decay=0.05))
param_scheduler = [dict(type="CosineAnnealingLR", T_max=10, by_epoch=True, begin=0, end=10)]
train_cfg = dict(by_epoch=True, max_epochs=10, val_interval=1)
val_cfg = dict()
test_cfg = dict()

custom_hooks = [  # CAM
    dict(
        type="CAMVisualizationHook",
        interval=1,
        max_samples=16,
        topk=1,
        target="pred",
        draw_boxes=True,
        threshold=0.2,
        alpha=0.5,
    )
]

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=20),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", interval=1, max_keep_ckpts=2),
    sampler_seed=dict(type="DistSamplerSeedHook"),
)
visualizer = dict(type="Visualizer", vis_backends=[dict(type="LocalVisBackend")])
log_processor = dict(by_epoch=True)
log_level = "INFO"
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo"))
randomness = dict(seed=0, deterministic=False)
work_dir = "work_dirs/mmpretrain_resnet_digits"
load_from = None
resume = False
