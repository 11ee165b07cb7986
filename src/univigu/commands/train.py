"""`univigu train`: run one training stage from a YAML config with key=value overrides."""

from __future__ import annotations

import argparse

EXAMPLE = """examples:
  univigu train --config configs/shapesworld-generator.yaml train.steps=200 train.output_dir=runs/gen
  univigu train --config CONFIG train.stage=knowledge_recall train.init_from=runs/gen/model train.output_dir=runs/kr
  torchrun --nproc_per_node=2 -m univigu train --config CONFIG   # FSDP2 + DCP (gloo on CPU, NCCL on GPU)
  univigu train --config CONFIG train.compile=true   # torch.compile each block (the first steps compile)

Outputs in train.output_dir: checkpoints/ (atomic; a rerun resumes from the newest), metrics.jsonl
(+ TensorBoard scalars in tb/ when tensorboard is installed), best/ (by train.best_metric),
samples/ (every train.sample_every steps) and model/ (the EMA weights, for the pipeline), all
written atomically. One run at a time: OUT/.lock names the run using the folder, and a second run
into it exits at once (--force takes over a lock left on another host).
Latents and prompt embeddings are cached in train.cache_dir (default ~/.cache/univigu). A run
encodes at most train.inline_cache_limit missing clips itself; fill larger sets beforehand with
`univigu data cache --config CONFIG --out CACHE` (sharded over processes, resumable).
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
    p.add_argument("--force", action="store_true",
                   help="take over the output folder's lock even when it names a run on another host "
                        "(a lock of a run on this host that is gone is taken over anyway)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config fails before torch is even imported
    import torch

    from ..training.distributed import distributed_context
    from ..training.trainer import Trainer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with distributed_context(device) as dist:
        trainer = Trainer(cfg, device=dist.device if dist else device, progress=not args.no_progress,
                          distributed=dist, force=args.force)
        out = trainer.run()
    if dist is None or dist.rank == 0:
        print(f"model directory: {out}")
    return 0
