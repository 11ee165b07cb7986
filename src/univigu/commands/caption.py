"""`univigu caption`: video-to-text, one caption per video file."""

from __future__ import annotations

import argparse
import json

from .generate import CommandError, add_model_args, add_video_args, load_pipeline
from .sizes import parse_frame_size

EPILOG = """\
examples:
  univigu caption clip.mp4 --ckpt_dir runs/unified/model
  univigu caption videos/*.mp4 --ckpt_dir runs/unified/model --sample_steps 16 \\
      --text_sampler confidence --base_seed 3 --json > captions.jsonl
  univigu caption clip.mp4 --ckpt_dir runs/unified/model --candidates 8   # verified by the video flow

Each video is sampled to the model's frame count (evenly over the clip) and resized to its frame
size (cover + centre crop) unless --frame_num / --size say otherwise. One video prints its
caption; several print `path<TAB>caption` lines (or JSON lines with --json).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "caption", help="video-to-text: caption video files",
        description="Caption videos (V2T): the text sampler runs on the clean video latents with the "
                    "null condition.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="video files")
    add_model_args(parser)
    add_video_args(parser, solver=False)
    parser.add_argument("--sample_steps", type=int, default=None, metavar="N", help="text sampler steps")
    parser.add_argument("--text_sampler", default=None, choices=("euler", "confidence"),
                        help="discrete sampler (default: the model's)")
    parser.add_argument("--sample_guide_scale", type=float, default=None, metavar="G",
                        help="text guidance against the branch without video (1 = off)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = argmax)")
    parser.add_argument("--candidates", type=int, default=None, metavar="K",
                        help="draw K captions per video and keep the one the model's own video flow finds "
                             "most likely (default: the model's caption_candidates)")
    parser.add_argument("--base_seed", type=int, default=0, metavar="K",
                        help="random seed; video i uses K + i (default 0)")
    parser.add_argument("--batch_size", type=int, default=8, help="videos per model call (default 8)")
    parser.add_argument("--json", action="store_true", help='print {"video": ..., "caption": ...} lines')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    width, height = parse_frame_size(args.size)
    if args.batch_size < 1:
        raise CommandError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.base_seed < 0:
        raise CommandError(f"--base_seed must be >= 0, got {args.base_seed}")
    if args.candidates is not None and args.candidates < 1:
        raise CommandError(f"--candidates must be at least 1, got {args.candidates}")
    pipe = load_pipeline(args)
    captions = []
    for start in range(0, len(args.videos), args.batch_size):
        batch = args.videos[start:start + args.batch_size]
        out = pipe.caption(batch, steps=args.sample_steps, sampler=args.text_sampler, seed=args.base_seed + start,
                           guidance_scale=args.sample_guide_scale, temperature=args.temperature,
                           num_frames=args.frame_num, height=height, width=width, candidates=args.candidates)
        captions += out.captions
    for path, caption in zip(args.videos, captions):
        if args.json:
            print(json.dumps({"video": path, "caption": caption}))
        elif len(args.videos) == 1:
            print(caption)
        else:
            print(f"{path}\t{caption}")
    return 0
