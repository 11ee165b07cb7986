"""The README's figure: one T2V, one V2T and one joint sample of a unified model, frame by frame.

    python docs/assets/make_demo_figure.py --ckpt_dir runs/demo/capability_refinement/model

Each row shows a video's frames (4x nearest-neighbour) and its text: the prompt and the model's
own caption (T2V), the true and the generated caption of a fresh ShapesWorld test video (V2T), the
prompt and the caption generated with the video (joint).
"""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from univigu.data.shapesworld import make_samples, render
from univigu.pipeline import UniViGUPipeline

SCALE, GAP, TEXT_WIDTH, FONT_SIZE, WRAP = 4, 6, 560, 15, 66


def draw_row(canvas: ImageDraw.ImageDraw, image: Image.Image, top: int, title: str, frames: np.ndarray,
             lines: list[str], font) -> None:
    canvas.text((GAP, top + GAP), title, fill=(0, 0, 0), font=font)
    left = 70
    for frame in frames:
        cell = Image.fromarray(frame).resize((frame.shape[1] * SCALE, frame.shape[0] * SCALE), Image.NEAREST)
        image.paste(cell, (left, top))
        left += cell.width + GAP
    lines = [wrapped for line in lines for wrapped in textwrap.wrap(line, WRAP, subsequent_indent="    ")]
    for i, line in enumerate(lines):
        canvas.text((left + 2 * GAP, top + GAP + i * (FONT_SIZE + 6)), line, fill=(0, 0, 0), font=font)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True, help="a unified model directory (the demo's)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("demo.png")))
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    pipe = UniViGUPipeline.from_pretrained(args.ckpt_dir)
    world = pipe.world
    prompt = "a large blue star moves up"
    t2v = pipe.generate(prompt, seed=args.seed, with_caption=True)
    sample = make_samples(1, seed=10000 + args.seed, world=world, split="test")[0]
    video = render(sample.scene, world)
    v2t = pipe.caption(video, seed=args.seed)
    joint = pipe.joint("a small red circle moves to the left", seed=args.seed)

    rows = [("T2V", t2v.frames[0], [f"prompt:  {prompt}", f"its own caption:  {t2v.captions[0]}"]),
            ("V2T", video, [f"true:  {sample.caption}", f"caption:  {v2t.captions[0]}"]),
            ("joint", joint.frames[0], ["prompt:  a small red circle moves to the left",
                                        f"caption:  {joint.captions[0]}"])]
    frames = max(r[1].shape[0] for r in rows)
    height = max(r[1].shape[1] for r in rows) * SCALE
    width = 70 + frames * (world.width * SCALE + GAP) + TEXT_WIDTH
    image = Image.new("RGB", (width, len(rows) * (height + GAP) + GAP), (255, 255, 255))
    canvas = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=FONT_SIZE)
    for i, (title, video_frames, lines) in enumerate(rows):
        draw_row(canvas, image, GAP + i * (height + GAP), title, video_frames, lines, font)
    tmp = Path(args.out).with_suffix(".tmp.png")
    image.save(tmp, optimize=True)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
