"""`univigu data`: make (`synth`) and index (`index`) video data sets, and fill the training cache (`cache`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from univigu.config import WorldConfig
from .sizes import parse_frame_size


class DataCommandError(ValueError):
    """Bad arguments to `univigu data ...`."""


SYNTH_EPILOG = """\
examples:
  univigu data synth --out data/shapes --num 1000 --seed 0
  univigu data synth --out data/shapes2 --num 500 --size 48*48 --frames 13 --objects 2
  univigu data synth --out data/held --num 1000 --holdout 0.2 \\
      --splits train=0.7,val=0.1,test=0.1,heldout=0.1

writes videos/<split>/<id>.mp4, one <split>.jsonl manifest per split and world.json, into a
temporary folder renamed to --out at the end: a re-run replaces an earlier set whole (no videos of
a larger one stay behind). A folder of other files is never replaced.
"""

INDEX_EPILOG = """\
examples:
  univigu data index --videos my_clips/ --captions captions.csv --out my_clips.jsonl
  univigu data index --videos my_clips/ --captions captions.jsonl --out m.jsonl --fast

the caption table (.csv with a header row, or .jsonl) needs a file column (file, video, path,
filename, ...) and a prompt (prompt, text, ...) and/or a detailed caption (caption,
detailed_caption, description, ...). Files are matched by path relative to --videos, by file
name, or by name without extension. Bad files are listed and left out, the manifest of the good
ones is written, and the exit status is 1 (2, and no manifest, when no video is usable).
"""


CACHE_EPILOG = """\
examples:
  univigu data cache --config my.yaml --manifest clips.jsonl --out /shared/cache --workers 8
  torchrun --nproc_per_node=8 -m univigu data cache --config my.yaml --out /shared/cache
  univigu data cache --config my.yaml --out /shared/cache --num_shards 64 --shard_index $SLURM_ARRAY_TASK_ID

fills, ahead of training, every cache entry `univigu train` with the same config reads: the
latents of train.manifest (or --manifest) in train.buckets and of train.val_manifest, and the
prompt embeddings of both. Under torchrun each rank takes its share of the manifest; for a job
array give --num_shards and --shard_index. Any number of processes writes the same files. What
is stored is skipped, so a killed fill resumes where it stopped. Bad files are listed and left
out; the exit status is then 1. Train with train.cache_dir set to --out.
"""


def register(subparsers) -> None:
    """Add `data` with its `synth` and `index` subcommands to the CLI's subparsers."""
    data = subparsers.add_parser(
        "data", help="make and index video data sets",
        description="Make a ShapesWorld data set, or index a folder of your own videos.",
        epilog="examples:\n  univigu data synth --out data/shapes --num 1000\n"
               "  univigu data index --videos clips/ --captions captions.csv --out clips.jsonl\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = data.add_subparsers(dest="data_command", metavar="{synth,index,cache}", required=True)

    synth = commands.add_parser(
        "synth", help="generate a captioned ShapesWorld data set",
        description="Generate procedural captioned videos (ShapesWorld) with train/val/test\n"
                    "manifests. Deterministic: the same arguments give the same files.",
        epilog=SYNTH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = WorldConfig()
    synth.add_argument("--out", required=True, metavar="DIR", help="output folder")
    synth.add_argument("--num", type=int, required=True, metavar="N",
                       help="number of videos over all splits")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    synth.add_argument("--size", default=f"{defaults.width}*{defaults.height}", metavar="W*H",
                       help="frame size W*H (default %(default)s; 'x' works too)")
    synth.add_argument("--frames", type=int, default=defaults.frames, metavar="F",
                       help="frames per video (default %(default)s; Wan uses 4n+1)")
    synth.add_argument("--fps", type=int, default=defaults.fps, metavar="FPS",
                       help="frame rate (default %(default)s)")
    synth.add_argument("--objects", type=int, default=defaults.max_objects, metavar="K",
                       help="most objects per video (default %(default)s)")
    synth.add_argument("--min-objects", type=int, default=None, metavar="k",
                       help="fewest objects per video (default 1)")
    synth.add_argument("--holdout", type=float, default=defaults.holdout_fraction, metavar="F",
                       help="fraction of attribute combinations never seen in training; > 0 adds "
                            "a heldout split (default %(default)s)")
    synth.add_argument("--splits", default=None, metavar="NAME=F,...",
                       help="split fractions, e.g. train=0.8,val=0.1,test=0.1 (default 80/10/10, "
                            "or 70/10/10/10 with heldout when --holdout > 0)")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(func=run_synth)

    index = commands.add_parser(
        "index", help="build a manifest from a folder of videos and a caption table",
        description="Probe every video in a folder (duration, size, frame count, fps), match it\n"
                    "to its captions and write a JSONL manifest; report the bad files.",
        epilog=INDEX_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    index.add_argument("--videos", required=True, metavar="DIR",
                       help="folder of videos (searched recursively)")
    index.add_argument("--captions", required=True, metavar="FILE",
                       help="caption table (.csv or .jsonl)")
    index.add_argument("--out", required=True, metavar="MANIFEST",
                       help="manifest to write (.jsonl)")
    index.add_argument("--fast", action="store_true",
                       help="probe by reading packets only, without decoding every frame "
                            "(faster; misses damage inside the compressed data)")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    index.set_defaults(func=run_index)

    cache = commands.add_parser(
        "cache", help="encode a manifest's latents and prompt embeddings into the training cache",
        description="Fill the training cache ahead of training: decode videos in worker processes,\n"
                    "encode them with the configured codec and their prompts with the configured\n"
                    "encoder, in batches, sharded over processes, resumable.",
        epilog=CACHE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache.add_argument("--config", required=True, help="the training YAML config (codec, prompt encoder, buckets)")
    cache.add_argument("overrides", nargs="*", help="key=value config overrides")
    cache.add_argument("--manifest", action="append", default=None, metavar="M",
                       help="JSONL manifest (repeatable; default train.manifest)")
    cache.add_argument("--out", default=None, metavar="CACHE",
                       help="cache folder (default train.cache_dir, else ~/.cache/univigu)")
    cache.add_argument("--workers", type=int, default=4, metavar="N",
                       help="decoding worker processes (default %(default)s; 0 decodes in this process)")
    cache.add_argument("--batch", type=int, default=8, metavar="B", help="clips per codec batch (default %(default)s)")
    cache.add_argument("--chunk", type=int, default=64, metavar="C",
                       help="clips per cache file, the unit a killed fill redoes (default %(default)s; "
                            "4x as many prompts); fills to share a cache use the same")
    cache.add_argument("--num_shards", type=int, default=None, metavar="N",
                       help="split the work in N shards (default: torchrun's WORLD_SIZE, else 1)")
    cache.add_argument("--shard_index", type=int, default=None, metavar="I",
                       help="the shard this process fills, 0..N-1 (default: torchrun's RANK, else 0)")
    cache.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; "
                                                      "cuda:LOCAL_RANK under torchrun)")
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")
    cache.set_defaults(func=run_cache)


def parse_splits(text: str) -> dict[str, float]:
    """'train=0.8,val=0.1,test=0.1' -> {'train': 0.8, 'val': 0.1, 'test': 0.1}."""
    splits: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            splits[name.strip()] = float(value)
        except ValueError:
            raise DataCommandError(f"--splits must look like train=0.8,val=0.1,test=0.1, "
                                   f"got '{text}'") from None
    if not splits:
        raise DataCommandError("--splits is empty")
    return splits


def run_synth(args: argparse.Namespace) -> int:
    from univigu.data import shapesworld

    if args.num < 1:
        raise DataCommandError(f"--num must be at least 1, got {args.num}")
    width, height = parse_frame_size(args.size)  # the world's sizes are checked by synthesize, first
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataCommandError(f"--out {out} is a file; give a folder to write the data set into")
    world = WorldConfig(width=width, height=height, frames=args.frames, fps=args.fps,
                        min_objects=(WorldConfig().min_objects if args.min_objects is None
                                     else args.min_objects),
                        max_objects=args.objects, holdout_fraction=args.holdout)
    splits = parse_splits(args.splits) if args.splits else None
    start = time.perf_counter()
    out = shapesworld.synthesize(args.out, args.num, args.seed, world, splits,
                                 progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    counts = shapesworld.split_counts(args.num, splits or shapesworld.default_splits(world))
    summary = ", ".join(f"{name} {count}" for name, count in counts.items())
    print(f"wrote {args.num} videos ({summary}) to {out} in {elapsed:.1f} s "
          f"({args.num / max(elapsed, 1e-9):.1f} videos/s)")
    for name in counts:
        print(f"  manifest: {Path(out) / f'{name}.jsonl'}")
    return 0


def run_index(args: argparse.Namespace) -> int:
    from univigu.atomic import check_writable
    from univigu.data.manifest import index_videos

    if Path(args.out).suffix.lower() != ".jsonl":
        raise DataCommandError(f"--out must end in .jsonl, got {args.out}")
    check_writable(args.out, "--out")

    records, bad = index_videos(args.videos, args.captions, args.out,
                                progress=not args.no_progress, decode=not args.fast)
    videos = len({r["video"] for r in records})
    print(f"wrote {args.out}: {len(records)} samples from {videos} videos; {len(bad)} bad")
    for item in bad:
        print(f"  bad: {item['video']}: {item['reason']}")
    if bad:
        print(f"error: {len(bad)} bad file(s) left out of {args.out} (listed above)", file=sys.stderr)
        return 1
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from univigu.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.workers < 0 or args.batch < 1 or args.chunk < 1:
        raise DataCommandError(f"--workers must be >= 0, --batch and --chunk >= 1, got {args.workers}, "
                               f"{args.batch} and {args.chunk}")
    for manifest in args.manifest or []:
        if not Path(manifest).is_file():
            raise DataCommandError(f"--manifest {manifest} not found")
    import os

    import torch

    from univigu.training.cache import default_cache_dir
    from univigu.training.fill import fill_cache, process_shard

    num_shards, shard_index = process_shard(args.num_shards, args.shard_index)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and torch.device(device).index is None and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    out = Path(args.out or cfg.train.cache_dir or default_cache_dir())
    start = time.perf_counter()
    report = fill_cache(cfg, out, args.manifest, device=device, num_shards=num_shards, shard_index=shard_index,
                        workers=args.workers, encode_batch=args.batch, chunk=args.chunk,
                        progress=not args.no_progress and shard_index == 0)
    print(f"{out}: {report.summary()} in {time.perf_counter() - start:.1f} s")
    for item in report.bad:
        print(f"  bad: {item}")
    if report.bad:
        print(f"error: {len(report.bad)} bad file(s) left out of the cache (listed above)", file=sys.stderr)
        return 1
    return 0
