"""Capability Refinement with the shared attention frozen against adapted with LoRA (peft).

All variants grow the shipped ShapesWorld generator with the demo's recipe (`shapesworld-unified`):
one Knowledge Recall stage, shared by every variant, then Capability Refinement of equal steps
and batch from it:

* `frozen`: the demo's recipe, only the text parts train (`train.trainable=text`);
* `lora8`, `lora32`: the same, plus LoRA adapters of rank 8 / 32 (alpha = rank) on the shared
  attention, self- and cross-attention q, k, v, out (`train.lora`), trained at `train.lr`.

Each refined model is evaluated on the demo's test videos (`--num_test`, default 300, the demo's
seed) with the ShapesWorld oracle: V2T all-correct with 1 caption and with 8 verified candidates,
T2V and joint all-correct (Wilson 95% intervals). Per variant also: trainable parameters,
optimizer-state bytes (read from the final checkpoint's AdamW state), the adapter file size and
the median training step time (the trainer's own steps/s log; `--time_steps N` times the
variants' steps in turn instead, under one machine load, into lora_step_time.json). Beside them, the analytic sizes at
Wan2.1 1.3B and 14B (counted on meta-device models): trainable parameters, AdamW state and adapter
bytes of the shared attention trained fully against LoRA of rank 8 / 32.

A finished stage is read back instead of retrained. Writes benchmarks/results/lora.json (with its
provenance). One torch thread keeps it beside other work:

    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py                 # tens of minutes on a CPU
    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py --cr_steps 600  # a reduced, equal budget
    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py --time_steps 20  # step times, minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import RESULTS_DIR, load_average, machine_info, write_json
from univigu.commands.demo import CR_STEPS, KR_STEPS, shipped_generator_dir, unified_stage
from univigu.models.bundle import load_bundle
from univigu.training.logging import read_metrics

SHARED_ATTENTION = ",".join(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
VARIANTS = {"frozen": [], "lora8": [8], "lora32": [32]}
KEPT = ("t2v.all_correct", "t2v.all_correct_ci95", "v2t.all_correct", "v2t.all_correct_ci95", "v2t.shape",
        "v2t.colour", "v2t.size", "v2t.motion", "joint.all_correct", "joint.all_correct_ci95")
# Wan2.1's two text-to-video sizes (diffusers' config.json values).
WAN = {"1.3B": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096,
                    in_channels=16, out_channels=16),
       "14B": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096,
                   in_channels=16, out_channels=16)}


def lora_overrides(rank: int) -> list[str]:
    return ["train.lora.rank=" + str(rank), "train.lora.alpha=" + str(rank),
            f"train.lora.targets=['shared:{SHARED_ATTENTION}']"]


def stage(name: str, root: Path, init_from: Path, steps: int, args, world, extra: list[str]) -> Path:
    model = root / name / "model"
    if (model / "model_index.json").is_file():
        return model
    return unified_stage(name, root, init_from, steps, not args.no_progress, args.device, world,
                         [f"train.seed={args.seed}", *extra])


def optimizer_state_bytes(run_dir: Path) -> int:
    """Bytes of the AdamW state tensors in the run's final checkpoint."""
    from univigu.training.checkpoint import latest_checkpoint

    state = torch.load(latest_checkpoint(run_dir / "checkpoints") / "optimizer.pt", weights_only=True)["state"]
    return sum(v.numel() * v.element_size() for entry in state.values() for v in entry.values()
               if isinstance(v, torch.Tensor) and v.ndim > 0)


def trainable_parameters(run_dir: Path) -> int:
    from univigu.training.checkpoint import latest_checkpoint

    state = torch.load(latest_checkpoint(run_dir / "checkpoints") / "optimizer.pt", weights_only=True)["state"]
    return sum(entry["exp_avg"].numel() for entry in state.values())


def step_seconds(run_dir: Path) -> float:
    rates = [r["steps_per_s"] for r in read_metrics(run_dir / "metrics.jsonl") if "steps_per_s" in r]
    return 1.0 / statistics.median(rates[1:] or rates)  # the first window holds start-up work


def evaluate_model(model_dir: Path, args, world) -> dict:
    from univigu.data.shapesworld import synthesize
    from univigu.evaluation.harness import PipelineEvaluatee, evaluate, load_samples
    from univigu.pipeline import UniViGUPipeline

    data_dir = Path(args.out) / "test_data"
    if not (data_dir / "test.jsonl").is_file():
        synthesize(data_dir, args.num_test, 10_000 + args.seed, world, splits={"test": 1.0}, progress=False)
    samples = load_samples([data_dir / "test.jsonl"], ("t2v", "v2t", "joint"))
    pipe = UniViGUPipeline.from_pretrained(model_dir, device=args.device)
    out = {}
    for candidates, tasks in ((8, ("t2v", "v2t", "joint")), (1, ("v2t",))):
        began = time.perf_counter()
        metrics = evaluate(PipelineEvaluatee(pipe, world, candidates=candidates), samples, world, tasks=tasks,
                           seed=args.seed, batch_size=50, progress=not args.no_progress)["test"]
        for key in KEPT:
            if key in metrics and key.split(".")[0] in tasks:
                name = key.replace("v2t.", f"v2t_{candidates}.") if key.startswith("v2t.") else key
                out[name] = metrics[key]
        out[f"eval_seconds_{candidates}"] = round(time.perf_counter() - began, 1)
    return out


def interleaved_step_times(root: Path, kr: Path, world, steps: int, variants: list[str]) -> dict:
    """Median seconds of a refinement step per variant, the variants' steps taken in turn (the same
    machine load for all), after 3 warm-up steps each; trainers write into ROOT/step_time/."""
    from univigu.config import load_config, to_dict
    from univigu.training.trainer import Trainer

    trainers = {}
    for name in variants:
        overrides = ["train.stage=capability_refinement", f"train.init_from={kr}", "train.seed=0",
                     f"train.output_dir={root / 'step_time' / name}", "train.steps=1000"]
        overrides += [f"world.{k}={v}" for k, v in to_dict(world).items()]
        overrides += [] if not VARIANTS[name] else lora_overrides(VARIANTS[name][0])
        trainers[name] = Trainer(load_config("shapesworld-unified", overrides), progress=False)
    for trainer in trainers.values():
        for _ in range(3):
            trainer.train_step()
    times = {name: [] for name in trainers}
    for _ in range(steps):
        for name, trainer in trainers.items():
            began = time.perf_counter()
            trainer.train_step()
            times[name].append(time.perf_counter() - began)
    return {name: {"median_step_seconds": round(statistics.median(v), 4), "steps": len(v)} for name, v in times.items()}


def analytic_sizes() -> dict:
    """Trainable parameters and bytes of the shared attention (self and cross: q, k, v, out) at
    Wan2.1 scale, trained fully or through LoRA; AdamW keeps two fp32 tensors per parameter."""
    from univigu.config import TransformerConfig
    from univigu.models import lora
    from univigu.models.transformer import UniViGUTransformer

    rows = {}
    for size, fields in WAN.items():
        with torch.device("meta"):
            model = UniViGUTransformer(TransformerConfig(**fields))
        targets = set(lora.target_modules(model, [f"shared:{SHARED_ATTENTION}"]))
        full = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in targets)
        row = {"model_parameters": sum(p.numel() for p in model.parameters()),
               "shared_attention_full": {"parameters": full, "adamw_state_bytes": 8 * full}}
        for rank in (8, 32):
            n = sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules() if name in targets)
            row[f"lora{rank}"] = {"parameters": n, "adamw_state_bytes": 8 * n, "adapter_bytes_fp32": 4 * n,
                                  "adapter_bytes_bf16": 2 * n}
        rows[size] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--kr_steps", type=int, default=KR_STEPS)
    parser.add_argument("--cr_steps", type=int, default=CR_STEPS, help=f"refinement steps, every variant (demo: {CR_STEPS})")
    parser.add_argument("--num_test", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_lora")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--result", default=str(RESULTS_DIR / "lora.json"))
    parser.add_argument("--time_steps", type=int, default=0,
                        help="only time N refinement steps of every variant, in turn, from the Knowledge "
                             "Recall model; writes --step_time_result")
    parser.add_argument("--step_time_result", default=str(RESULTS_DIR / "lora_step_time.json"))
    args = parser.parse_args()

    root = Path(args.out)
    load_before = load_average()
    generator = shipped_generator_dir()
    world = load_bundle(generator).world
    kr = stage("knowledge_recall", root, generator, args.kr_steps, args, world, [])
    if args.time_steps:
        times = interleaved_step_times(root, kr, world, args.time_steps, args.variants)
        write_json(args.step_time_result, {"machine": machine_info(), "load_average": {
            "before": load_before, "after": load_average()}, "torch_threads": torch.get_num_threads(),
            "variants": times})
        print(json.dumps(times))
        return
    settings = {k: getattr(args, k) for k in ("kr_steps", "cr_steps", "num_test", "seed")}
    settings.update(demo_cr_steps=CR_STEPS, lora_targets=f"shared:{SHARED_ATTENTION}", lora_alpha="rank")
    results = {}
    for name in args.variants:
        extra = [] if not VARIANTS[name] else lora_overrides(VARIANTS[name][0])
        variant_root = root / name
        model_dir = stage("capability_refinement", variant_root, kr, args.cr_steps, args, world, extra)
        run_dir = variant_root / "capability_refinement"
        row = {"trainable_parameters": trainable_parameters(run_dir),
               "optimizer_state_bytes": optimizer_state_bytes(run_dir),
               "step_seconds": round(step_seconds(run_dir), 4)}
        adapter = run_dir / "adapter" / "adapter_model.safetensors"
        if adapter.is_file():
            row["adapter_file_bytes"] = adapter.stat().st_size
        row.update(evaluate_model(model_dir, args, world))
        results[name] = row
        print(name, json.dumps(row), flush=True)
        payload = {"machine": machine_info(), "load_average": {"before": load_before, "after": load_average()},
                   "settings": {**settings, "finished": len(results) == len(args.variants)},
                   "variants": results, "wan_scale": analytic_sizes()}
        write_json(args.result, payload)
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
