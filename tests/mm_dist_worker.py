"""Worker for the two-process test of tests/test_mmengine.py (run under ``torchrun``).

mmengine 0.10.7 on a CPU-only torch: ``launcher='pytorch'`` would call
``torch.cuda.set_device`` (fails without CUDA) and the default DDP wrapper passes
``device_ids=[local_rank]`` (fails for a CPU module). What works: initialise the gloo
process group *before* building the Runner (the Runner then skips ``init_dist``) and give
``model_wrapper_cfg=dict(type='MMDistributedDataParallel', device_ids=None)``.

Usage: torchrun --nproc_per_node=2 mm_dist_worker.py CONFIG WORK_DIR CHECKPOINT OUT_JSON
Trains the config (hook + metric) for its epochs in both processes, then runs a
validation-only pass of CHECKPOINT; rank 0 writes the metrics of both runs to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    config, work_dir, checkpoint, out_json = sys.argv[1:5]
    torch.set_num_threads(1)
    dist.init_process_group(backend="gloo")
    from mmengine.config import Config
    from mmengine.runner import Runner

    results: dict[str, object] = {"world_size": dist.get_world_size()}
    for phase in ("train", "val"):
        cfg = Config.fromfile(config)
        cfg.launcher = "pytorch"
        cfg.model_wrapper_cfg = dict(
            type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False
        )
        cfg.work_dir = os.path.join(work_dir, phase)
        cfg.experiment_name = f"dist_{phase}"
        if phase == "val":
            cfg.load_from = checkpoint
        runner = Runner.from_cfg(cfg)
        if phase == "train":
            runner.train()
            scalars = runner.message_hub.log_scalars
            results["train_metrics"] = {
                k: float(v.current()) for k, v in scalars.items() if k.startswith("val/cam/")
            }
        else:
            results["val_metrics"] = {k: float(v) for k, v in runner.val().items()}
        results[f"{phase}_wrapper"] = type(runner.model).__name__
    if dist.get_rank() == 0:
        with open(out_json, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
