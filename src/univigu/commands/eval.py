"""`univigu eval`: run T2V, V2T and joint generation on manifest samples, score them, write a report
(the harness is `univigu.evaluation.harness`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from univigu.atomic import check_writable
from univigu.config import TASKS
from univigu.evaluation.harness import (EvalError, Evaluatee, PipelineEvaluatee, evaluate, format_summary,
                                        load_evaluatee, load_samples, load_world, parse_tasks, readable_samples)

__all__ = ["EvalError", "Evaluatee", "PipelineEvaluatee", "evaluate", "format_summary", "load_evaluatee",
           "load_samples", "load_world", "register", "run_eval"]

EPILOG = """\
examples:
  univigu eval --ckpt_dir runs/unified --manifest data/shapes/test.jsonl --num 300
  univigu eval --ckpt_dir runs/unified --manifest data/shapes/test.jsonl --tasks v2t --candidates 1
  univigu eval --ckpt_dir runs/unified --manifest data/held/test.jsonl \\
      --manifest data/held/heldout.jsonl --tasks t2v,v2t --out runs/unified/eval

writes metrics.json (flat names per split: t2v.all_correct, v2t.colour, joint.all_correct_ci95, ...),
samples.jsonl and report.html into --out (default <ckpt_dir>/eval), each replaced once complete.
A sample whose video cannot be read is reported and left out; the exit status is then 1.
"""



def register(subparsers) -> None:
    """Add `eval` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "eval", help="evaluate a model: T2V, V2T and joint generation with ShapesWorld and caption metrics",
        description="Generate videos from prompts (T2V), caption videos (V2T) and generate both jointly, "
                    "then score them: exact ShapesWorld attribute accuracy with 95% intervals per split, "
                    "and BLEU-4 / METEOR / ROUGE-L / CIDEr (pycocoevalcap) for captions. Writes "
                    "metrics.json and a static report.html.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True, help="model directory (UniViGUPipeline.save_pretrained)")
    parser.add_argument("--manifest", required=True, action="append",
                        help="JSONL manifest with prompt, video, caption, objects (repeat for more splits)")
    parser.add_argument("--num", type=int, default=None, help="samples per manifest (default: all)")
    parser.add_argument("--out", default=None, help="output folder (default <ckpt_dir>/eval)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of t2v,v2t,joint "
                        "(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default %(default)s)")
    parser.add_argument("--batch_size", type=int, default=16, help="samples per model call (default %(default)s)")
    parser.add_argument("--caption_backend", default="auto", choices=("auto", "pycocoevalcap", "python"),
                        help="caption metric implementation (default: pycocoevalcap when Java is present)")
    parser.add_argument("--candidates", type=int, default=None, metavar="K",
                        help="V2T: captions drawn per video, the one the model's own video flow finds "
                             "most likely kept (default: the model's caption_candidates)")
    parser.add_argument("--report_examples", type=int, default=12,
                        help="examples per task and split shown in report.html (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `univigu eval`; bad input raises EvalError (a ValueError) with one clear line."""
    tasks = parse_tasks(args.tasks)
    if args.num is not None and args.num < 1:
        raise EvalError(f"--num must be at least 1, got {args.num}")
    if args.candidates is not None and args.candidates < 1:
        raise EvalError(f"--candidates must be at least 1, got {args.candidates}")
    if args.batch_size < 1:
        raise EvalError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.report_examples < 0:
        raise EvalError(f"--report_examples must be >= 0, got {args.report_examples}")
    if not Path(args.ckpt_dir).is_dir():  # fail before reading any data
        raise EvalError(f"model directory not found: {args.ckpt_dir}" if not Path(args.ckpt_dir).exists()
                        else f"--ckpt_dir must be a model directory, got a file: {args.ckpt_dir}")
    out_dir = Path(args.out) if args.out else Path(args.ckpt_dir) / "eval"
    check_writable(out_dir / "metrics.json", "--out")
    samples = load_samples(args.manifest, tasks, args.num)
    samples, bad = readable_samples(samples, tasks)
    for line in bad:
        print(f"bad: {line}", file=sys.stderr)
    if not samples:
        raise EvalError(f"no sample's video can be read ({len(bad)} bad)")
    world = load_world(args.manifest, samples)
    evaluatee = load_evaluatee(args.ckpt_dir, world, args.candidates)
    metrics = evaluate(evaluatee, samples, world, tasks, out_dir=out_dir, seed=args.seed,
                       batch_size=args.batch_size, caption_backend=args.caption_backend,
                       report_examples=args.report_examples, progress=not args.no_progress,
                       meta={"ckpt_dir": str(args.ckpt_dir), "caption_candidates": args.candidates})
    print(format_summary(metrics))
    print(f"report: {out_dir / 'report.html'}\nmetrics: {out_dir / 'metrics.json'}")
    if bad:
        print(f"error: {len(bad)} sample(s) left out: their videos cannot be read (listed above)", file=sys.stderr)
        return 1
    return 0
