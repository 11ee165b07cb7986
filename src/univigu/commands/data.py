"""`univigu data`: make (`synth`) and index (`index`) video data sets."""

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


def register(subparsers) -> None:
    """Add `data` with its `synth` and `index` subcommands to the CLI's subparsers."""
    data = subparsers.add_parser(
        "data", help="make and index video data sets",
        description="Make a ShapesWorld data set, or index a folder of your own videos.",
        epilog="examples:\n  univigu data synth --out data/shapes --num 1000\n"
               "  univigu data index --videos clips/ --captions captions.csv --out clips.jsonl\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = data.add_subparsers(dest="data_command", metavar="{synth,index}", required=True)

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
