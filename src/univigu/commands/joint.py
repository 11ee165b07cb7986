"""`univigu joint`: generate a video and its caption together from one prompt (T2VT)."""

from __future__ import annotations

import argparse

from .generate import (add_model_args, add_output_args, add_video_args, check_outputs, check_prompt,
                       check_video_args, load_pipeline, resolve_seed, write_outputs)
from .sizes import parse_frame_size

EPILOG = """\
examples:
  univigu joint --prompt "a small red circle moves to the left" --ckpt_dir runs/unified/model
  univigu joint --prompt "a large blue square moves up" --ckpt_dir runs/unified/model \\
      --sample_steps 30 --sample_guide_scale 4 --text_sampler confidence --base_seed 1 \\
      --save_file square.mp4 --gif square.gif

Writes the video and prints the caption generated with it. Existing output files are replaced,
but only once the new file is complete.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "joint", help="joint generation: a video and its caption from one prompt",
        description="Generate a video and a detailed caption together (T2VT): both start from noise and "
                    "advance on one time grid, conditioned on the prompt.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True, help="what the video shows")
    add_model_args(parser)
    add_video_args(parser)
    parser.add_argument("--text_sampler", default=None, choices=("euler", "confidence"),
                        help="discrete sampler of the text (default: the model's)")
    parser.add_argument("--text_guide_scale", type=float, default=None, metavar="G",
                        help="text guidance against the branch without video (1 = off)")
    parser.add_argument("--temperature", type=float, default=None, help="text temperature (0 = argmax)")
    parser.add_argument("--base_seed", type=int, default=0, metavar="K",
                        help="random seed (default 0; negative = random)")
    add_output_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompt = check_prompt(args.prompt)
    width, height = parse_frame_size(args.size)
    check_video_args(args, width, height)
    check_outputs(args)
    seed = resolve_seed(args.base_seed)
    pipe = load_pipeline(args)
    out = pipe.joint(prompt, num_frames=args.frame_num, height=height, width=width, steps=args.sample_steps,
                     guidance_scale=args.sample_guide_scale, shift=args.sample_shift, solver=args.sample_solver,
                     negative_prompt=args.negative_prompt, seed=seed, text_sampler=args.text_sampler,
                     text_guidance_scale=args.text_guide_scale, temperature=args.temperature)
    write_outputs(args, pipe, out.frames[0], prompt, seed, "joint")
    print(f"caption: {out.captions[0]}")
    if args.base_seed < 0:
        print(f"seed: {seed}")
    return 0
