"""`univigu train`: run one training stage from a YAML config with key=value overrides."""

from __future__ import annotations

import argparse

EXAMPLE = """example:
  univigu train --config configs/shapesworld-generator.yaml train.steps=200 train.output_dir=runs/gen
  torchrun --nproc_per_node=2 -m univigu train --config configs/tiny.yaml   # FSDP2 (gloo on CPU)
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a stage (generator, knowledge_recall, capability_refinement)",
                              description="Train one stage. Resumes from the newest checkpoint in "
                                          "train.output_dir/checkpoints when there is one.",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/); defaults are used for missing keys")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 model.num_layers=4")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..config import load_config
    from ..training.distributed import distributed_context
    from ..training.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with distributed_context(device) as dist:
        trainer = Trainer(cfg, device=dist.device if dist else device, progress=not args.no_progress,
                          distributed=dist)
        out = trainer.run()
    if dist is None or dist.rank == 0:
        print(f"model directory: {out}")
    return 0
