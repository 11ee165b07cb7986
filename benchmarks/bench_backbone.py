"""Speed of our video backbone against diffusers' WanTransformer3DModel at identical configs.

Both models hold the same weights (ours is loaded from the diffusers state dict, whose names it
shares) and see the same inputs. For every case, precision (fp32, bf16 autocast) and mode
(forward, forward+backward) the two run alternately in one process -- who goes first rotates from
repetition to repetition, so drift in machine load hits both -- and we report the
median of the timed repetitions after warm-up, and the ratio ours / diffusers (< 1: ours is
faster), both as the ratio of the two medians and as the median of the per-repetition ratios (each
repetition runs the pair back to back, so that one is robust to drift over the run). `--baseline`
adds a third model to the rotation: another checkout's, to measure what a change did.
On a CPU the default clock is this process's CPU time on one thread: on a shared machine, wall
time mostly measures the other processes. Note that CPUs without native bf16 (AVX2 only) emulate
bf16 matmuls, so bf16 autocast there is several times slower than fp32 for both models.

    python benchmarks/bench_backbone.py            # full run
    python benchmarks/bench_backbone.py --quick    # fewer repetitions
    python benchmarks/bench_backbone.py --compile  # every block of both models under torch.compile
    git worktree add /tmp/base <commit>            # then time that checkout's model in the same run:
    python benchmarks/bench_backbone.py --baseline /tmp/base/src
Writes benchmarks/results/backbone_speed.json on a CPU (backbone_speed_compiled.json with
`--compile`, backbone_speed_baseline.json with `--baseline`), benchmarks/results/gpu/backbone_speed.json
on a GPU; `--out` overrides. The JSON starts with a "provenance" block (machine, date, commit, command).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # a GPU machine without the package installed
from common import RESULTS_DIR, compile_blocks, forward_flops, training_step_flops, write_json  # noqa: E402

from univigu.config import TransformerConfig  # noqa: E402
from univigu.models.convert import config_to_diffusers  # noqa: E402
from univigu.models.transformer import UniViGUTransformer  # noqa: E402

# name -> (diffusers/our config fields, latent (C, F, H, W), batch, condition length)
CASES = {
    "tiny": (dict(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=64,
                  freq_dim=64, ffn_dim=128, num_layers=2), (16, 3, 8, 8), 4, 16),
    "small": (dict(num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16, text_dim=384,
                   freq_dim=256, ffn_dim=1024, num_layers=6), (16, 5, 16, 16), 8, 32),
    # One block of Wan2.1-T2V-1.3B (12 heads x 128, FFN 8960, UMT5 width 4096), few tokens.
    "wan1.3b_block": (dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                           text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=1), (16, 1, 16, 16), 2, 64),
    # The whole Wan2.1-T2V-1.3B backbone at a real size: 9 frames of 480x832 (4680 video tokens) and
    # a 512-token UMT5 prompt. A GPU case: not in the CPU default.
    "wan1.3b": (dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                     text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30), (16, 3, 60, 104), 1, 512),
}
GPU_ONLY_CASES = ("wan1.3b",)


def build_pair(fields: dict, device: torch.device, seed: int = 0):
    """(ours, diffusers) with identical weights."""
    from diffusers import WanTransformer3DModel

    config = TransformerConfig(**fields)
    diffusers_fields = {k: v for k, v in config_to_diffusers(config).items() if not k.startswith("_")}
    torch.manual_seed(seed)
    with device:  # built where they run: a 1.3B model's initialisation takes minutes on a CPU
        reference = WanTransformer3DModel(**diffusers_fields)
        ours = UniViGUTransformer(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random everywhere (the zero-init head would make the output trivial)
        for param in reference.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def load_baseline(src: str):
    """The `UniViGUTransformer` and `TransformerConfig` classes of another checkout's package (its
    `src/` directory), imported as `univigu_baseline` so that both versions run in one process."""
    package = Path(src) / "univigu"
    if not (package / "models" / "transformer.py").is_file():
        raise SystemExit(f"--baseline {src}: no univigu/models/transformer.py there (give a checkout's src/)")
    spec = importlib.util.spec_from_file_location("univigu_baseline", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["univigu_baseline"] = module
    spec.loader.exec_module(module)
    config = importlib.import_module("univigu_baseline.config")
    return importlib.import_module("univigu_baseline.models.transformer").UniViGUTransformer, config.TransformerConfig


def make_inputs(config: TransformerConfig, latent, batch, condition_length, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, *latent, generator=gen).to(device)
    timestep = torch.linspace(10.0, 990.0, batch).to(device)
    condition = torch.randn(batch, condition_length, config.text_dim, generator=gen).to(device)
    return video, timestep, condition


def runner(model, is_ours: bool, inputs, backward: bool):
    video, timestep, condition = inputs

    def run():
        if is_ours:
            out = model(video, None, timestep, None, condition)[0]
        else:
            out = model(hidden_states=video, timestep=timestep, encoder_hidden_states=condition,
                        return_dict=False)[0]
        if backward:
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        return out

    return run


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_case(name, device, precisions, modes, warmup, repeats, clock, compiled=False, baseline=None):
    fields, latent, batch, condition_length = CASES[name]
    ours, reference = build_pair(fields, device)
    models = {"ours": (ours, True), "diffusers": (reference, False)}
    if baseline is not None:  # another checkout's model, same weights
        model_class, config_class = baseline
        with device:
            models["baseline"] = (model_class(config_class(**fields)), True)
        models["baseline"][0].load_state_dict(ours.state_dict())
    if compiled:  # the warm-up calls pay the compiles
        torch._dynamo.reset()  # each case its own compile budget (8 recompiles per function by default)
        compile_blocks(*(m for m, _ in models.values()))
    inputs = make_inputs(ours.config, latent, batch, condition_length, device)
    tokens = latent[1] * latent[2] * latent[3] // 4
    rows = []
    for precision in precisions:
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else nullcontext())
        # Sanity: both compute the same function (loose in bf16, where rounding differs).
        with torch.no_grad(), autocast:
            a = runner(ours, True, inputs, False)().float()
            b = runner(reference, False, inputs, False)().float()
        rel_diff = float((a - b).norm() / b.norm())
        for mode in modes:
            backward = mode == "forward_backward"
            for m, _ in models.values():
                m.train(backward)
            grad = nullcontext() if backward else torch.no_grad()
            fns = {who: runner(m, is_ours, inputs, backward) for who, (m, is_ours) in models.items()}
            times = {who: [] for who in fns}
            other = {who: [] for who in fns}  # the clock not used for the ratio
            with grad, autocast:
                for _ in range(warmup):
                    for fn in fns.values():
                        fn()
                for rep in range(repeats):
                    names = list(fns)
                    order = names[rep % len(names):] + names[:rep % len(names)]  # who goes first rotates
                    for who in order:
                        wall, cpu = timed(fns[who], device)
                        times[who].append(cpu if clock == "cpu" else wall)
                        other[who].append(wall if clock == "cpu" else cpu)
            ours_s, diff_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
            flops = (training_step_flops if backward else forward_flops)(ours.config, batch, tokens, 0,
                                                                          condition_length)
            row = dict(case=name, precision=precision, mode=mode, batch=batch, video_tokens=tokens,
                       ours_s=ours_s, diffusers_s=diff_s, ratio=ours_s / diff_s,
                       # each repetition's pair ran back to back: robust to drift over the run
                       ratio_median_per_rep=statistics.median(
                           o / d for o, d in zip(times["ours"], times["diffusers"])),
                       output_rel_diff=rel_diff,
                       model_flops=flops, ours_tflop_per_s=flops / ours_s / 1e12,
                       diffusers_tflop_per_s=flops / diff_s / 1e12,
                       clock=clock, ours_all_s=times["ours"], diffusers_all_s=times["diffusers"],
                       other_clock_ours_s=statistics.median(other["ours"]),
                       other_clock_diffusers_s=statistics.median(other["diffusers"]))
            rows.append(row)
            print(f"{name:14s} {precision:5s} {mode:17s} ours {ours_s * 1e3:9.1f} ms  diffusers "
                  f"{diff_s * 1e3:9.1f} ms  ratio {row['ratio']:.3f} (per repetition {row['ratio_median_per_rep']:.3f})  "
                  f"(rel diff {rel_diff:.1e})", flush=True)
            if baseline is not None:
                row.update(baseline_s=statistics.median(times["baseline"]), baseline_all_s=times["baseline"],
                           baseline_ratio_median_per_rep=statistics.median(
                               b / d for b, d in zip(times["baseline"], times["diffusers"])),
                           ours_over_baseline_median_per_rep=statistics.median(
                               o / b for o, b in zip(times["ours"], times["baseline"])))
                print(f"{'':14s} {'':5s} {'':17s} baseline {row['baseline_s'] * 1e3:9.1f} ms  per repetition: "
                      f"baseline / diffusers {row['baseline_ratio_median_per_rep']:.3f}, ours / baseline "
                      f"{row['ours_over_baseline_median_per_rep']:.3f}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (5 timed, 1 warm-up)")
    parser.add_argument("--cases", nargs="+", default=None, choices=list(CASES),
                        help=f"default: all on a GPU, all but {', '.join(GPU_ONLY_CASES)} on a CPU")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", default=["forward", "forward_backward"],
                        choices=["forward", "forward_backward"])
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (median of these)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile every block of both models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on CPU, so the CPU clock measures one core's work)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default=None,
                        help="time to compare: wall clock, or this process's CPU time (default: cpu on a CPU "
                             "device, which other processes on a shared machine do not inflate; wall on GPU)")
    parser.add_argument("--baseline", default=None, metavar="SRC",
                        help="another checkout's src/ directory: its model is timed in the same run, "
                             "interleaved with ours and diffusers' (did a change make ours faster?)")
    parser.add_argument("--out", default=None,
                        help="default: benchmarks/results/backbone_speed[_compiled][_baseline].json, "
                             "under results/gpu/ on a GPU")
    args = parser.parse_args(argv)
    if args.out is None:
        name = "backbone_speed" + ("_compiled" if args.compile else "") + ("_baseline" if args.baseline else "")
        args.out = str(RESULTS_DIR / ("gpu" if args.device.startswith("cuda") else "") / f"{name}.json")
    repeats = args.repeats or (5 if args.quick else 11)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if repeats < 5:
        parser.error("--repeats must be >= 5 (the median of fewer says little)")
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    cases = args.cases or [name for name in CASES if device.type == "cuda" or name not in GPU_ONLY_CASES]

    import diffusers

    baseline = load_baseline(args.baseline) if args.baseline else None
    rows = []
    for name in cases:
        rows += bench_case(name, device, args.precisions, args.modes, warmup, repeats, clock, args.compile, baseline)
    result = {
        "benchmark": "video backbone: univigu UniViGUTransformer (vocab_size=0) vs diffusers WanTransformer3DModel",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "clock": clock,
        "repeats": repeats, "warmup": warmup, "compiled_blocks": args.compile, "baseline": args.baseline,
        "cases": {name: dict(config=CASES[name][0], latent=CASES[name][1], batch=CASES[name][2],
                             condition_length=CASES[name][3]) for name in cases},
        "results": rows,
    }
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
