"""`univigu generate`: text-to-video with Wan2.1's flag names. Also holds the helpers the other
inference commands (`caption`, `joint`) share: runtime flags, loading and writing."""

from __future__ import annotations

import argparse
import math
import random
import re
import warnings
from pathlib import Path

from .sizes import parse_frame_size

EPILOG = """\
examples:
  univigu generate --prompt "a small red circle moves to the left" --ckpt_dir runs/unified/model
  univigu generate --prompt "a large blue square moves up" --ckpt_dir runs/unified/model \\
      --size 32*32 --frame_num 9 --sample_steps 30 --sample_shift 3 --sample_solver dpmpp2m \\
      --sample_guide_scale 4 --base_seed 7 --save_file square.mp4 --gif square.gif \\
      --contact_sheet square.png --with_caption

Defaults (size, frame count, steps, shift, solver, guidance) come from the model directory
(world.json and sampler.json); a model directory without them needs --size and --frame_num.
The video is written losslessly (H.264 crf 0, yuv444p). Existing output files are replaced, as
Wan's and diffusers' scripts do, but only once the new file is complete: a failed or interrupted
run leaves the old one as it was.
"""

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")
SOLVERS = ("euler", "heun", "dpmpp2m", "dpm++")


class CommandError(ValueError):
    """Bad command-line input (one line, printed by `univigu`)."""


# --------------------------------------------------------------------------------------------
# Shared flags and helpers
# --------------------------------------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--ckpt_dir, --device, --dtype, --no-progress."""
    parser.add_argument("--ckpt_dir", required=True, metavar="DIR",
                        help="model directory (training output or UniViGUPipeline.save_pretrained)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="compute dtype (default auto: bf16 on CUDA / AVX-512 CPUs, else fp32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="apply a LoRA (peft adapter folder, diffusers or original-key Wan .safetensors) "
                             "at SCALE (default 1); repeat for several")


def parse_lora(value: str) -> tuple[Path, float]:
    """'PATH[:SCALE]' -> (path, scale); a path that itself holds ':' keeps it unless a number follows."""
    path, sep, scale = value.rpartition(":")
    if sep:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(value), 1.0


def add_video_args(parser: argparse.ArgumentParser, solver: bool = True) -> None:
    """Video size and video sampler flags (Wan2.1's names)."""
    parser.add_argument("--size", default=None, metavar="W*H",
                        help="frame size width*height, e.g. 32*32 ('x' works too; default: the model's)")
    parser.add_argument("--frame_num", type=int, default=None, metavar="F",
                        help="number of frames (default: the model's; Wan VAE needs 4n+1)")
    if solver:
        parser.add_argument("--sample_steps", type=int, default=None, metavar="N", help="sampling steps")
        parser.add_argument("--sample_shift", type=float, default=None, metavar="S",
                            help="timestep shift of the sampling grid (Wan: 3 to 12)")
        parser.add_argument("--sample_solver", default=None, choices=SOLVERS,
                            help="video ODE solver (dpm++ = dpmpp2m)")
        parser.add_argument("--sample_guide_scale", type=float, default=None, metavar="G",
                            help="classifier-free guidance scale of the video (1 = off)")
        parser.add_argument("--negative_prompt", default=None, metavar="TEXT",
                            help="replaces the null condition in the guidance branch")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save_file", default=None, metavar="PATH.mp4",
                        help="output video (default: a name made from the prompt, in the current folder); "
                             "an existing file is replaced once the new one is complete")
    parser.add_argument("--gif", default=None, metavar="PATH.gif",
                        help="also write an animated GIF (replaces an existing file)")
    parser.add_argument("--contact_sheet", default=None, metavar="PATH.png",
                        help="also write a PNG with one column per frame (replaces an existing file)")
    parser.add_argument("--fps", type=int, default=None, help="frame rate of the files (default: the model's)")


def check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise CommandError("--prompt is empty: describe the video to generate")
    return prompt


def resolve_seed(seed: int) -> int:
    """Wan's convention: a negative seed means a random one."""
    return random.randrange(2**31) if seed < 0 else seed


def default_save_file(prompt: str, width: int, height: int, frames: int, seed: int, task: str) -> Path:
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", prompt.strip()).strip("_")[:50] or "video"
    return Path(f"{task}_{slug}_{width}x{height}_{frames}f_seed{seed}.mp4")


def check_outputs(args) -> None:
    """Fail on bad output names, and on places that cannot be written, before any model work."""
    from univigu.atomic import OutputError, check_writable

    if args.save_file is not None and Path(args.save_file).suffix.lower() not in VIDEO_SUFFIXES:
        raise CommandError(f"--save_file must end in {', '.join(VIDEO_SUFFIXES)}, got {args.save_file}")
    if args.gif is not None and Path(args.gif).suffix.lower() != ".gif":
        raise CommandError(f"--gif must end in .gif, got {args.gif}")
    if args.contact_sheet is not None and Path(args.contact_sheet).suffix.lower() != ".png":
        raise CommandError(f"--contact_sheet must end in .png, got {args.contact_sheet}")
    if args.fps is not None and args.fps < 1:
        raise CommandError(f"--fps must be at least 1, got {args.fps}")
    # The default video name is made from the model's sizes; its folder is the current one.
    outputs = (("--save_file", args.save_file or "video.mp4"), ("--gif", args.gif),
               ("--contact_sheet", args.contact_sheet))
    for flag, path in outputs:
        if path is not None:
            try:
                check_writable(path, flag)
            except OutputError as err:
                raise CommandError(str(err)) from None


def check_number(flag: str, value, low: float | None = None, above: float | None = None) -> None:
    """A numeric flag: finite, and >= `low` or > `above` when given (None = not passed)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise CommandError(f"{flag} must be a finite number, got {value}")
    if low is not None and value < low:
        raise CommandError(f"{flag} must be at least {low}, got {value}")
    if above is not None and value <= above:
        raise CommandError(f"{flag} must be greater than {above}, got {value}")


def check_video_args(args, width: int | None, height: int | None) -> None:
    """The size and sampler flags `add_video_args` adds (and those of caption / joint)."""
    for flag, value in (("--size width", width), ("--size height", height), ("--frame_num (frame count)", args.frame_num)):
        check_number(flag, value, low=1)
    check_number("--sample_steps", getattr(args, "sample_steps", None), low=1)
    check_number("--sample_shift", getattr(args, "sample_shift", None), above=0)
    for flag in ("sample_guide_scale", "text_guide_scale"):
        check_number(f"--{flag}", getattr(args, flag, None))
    check_number("--temperature", getattr(args, "temperature", None), low=0)


def load_pipeline(args):
    """The pipeline of --ckpt_dir on --device / --dtype, with progress bars unless --no-progress."""
    from univigu.pipeline import UniViGUPipeline

    from univigu.models.bundle import INDEX_NAME, missing_defaults

    directory = Path(args.ckpt_dir)
    if not directory.is_dir():
        raise CommandError(f"model directory not found: {directory}" if not directory.exists()
                           else f"--ckpt_dir must be a model directory, got a file: {directory}")
    missing = missing_defaults(directory) if (directory / INDEX_NAME).is_file() else []
    if missing:
        if args.size is None or args.frame_num is None:
            raise CommandError(f"{directory} has no {' or '.join(missing)}, so the model's frame size and count "
                               "are unknown: pass --size and --frame_num (or restore the files)")
        warnings.warn(f"{directory} has no {' or '.join(missing)}: using --size / --frame_num and the "
                      "library's defaults for the rest", stacklevel=2)
    with warnings.catch_warnings():  # the missing files were reported above
        warnings.filterwarnings("ignore", message=".* is missing: using the default")
        pipe = UniViGUPipeline.from_pretrained(directory, device=args.device, dtype=args.dtype,
                                               progress=not args.no_progress)
    from univigu.models.lora import LoraError

    for value in getattr(args, "lora", None) or []:
        path, scale = parse_lora(value)
        if not path.exists():
            raise CommandError(f"--lora: not found: {path}")
        try:
            pipe.load_lora_weights(path, scale=scale)
        except LoraError as err:
            raise CommandError(f"--lora {value}: {err}") from None
    return pipe


def write_outputs(args, pipe, frames, prompt: str, seed: int, task: str) -> Path:
    """Write the video (and GIF / contact sheet on request); print and return the video path."""
    from univigu.data.video_io import contact_sheet, write_gif, write_video

    fps = args.fps or pipe.world.fps
    f, h, w = frames.shape[:3]
    path = Path(args.save_file) if args.save_file else default_save_file(prompt, w, h, f, seed, task)
    write_video(path, frames, fps=fps)
    print(f"video: {path}")
    if args.gif:
        write_gif(args.gif, frames, fps=fps)
        print(f"gif: {args.gif}")
    if args.contact_sheet:
        contact_sheet([frames], args.contact_sheet)
        print(f"contact sheet: {args.contact_sheet}")
    return path


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="text-to-video: generate a video from a prompt",
        description="Generate a video from a text prompt (T2V). The prompt conditions the model through "
                    "the prompt encoder and, for unified models, also sits clean in the text stream.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True, help="what the video shows")
    add_model_args(parser)
    add_video_args(parser)
    parser.add_argument("--base_seed", type=int, default=0, metavar="K",
                        help="random seed (default 0; negative = random)")
    add_output_args(parser)
    parser.add_argument("--with_caption", action="store_true",
                        help="also caption the generated video with the model and print it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompt = check_prompt(args.prompt)
    width, height = parse_frame_size(args.size)
    check_video_args(args, width, height)
    check_outputs(args)
    seed = resolve_seed(args.base_seed)
    pipe = load_pipeline(args)
    out = pipe.generate(prompt, num_frames=args.frame_num, height=height, width=width, steps=args.sample_steps,
                        guidance_scale=args.sample_guide_scale, shift=args.sample_shift, solver=args.sample_solver,
                        negative_prompt=args.negative_prompt, seed=seed, with_caption=args.with_caption)
    write_outputs(args, pipe, out.frames[0], prompt, seed, "t2v")
    if out.captions is not None:
        print(f"caption: {out.captions[0]}")
    if args.base_seed < 0:
        print(f"seed: {seed}")
    return 0
