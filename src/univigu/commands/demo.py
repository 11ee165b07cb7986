"""`univigu demo`: the main job. Grow the shipped ShapesWorld video generator into a unified model.

Stages, each with a progress bar:
  1. load the shipped generator (a `generator`-stage model directory inside the package),
  2. Knowledge Recall (the text stream learns to reconstruct the prompt),
  3. Capability Refinement (the text target becomes the detailed caption),
  4. T2V, V2T and joint generation on iid test samples, scored by the ShapesWorld oracle,
     with the metrics table printed and an HTML report written.
`--from-scratch` trains the generator first, in its two runs of 4000 + 3000 steps (about 2 hours on
one CPU thread, minutes on a GPU).
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.resources import files
from pathlib import Path

from univigu.atomic import atomic_write_text

EXAMPLE = """example:
  univigu demo                         # about 9 minutes on a 2-core CPU
  univigu demo --num_test 500 --out runs/demo500
  univigu demo --from-scratch          # also trains the generator (hours on a CPU)
  univigu demo --kr_steps 600 train.batch_size=32   # preset overrides for both unified stages
"""


# Steps of the two unified stages: the 10-minute budget on a 2-core CPU holds about 2200 steps of
# batch 8 (the preset's) beside the evaluation; 2000 leaves room for a slower machine.
# Understanding is update-bound, and at this budget refinement steps pay more than recall steps
# (docs/EXPERIMENTS.md, "The unified recipe").
KR_STEPS, CR_STEPS = 50, 2000
# The shipped generator's second run, continued from the preset's on new videos (motion needed the
# steps: its validation motion went 38% -> 100%); `--from-scratch` repeats both runs.
GENERATOR_CONTINUATION = ("train.steps=3000", "train.lr=3e-4", "train.warmup_steps=50", "train.seed=1")


def shipped_generator_dir() -> Path:
    return Path(str(files("univigu") / "assets" / "generator"))


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the main job: generator -> unified model -> T2V/V2T/joint + report",
                              description=__doc__, epilog=EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--num_test", type=int, default=300, help="iid test samples to evaluate (default 300)")
    p.add_argument("--kr_steps", type=int, default=KR_STEPS, help=f"Knowledge Recall steps (default {KR_STEPS})")
    p.add_argument("--cr_steps", type=int, default=CR_STEPS,
                   help=f"Capability Refinement steps (default {CR_STEPS})")
    p.add_argument("--from-scratch", dest="from_scratch", action="store_true",
                   help="train the generator too instead of loading the shipped one")
    p.add_argument("--generator", default=None,
                   help="start from this generator model directory instead of the shipped one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides of the unified preset for both stages, e.g. train.batch_size=8")
    p.set_defaults(func=run)


def unified_stage(name: str, out: Path, init_from: Path, steps: int, progress: bool, device: str,
                  world, extra: list[str]) -> Path:
    """Train stage `name` of the unified preset from `init_from` into OUT/NAME; returns its model
    directory. `extra`: further key=value overrides (benchmarks/bench_claim.py reuses the stages)."""
    from ..config import load_config, to_dict
    from ..training.trainer import Trainer

    overrides = [f"train.stage={name}", f"train.init_from={init_from}", f"train.output_dir={out / name}",
                 f"train.steps={steps}"]
    # The stages train on the generator's own world (frame count, size), whatever the preset says.
    overrides += [f"world.{key}={value}" for key, value in to_dict(world).items()]
    cfg = load_config("shapesworld-unified", overrides + list(extra))
    return Trainer(cfg, device=device, progress=progress).run()


def _generator(out: Path, from_scratch: bool, progress: bool, device: str, directory: str | None) -> Path:
    if directory:
        if not (Path(directory) / "model_index.json").is_file():
            raise FileNotFoundError(f"{directory} is not a univigu model directory (no model_index.json)")
        return Path(directory)
    if not from_scratch:
        directory = shipped_generator_dir()
        if not (directory / "model_index.json").is_file():
            raise FileNotFoundError(f"the shipped generator is missing from {directory}; "
                                    "run `univigu demo --from-scratch` to train one")
        return directory
    from ..config import load_config
    from ..training.trainer import Trainer

    cfg = load_config("shapesworld-generator", [f"train.output_dir={out / 'generator'}"])
    first = Trainer(cfg, device=device, progress=progress).run()
    cfg = load_config("shapesworld-generator", [f"train.output_dir={out / 'generator_continued'}",
                                                f"train.init_from={first}", *GENERATOR_CONTINUATION])
    return Trainer(cfg, device=device, progress=progress).run()


def run(args) -> int:
    import torch

    from ..data.shapesworld import synthesize
    from ..models.bundle import load_bundle
    from ..pipeline import UniViGUPipeline
    from ..evaluation.harness import PipelineEvaluatee, evaluate, format_summary, load_samples

    from ..atomic import check_writable
    from ..config import load_config

    if args.num_test < 1:
        raise ValueError("--num_test must be at least 1")
    for flag, value in (("--kr_steps", args.kr_steps), ("--cr_steps", args.cr_steps)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    load_config("shapesworld-unified", list(args.overrides))  # bad overrides fail before any work
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    progress = not args.no_progress
    out = Path(args.out)
    check_writable(out / "demo_summary.json", "--out")
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = time.time()

    def phase(name, fn, *a):
        t0 = time.time()
        print(f"\n== {name}", flush=True)
        result = fn(*a)
        times[name] = round(time.time() - t0, 1)
        print(f"   {name}: {times[name]:.0f} s", flush=True)
        return result

    gen_dir = phase("generator", _generator, out, args.from_scratch, progress, device, args.generator)
    world = load_bundle(gen_dir).world
    kr_dir = phase("knowledge_recall", unified_stage, "knowledge_recall", out, gen_dir, args.kr_steps, progress,
                   device, world, args.overrides)
    cr_dir = phase("capability_refinement", unified_stage, "capability_refinement", out, kr_dir, args.cr_steps,
                   progress, device, world, args.overrides)

    def evaluation():
        data_dir = synthesize(out / "test_data", args.num_test, 10_000 + args.seed, world,
                              splits={"test": 1.0}, progress=progress)
        samples = load_samples([data_dir / "test.jsonl"], ("t2v", "v2t", "joint"))
        pipe = UniViGUPipeline.from_pretrained(cr_dir, device=device)
        return evaluate(PipelineEvaluatee(pipe, world), samples, world, out_dir=out / "eval", seed=args.seed,
                        batch_size=50, progress=progress, title="univigu demo: ShapesWorld",
                        meta={"model": str(cr_dir), "generator": str(gen_dir)})

    metrics = phase("evaluation", evaluation)
    total = round(time.time() - start, 1)
    reference = gen_dir / "metrics.json"
    summary = {"wall_seconds": total, "phase_seconds": times, "metrics": metrics}
    if reference.is_file():
        summary["generator_reference"] = json.loads(reference.read_text())
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=2))
    print("\n" + format_summary(metrics))
    if "generator_reference" in summary:
        ref = summary["generator_reference"]
        print(f"shipped generator alone: t2v.all_correct = {ref.get('t2v.all_correct')}")
    print(f"\nreport: {out / 'eval' / 'report.html'}\nwall time: {total:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")
    return 0
