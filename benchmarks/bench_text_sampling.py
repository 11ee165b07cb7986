"""Caption quality against the number of text sampling steps, per text sampler and text source.

For each model directory, each text sampler (`euler`: the exact discrete Euler step of the mixture
path; `confidence`: commit the most confident masked positions, mask source only) and each number
of steps S, the script captions the videos of a ShapesWorld test manifest (V2T through
`UniViGUPipeline.caption`) and scores the captions with the project's own evaluation
(`univigu.commands.eval.evaluate`, task v2t): attribute accuracy parsed from the caption against the
exact ground truth (colour, shape, size, motion per object; all_correct per video, with 95% Wilson
intervals), and the caption metrics against the manifest's detailed caption (BLEU-4, METEOR,
ROUGE-L, CIDEr; pycocoevalcap when Java is present, else the labelled pure-Python fallback,
without METEOR). Beside quality it records the model evaluations per caption (NFE: one per step,
two with text guidance; the clean-video prefill of a cached model is not counted) and the wall and
process-CPU seconds per caption (a batch's time divided by its size).

The text source (mask or uniform) is read from each directory's `flow.json` (the path the pipeline
builds) and labels its rows; `confidence` needs masks, so it is skipped for a uniform-source model.
Sample i of the manifest gets seed `seed + i` in every run, so rows differ only in model, sampler
and steps. Temperature and text guidance are the directory's `sampler.json` defaults unless
`--temperature` is given. `--candidates K ...` adds caption verification as a further axis: K
captions per video, the one the model's own video flow finds most likely kept (flow/verify.py); the
verification's model calls are not in the NFE column, its time is in the seconds.

    python benchmarks/bench_text_sampling.py --models runs/mask/model runs/uniform/model \\
        --manifest data/shapes/test.jsonl --num 100 --threads 1
    python benchmarks/bench_text_sampling.py --models runs/mask/model --manifest data/shapes/test.jsonl \\
        --steps 2 4 8 --samplers confidence --plot benchmarks/results/text_sampling.png
    python benchmarks/bench_text_sampling.py --models runs/demo/capability_refinement/model \\
        --manifest runs/demo/test_data/test.jsonl --num 300 --steps 12 --samplers confidence --candidates 1 4 8
Writes benchmarks/results/text_sampling.json (and the plot when matplotlib is importable).
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import torch

from common import RESULTS_DIR, load_average, machine_info, timed_both, write_json
from univigu.commands.eval import PipelineEvaluatee, evaluate, load_samples, load_world
from univigu.config import to_dict
from univigu.data.video_io import frames_to_tensor, read_video
from univigu.flow.options import TextSampler, TextSamplerOptions
from univigu.pipeline import UniViGUPipeline

SAMPLERS = typing.get_args(TextSampler)  # ("euler", "confidence")
ATTRIBUTES = ("colour", "shape", "size", "motion", "all_correct")
CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
EXAMPLES = 3  # captions kept per row, to eyeball beside the numbers


class TimedCaptioner(PipelineEvaluatee):
    """The eval adapter of a pipeline, captioning with a given sampler and number of steps.

    `evaluate` calls `caption(videos)` batch by batch in manifest order without a seed, so the seed
    is counted here: sample i gets `seed + i` whatever the batch size. Only the pipeline call is
    timed (the videos are decoded before and scored after)."""

    def __init__(self, pipeline, world, sampler: str, steps: int, seed: int, temperature: float | None,
                 candidates: int | None = None):
        super().__init__(pipeline, world)
        self.sampler, self.steps, self.temperature, self.candidates = sampler, steps, temperature, candidates
        self.next_seed = seed
        self.wall_s = self.cpu_s = 0.0
        self.nfe: list[int] = []  # one per batch
        self.captions: list[str] = []

    def caption(self, videos):
        batch = torch.stack([frames_to_tensor(v) for v in videos])
        seeds = list(range(self.next_seed, self.next_seed + len(videos)))
        self.next_seed += len(videos)
        out = {}
        wall, cpu = timed_both(lambda: out.setdefault("caption", self.pipeline.caption(
            batch, steps=self.steps, sampler=self.sampler, seed=seeds, temperature=self.temperature,
            candidates=self.candidates)),
            self.pipeline.device)
        self.wall_s += wall
        self.cpu_s += cpu
        self.nfe.append(out["caption"].nfe)
        self.captions += out["caption"].captions
        return out["caption"].captions


def load_manifest(manifest: str, num: int):
    """Manifest records with their videos decoded once (evaluate takes arrays in place of paths),
    and the ShapesWorld config beside the manifest."""
    samples = load_samples([manifest], ["v2t"], num)
    for sample in samples:
        sample["video"] = read_video(sample["video"])
    return samples, load_world([manifest], samples)


def load_model(directory: str, device: str | None):
    """The pipeline and the text source it was trained with (flow.json; the pipeline's text path)."""
    pipe = UniViGUPipeline.from_pretrained(directory, device=device)
    if not pipe.has_text_stream:
        raise SystemExit(f"{directory} is a video-only model: it cannot caption")
    return pipe, pipe.text_path.source


def check_world(pipe, world, directory: str) -> None:
    # The pipeline captions any size its codec takes, but a model sees its training size best.
    mw = pipe.world
    if (mw.width, mw.height, mw.frames) != (world.width, world.height, world.frames):
        print(f"warning: {directory} was made for {mw.width}x{mw.height}x{mw.frames} videos, the manifest "
              f"holds {world.width}x{world.height}x{world.frames}", flush=True)


def warm_up(pipe, samples, seed: int) -> None:
    """One untimed caption, so thread pools and first-call allocations are not timed (euler runs
    under both sources)."""
    pipe.caption(frames_to_tensor(samples[0]["video"]), steps=1, sampler="euler", seed=seed)


def split_metrics(metrics: dict) -> dict:
    """evaluate's per-split flat metrics, the v2t prefix dropped: {split: {name: value}}."""
    return {split: {name.removeprefix("v2t."): value for name, value in flat.items()}
            for split, flat in metrics.items() if split != "meta"}


def run_case(pipe, directory, source, samples, world, sampler, steps, args, candidates=None) -> dict:
    captioner = TimedCaptioner(pipe, world, sampler, steps, args.seed, args.temperature, candidates)
    metrics = evaluate(captioner, samples, world, tasks=["v2t"], seed=args.seed, batch_size=args.batch_size,
                       caption_backend=args.caption_backend)
    n = len(samples)
    nfe = sorted(set(captioner.nfe))
    overrides = {} if args.temperature is None else {"temperature": args.temperature}
    options = TextSamplerOptions.from_config(pipe.sampler, steps=steps, sampler=sampler, **overrides)
    meta = metrics["meta"]
    return {
        "model": str(directory), "source": source, "sampler": sampler, "steps": steps,
        "temperature": options.temperature, "text_guidance_scale": options.guidance_scale,
        "caption_candidates": pipe.sampler.caption_candidates if candidates is None else candidates,
        "nfe_per_caption": nfe[0] if len(nfe) == 1 else nfe,
        "wall_s_per_caption": captioner.wall_s / n, "cpu_s_per_caption": captioner.cpu_s / n,
        "n": n, "batch_size": args.batch_size,
        "metrics": split_metrics(metrics),
        "caption_backend": meta.get("caption_backend"), "caption_metrics_unavailable": meta.get("unavailable"),
        "notes": meta.get("notes"),
        "examples": [{"id": s.get("id"), "caption": c, "reference": s.get("caption")}
                     for s, c in zip(samples[:EXAMPLES], captioner.captions)],
    }


def skipped_row(directory, source, sampler, steps, reason) -> dict:
    return {"model": str(directory), "source": source, "sampler": sampler, "steps": steps, "skipped": reason}


def label(row) -> str:
    return f"{Path(row['model']).name} ({row['source']})"


def sampler_name(row) -> str:
    k = row.get("caption_candidates", 1)
    return row["sampler"] if k == 1 else f"{row['sampler']} x{k}"


def format_table(rows, clock: str) -> str:
    """One line per (model, sampler, steps, split): accuracies in %, caption metrics, NFE, time."""
    names = [*ATTRIBUTES, *CAPTION_METRICS]
    widths = [max(len(n), 7) for n in names]
    head = (f"{'model (source)':24s} {'sampler':10s} {'steps':>5s} {'split':7s} {'NFE':>4s} "
            + " ".join(f"{n:>{w}s}" for n, w in zip(names, widths)) + f" {clock + ' s/cap':>10s}")
    lines = [head, "-" * len(head)]
    for row in rows:
        front = f"{label(row)[:24]:24s} {sampler_name(row):10s} {row['steps']:5d}"
        if "skipped" in row:
            lines.append(f"{front} skipped: {row['skipped']}")
            continue
        for split, flat in row["metrics"].items():
            cells = []
            for name, w in zip(names, widths):
                value = flat.get(name)
                if value is None:
                    cells.append(f"{'-':>{w}s}")
                elif name in ATTRIBUTES:  # rates, shown in %
                    cells.append(f"{100 * value:{w - 1}.1f}%")
                else:
                    cells.append(f"{value:{w}.3f}")
            lines.append(f"{front} {split[:7]:7s} {str(row['nfe_per_caption']):>4s} " + " ".join(cells)
                         + f" {row[clock + '_s_per_caption']:10.4f}")
    return "\n".join(lines)


def plot(rows, path: str) -> str | None:
    """all_correct (first split) against steps, one line per (model, sampler); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not importable here (pip install -e \".[bench]\"): no plot written to {path}", flush=True)
        return None
    lines: dict[tuple, list] = {}
    for row in rows:
        if "skipped" not in row:
            flat = next(iter(row["metrics"].values()))
            lines.setdefault((label(row), sampler_name(row)), []).append((row["steps"], flat["all_correct"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, sampler), points in lines.items():
        points.sort()
        ax.plot([s for s, _ in points], [100 * (a or 0.0) for _, a in points], marker="o",
                label=f"{name}, {sampler}")
    steps = sorted({row["steps"] for row in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("text sampling steps")
    ax.set_ylabel("V2T all correct (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, metavar="DIR",
                        help="model directories (e.g. one trained with the mask source, one with uniform)")
    parser.add_argument("--manifest", required=True, help="ShapesWorld test manifest (univigu data synth)")
    parser.add_argument("--num", type=int, default=100, help="videos captioned per run (default %(default)s)")
    parser.add_argument("--steps", nargs="+", type=int, default=[2, 4, 8, 16, 32])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--batch_size", type=int, default=16, help="videos per pipeline call (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="posterior temperature (default: each model's sampler.json)")
    parser.add_argument("--candidates", nargs="+", type=int, default=[None], metavar="K",
                        help="captions per video, verified by the video flow (default: each model's sampler.json)")
    parser.add_argument("--caption_backend", default="auto", choices=("auto", "pycocoevalcap", "python"),
                        help="caption metrics: pycocoevalcap needs Java; auto uses it when present")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="sample i gets seed + i (default %(default)s)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "text_sampling.json"))
    parser.add_argument("--plot", default=None, metavar="PNG", help="also plot all_correct against steps")
    args = parser.parse_args(argv)
    if args.num < 1 or args.batch_size < 1 or min(args.steps) < 1 or min(k or 1 for k in args.candidates) < 1:
        parser.error("--num, --batch_size, every --steps and every --candidates must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    samples, world = load_manifest(args.manifest, args.num)
    clock = "cpu" if torch.get_num_threads() == 1 else "wall"  # CPU time is immune to preemption

    rows, models = [], []
    for directory in args.models:
        pipe, source = load_model(directory, args.device)
        check_world(pipe, world, directory)
        models.append({"dir": str(directory), "source": source, "device": str(pipe.device), "dtype": str(pipe.dtype),
                       "transformer": to_dict(pipe.transformer.config), "world": to_dict(pipe.world),
                       "sampler_defaults": to_dict(pipe.sampler)})
        warm_up(pipe, samples, args.seed)
        for sampler in args.samplers:
            for steps in args.steps:
                if sampler == "confidence" and source != "mask":
                    rows.append(skipped_row(directory, source, sampler, steps, "confidence needs the mask source"))
                    continue
                for candidates in args.candidates:
                    rows.append(run_case(pipe, directory, source, samples, world, sampler, steps, args, candidates))
                    print("\n".join(format_table(rows[-1:], clock).splitlines()[2:]), flush=True)
        del pipe

    print()
    print(format_table(rows, clock))
    payload = {
        "benchmark": "text_sampling",
        "description": "V2T caption quality (ShapesWorld attribute accuracy, caption metrics) against the "
                       "number of text sampling steps, per text sampler and text source; NFE and seconds "
                       "per caption",
        "manifest": str(args.manifest), "n": len(samples),
        "world": to_dict(world),
        "seed": args.seed, "batch_size": args.batch_size, "clock": clock,
        "models": models,
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "note": "seconds per caption are a batch's time over its size; with one torch thread the process "
                "CPU time is the figure to trust on a shared machine. Accuracies are rates in [0, 1] with "
                "95% Wilson intervals (<name>_ci95)",
        "results": rows,
    }
    if args.plot:
        payload["plot"] = plot(rows, args.plot)
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
