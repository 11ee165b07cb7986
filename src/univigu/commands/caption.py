"""`univigu caption`: video-to-text, one caption per video file."""

from __future__ import annotations

import argparse
import json
import sys

from .generate import CommandError, add_model_args, add_video_args, check_number, check_video_args, load_pipeline
from .sizes import parse_frame_size

EPILOG = """\
examples:
  univigu caption clip.mp4 --ckpt_dir runs/unified/model
  univigu caption videos/*.mp4 --ckpt_dir runs/unified/model --sample_steps 16 \\
      --text_sampler confidence --base_seed 3 --json > captions.jsonl
  univigu caption clip.mp4 --ckpt_dir runs/unified/model --candidates 8   # verified by the video flow

Each video is sampled to the model's frame count (evenly over the clip) and resized to its frame
size (cover + centre crop) unless --frame_num / --size say otherwise. One video prints its
caption; several print `path<TAB>caption` lines (or JSON lines with --json). A video that cannot
be read is reported on stderr and the others are still captioned; the exit status is then 1.
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
    import torch

    width, height = parse_frame_size(args.size)
    check_video_args(args, width, height)
    if args.batch_size < 1:
        raise CommandError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.base_seed < 0:
        raise CommandError(f"--base_seed must be >= 0, got {args.base_seed}")
    check_number("--candidates", args.candidates, low=1)
    pipe = load_pipeline(args)
    if not pipe.has_text_stream:
        pipe._require_text_stream("captioning")
    # Each file is read on its own, so one bad file is reported and the others still get captions.
    loaded, failed = [], []
    for index, path in enumerate(args.videos):
        try:
            loaded.append((index, path, pipe.load_videos(path, num_frames=args.frame_num, height=height,
                                                          width=width)))
        except (ValueError, OSError) as err:
            failed.append(path)
            print(f"error: {err}" if str(path) in str(err) else f"error: {path}: {err}", file=sys.stderr)
    captions = {}
    for start in range(0, len(loaded), args.batch_size):
        batch = loaded[start:start + args.batch_size]
        out = pipe.caption(torch.cat([video for _, _, video in batch]), steps=args.sample_steps,
                           sampler=args.text_sampler, seed=[args.base_seed + index for index, _, _ in batch],
                           guidance_scale=args.sample_guide_scale, temperature=args.temperature,
                           candidates=args.candidates)
        captions.update({index: caption for (index, _, _), caption in zip(batch, out.captions)})
    for index, path in enumerate(args.videos):
        if index not in captions:
            continue
        caption = captions[index]
        if args.json:
            print(json.dumps({"video": path, "caption": caption}))
        elif len(args.videos) == 1:
            print(caption)
        else:
            print(f"{path}\t{caption}")
    if failed:
        if len(args.videos) == 1:
            return 2
        print(f"error: {len(failed)} of {len(args.videos)} videos could not be captioned: "
              f"{', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0
