"""The generation-centric claim at equal compute.

Every variant trains the same transformer (the shipped generator's shape plus the text stream) for
the same number of optimizer steps of the same batch, from the unified preset
(`shapesworld-unified`), and is validated every `--eval_every` steps on the same held-out
ShapesWorld videos with the exact oracle (V2T attribute accuracy of the sampled captions):

* `grown`: the shipped generator grown into the unified model, Knowledge Recall then Capability
  Refinement (the demo's recipe, text parts trained, video frozen);
* `grown_no_kr`: the same without Knowledge Recall (all steps Capability Refinement);
* `scratch`: understanding only: the same architecture from a random initialisation, every
  parameter trained, V2T samples only (captions only);
* `grown_full`: `grown` with the published `full` attention policy instead of `clean_isolated`.

Each variant and step budget is a run directory under `--out` (`grown-600steps`, ...); a finished
run is read back instead of retrained, and an interrupted one resumes from its last checkpoint
(`--save_every`), so the benchmark can be split across several invocations; `--report_only` writes the results
logged so far without training. Writes benchmarks/results/claim.json (per variant: the
validation metrics at every evaluation, keyed by total steps) and claim.png (V2T all-correct and
shape and motion accuracy against steps) when matplotlib is importable; `--result` names another
file (the PNG follows it). The JSON starts with a "provenance" block (machine, date, commit,
command). Run again with the same settings, it only re-reads the finished runs (to re-plot, or to
add variants).

    OMP_NUM_THREADS=1 python benchmarks/bench_claim.py --steps 600 --kr_steps 50 --variants grown scratch

The committed results claim.json and claim_2000.json were measured with an earlier unified preset
(batch 16, no text query projections, joint_unconditional 0.3; commits a72af2f and e34c298); to
train those runs again, add its settings as overrides:
    train.batch_size=16 model.text_query_projection=false train.mixture.joint_unconditional=0.3
claim_equal_compute_one_caption.json used the preset of commit a759220, whose validations sample
text at temperature 1 (the preset now commits text at temperature 0); claim_equal_compute.json is
the preset with caption verification. docs/EXPERIMENTS.md gives the final models' evaluations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS_DIR, load_average, machine_info, write_json
from univigu.commands.demo import shipped_generator_dir, unified_stage
from univigu.config import load_config
from univigu.models.bundle import load_bundle
from univigu.training.logging import read_metrics
from univigu.training.trainer import Trainer

VARIANTS = ("grown", "grown_no_kr", "scratch", "grown_full")
SCRATCH = ["train.trainable=all", "train.mixture.t2v=0", "train.mixture.v2t=1", "train.mixture.joint=0"]
KEPT = ("v2t.all_correct", "v2t.shape", "v2t.colour", "v2t.size", "v2t.motion", "t2v.all_correct",
        "val.text_loss")


def validation_log(run_dir: Path, offset: int) -> list[dict]:
    """The oracle validations of one stage, their steps shifted by the steps before the stage."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():  # --report_only on a stage that has not started
        return []
    return [{"step": entry["step"] + offset, **{k: entry[k] for k in KEPT if k in entry}}
            for entry in read_metrics(log) if "v2t.all_correct" in entry]


def train_stage(stage: str, root: Path, init_from: Path, steps: int, args, world, extra: list[str]) -> Path:
    """The demo's stage (ROOT/STAGE) with this benchmark's validation and checkpoint settings;
    a finished stage (or any under --report_only) is not trained again."""
    model = root / stage / "model"
    if (model / "model_index.json").is_file() or args.report_only:
        return model
    settings = [f"train.eval_every={args.eval_every}", f"train.eval_samples={args.eval_samples}",
                f"train.save_every={args.save_every}", f"train.seed={args.seed}"]
    return unified_stage(stage, root, init_from, steps, not args.no_progress, args.device, world, settings + extra)


def random_generator(out: Path, args) -> Path:
    """A generator-shaped model that never trained: the scratch variant's starting point."""
    model = out / "model"
    if not (model / "model_index.json").is_file() and not args.report_only:
        cfg = load_config("shapesworld-generator", [f"train.output_dir={out}", "train.steps=0",
                                                    "train.eval_samples=0", f"train.seed={args.seed}"])
        Trainer(cfg, device=args.device, progress=False).run()
    return model


def run_variant(name: str, args, world) -> list[dict]:
    root = Path(args.out) / f"{name}-{args.steps}steps"  # other budgets are other runs
    if name == "scratch":
        start = random_generator(root / "random_init", args)
        train_stage("capability_refinement", root, start, args.steps, args, world, list(args.overrides) + SCRATCH)
        return validation_log(root / "capability_refinement", 0)
    extra = list(args.overrides) + (["model.attention_policy=full"] if name == "grown_full" else [])
    kr_steps = 0 if name == "grown_no_kr" else args.kr_steps
    rows, start = [], shipped_generator_dir()
    if kr_steps:
        start = train_stage("knowledge_recall", root, start, kr_steps, args, world, extra)
        rows += validation_log(root / "knowledge_recall", 0)
    train_stage("capability_refinement", root, start, args.steps - kr_steps, args, world, extra)
    return rows + validation_log(root / "capability_refinement", kr_steps)


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, ("v2t.all_correct", "v2t.shape", "v2t.motion")):
        for name, rows in results.items():
            ax.plot([r["step"] for r in rows], [100 * r[metric] for r in rows], marker="o", label=name)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per variant, all stages")
    parser.add_argument("--kr_steps", type=int, default=50, help="Knowledge Recall steps of the grown variants")
    parser.add_argument("--eval_every", type=int, default=150)
    parser.add_argument("--eval_samples", type=int, default=64, help="held-out videos per validation")
    parser.add_argument("--save_every", type=int, default=150, help="checkpoint interval (resume points)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/claim", help="run directories, one per variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing: write the JSON and plot from the validations logged so far")
    parser.add_argument("--result", default=str(RESULTS_DIR / "claim.json"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the unified preset for every variant")
    args = parser.parse_args()
    if not 0 <= args.kr_steps < args.steps:
        parser.error("--kr_steps must lie in [0, --steps)")

    result_path = Path(args.result)
    load_before = load_average()
    world = load_bundle(shipped_generator_dir()).world  # every stage trains on the generator's world
    fresh = {}
    for name in args.variants:
        fresh[name] = run_variant(name, args, world)
        print(name, json.dumps(fresh[name][-1] if fresh[name] else {}), flush=True)
    # Read the file only now: another process may have added its variants meanwhile.
    results = json.loads(result_path.read_text()).get("variants", {}) if result_path.is_file() else {}
    results.update(fresh)
    settings = {k: getattr(args, k) for k in ("steps", "kr_steps", "eval_every", "eval_samples", "seed", "overrides")}
    settings["partial"] = args.report_only  # runs may still be going: their curves can end early
    payload = {"machine": machine_info(), "load_average": {"before": load_before, "after": load_average()},
               "settings": settings, "variants": results}
    write_json(result_path, payload)
    figure = plot(results, result_path.with_suffix(".png"))
    print(f"wrote {result_path}" + (f" and {figure}" if figure else ""))


if __name__ == "__main__":
    main()
