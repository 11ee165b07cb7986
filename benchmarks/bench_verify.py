"""How well a model's own text-to-video flow loss tells an attribute apart (caption verification).

For each ShapesWorld test video (the model's world, `make_samples(..., split="test")`) and each
attribute (shape, motion, size, colour), the script writes one caption per value of the attribute
(`caption_text` of the scene with that attribute changed, the rest as it is), scores every caption by
`UniViGUPipeline.caption_flow_loss` (the pipeline's verification: the caption as the prompt and as
the clean text stream, the same noise for every caption of a video) at each set of noise levels,
and counts how often the
true value has the lowest loss. Chance is one over the number of values.

    python benchmarks/bench_verify.py --model src/univigu/assets/generator --num 200 --threads 2
    python benchmarks/bench_verify.py --model runs/demo/capability_refinement/model --levels 0.3,0.5 0.5,0.7

Writes benchmarks/results/verify_discrimination.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from common import RESULTS_DIR, machine_info, write_json
from univigu.data.shapesworld import COLOURS, MOTIONS, SHAPES, SIZES, caption_text, make_samples, render
from univigu.data.video_io import frames_to_tensor
from univigu.pipeline import UniViGUPipeline

VALUES = {"shape": list(SHAPES), "motion": list(MOTIONS), "size": list(SIZES), "colour": list(COLOURS)}


def swapped_captions(sample, attribute: str) -> tuple[list[str], int]:
    """One caption per value of `attribute` (the scene's caption with the object's attribute set to
    that value), and the index of the true value."""
    obj = sample.scene.objects[0]
    values = VALUES[attribute]
    captions = [caption_text(dataclasses.replace(sample.scene, objects=(dataclasses.replace(obj, **{attribute: v}),)))
                for v in values]
    return captions, values.index(getattr(obj, attribute))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory (a generator or a unified model)")
    parser.add_argument("--num", type=int, default=200, help="test videos (default %(default)s)")
    parser.add_argument("--attributes", nargs="+", default=list(VALUES), choices=list(VALUES))
    parser.add_argument("--levels", nargs="+", default=["0.1", "0.3", "0.5", "0.7", "0.3,0.5", "0.6,0.8"],
                        help="noise-level sets, comma-separated within a set (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="ShapesWorld seed of the test videos")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or auto (default %(default)s)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "verify_discrimination.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    level_sets = [tuple(float(x) for x in spec.split(",")) for spec in args.levels]
    pipe = UniViGUPipeline.from_pretrained(args.model, dtype=args.dtype)
    samples = make_samples(args.num, args.seed, pipe.world, "test")
    latents = pipe.codec.encode(torch.stack([frames_to_tensor(render(s.scene, pipe.world)) for s in samples]))

    results = []
    for attribute in args.attributes:
        pairs = [swapped_captions(s, attribute) for s in samples]
        k = len(pairs[0][0])
        texts = [c for captions, _ in pairs for c in captions]
        truth = torch.tensor([t for _, t in pairs])
        for levels in level_sets:
            start = time.perf_counter()
            losses = pipe.caption_flow_loss(latents.repeat_interleave(k, 0), texts,
                                            [i for i in range(args.num) for _ in range(k)], levels=levels)
            accuracy = (losses.view(args.num, k).argmin(1) == truth).float().mean().item()
            row = {"attribute": attribute, "values": k, "levels": list(levels), "accuracy": accuracy,
                   "chance": 1 / k, "seconds": time.perf_counter() - start}
            results.append(row)
            print(f"{attribute:7s} ({k} values) levels {','.join(map(str, levels)):8s} "
                  f"true value lowest: {100 * accuracy:5.1f}% (chance {100 / k:.0f}%)", flush=True)
    payload = {"benchmark": "verify_discrimination", "model": args.model, "num": args.num, "seed": args.seed,
               "dtype": str(pipe.dtype), "machine": machine_info(), "results": results}
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
