"""Hardware efficiency of a training step: achieved FLOP/s over the GEMM FLOP/s of this machine.

A training step is forward + MSE loss + backward + (fused) AdamW step of the video backbone at the
"small" config (hidden 256 = 4 heads x 64, 6 layers, FFN 1024, latent 16 x 5 x 16 x 16 with patch
1x2x2 = 320 video tokens, batch 8, 32 prompt tokens). Its FLOPs are the analytic model FLOPs
(`common.training_step_flops`: 3x the forward less unneeded input gradients; checked against
torch's FlopCounterMode in tests/test_bench_flops.py), the same count for both models. The peak is
a large square matmul timed in the same run, right beside each pair of steps, so machine load hits
both alike::

    efficiency = (step FLOPs / step seconds) / (2 n^3 / matmul seconds)

Ours (`UniViGUTransformer`, vocab_size=0) and diffusers' `WanTransformer3DModel` hold identical
weights and alternate (ours first on even repetitions). The target: ours >= 0.35 (stretch
0.40), where diffusers reached about 0.28 on an AVX-512 machine. `--precision fp32` (default) runs
the step and the peak matmul in fp32; `--precision bf16` runs the step under bf16 autocast (fp32
weights, as a training run does) against a bf16 matmul: the target's own measure, meaningful only
where bf16 is native. One bf16 matmul is timed against fp32 to record whether it is (on an
AVX2-only CPU bf16 is emulated and far slower, so a bf16 efficiency would say nothing).
`--compile` compiles every transformer block of both models in place (`train.compile` in our
trainer; torchtitan's per-block compile), after which the first steps are warm-up.

    python benchmarks/bench_mfu.py                  # fp32, median of 7 after 2 warm-ups
    python benchmarks/bench_mfu.py --precision bf16             # writes results/mfu_bf16.json
    python benchmarks/bench_mfu.py --precision bf16 --compile   # writes results/mfu_bf16_compiled.json
    python benchmarks/bench_mfu.py --profile        # also where ours spends a step (top ops)
Writes benchmarks/results/mfu.json (fp32), mfu_bf16.json (bf16), with `_compiled` added under
`--compile`; `--out` overrides. The JSON starts with a "provenance" block (machine, date, commit,
command).
"""

from __future__ import annotations

import argparse

import torch

from common import (
    RESULTS_DIR,
    compile_blocks,
    forward_flops,
    gemm_flops_per_s,
    load_average,
    machine_info,
    median,
    timed_both,
    training_step_flops,
    write_json,
)
from univigu.config import TransformerConfig
from univigu.models.convert import config_to_diffusers
from univigu.models.transformer import UniViGUTransformer

SMALL = dict(num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=6, in_channels=16,
             out_channels=16, text_dim=384, freq_dim=256)
LATENT = (16, 5, 16, 16)
BATCH = 8
CONDITION_LENGTH = 32

# Profiler op names -> what kind of work they are (for the summary of a step).
_GEMM = ("aten::addmm", "aten::mm", "aten::bmm", "aten::convolution_backward", "aten::mkldnn_convolution",
         "aten::_convolution", "aten::convolution")
_ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
              "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention")


def build_pair(seed: int = 0):
    """(ours, diffusers) with identical random weights."""
    from diffusers import WanTransformer3DModel

    config = TransformerConfig(**SMALL)
    fields = {k: v for k, v in config_to_diffusers(config).items() if not k.startswith("_")}
    torch.manual_seed(seed)
    reference = WanTransformer3DModel(**fields)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    ours = UniViGUTransformer(config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def make_batch(config: TransformerConfig, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(BATCH, *LATENT, generator=gen)
    target = torch.randn(BATCH, *LATENT, generator=gen)
    timestep = torch.linspace(10.0, 990.0, BATCH)
    condition = torch.randn(BATCH, CONDITION_LENGTH, config.text_dim, generator=gen)
    return video, target, timestep, condition


def train_step_fn(model, is_ours: bool, batch, bf16: bool = False):
    """One training step (forward, MSE, backward, AdamW) as a closure; bf16 autocasts the forward."""
    video, target, timestep, condition = batch
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # as the trainer's, for both

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if is_ours:
                out = model(video, None, timestep, None, condition)[0]
            else:
                out = model(hidden_states=video, timestep=timestep, encoder_hidden_states=condition,
                            return_dict=False)[0]
        # loss in fp32, backward outside autocast (as the trainer does)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def bf16_check(n: int = 512) -> dict:
    """One bf16 matmul against fp32: is bf16 native here, or emulated (then not worth measuring)?"""
    fp32 = gemm_flops_per_s(n, torch.float32, repeats=3)
    bf16 = gemm_flops_per_s(n, torch.bfloat16, repeats=3)
    return {"n": n, "fp32_gflop_per_s": fp32 / 1e9, "bf16_gflop_per_s": bf16 / 1e9,
            "bf16_over_fp32": bf16 / fp32}


def profile_step(step, repeats: int = 2) -> dict:
    """Self CPU time of one step by op, and by kind of work (GEMM, attention, everything else)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    kinds = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        kind = "gemm" if e.key in _GEMM else "attention" if e.key in _ATTENTION else "other"
        kinds[kind] += e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "share_by_kind": {k: v / total for k, v in kinds.items()},
        "top_ops": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_step": e.count / repeats}
                    for e in top],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions (median of these)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gemm-n", type=int, default=2048, help="size of the square matmul giving the peak")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-bf16-check", action="store_true", help="skip timing one bf16 matmul against fp32")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the step (bf16: autocast) and the peak matmul's dtype (default fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block of both models")
    parser.add_argument("--profile", action="store_true", help="profile one step of each model")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/mfu[_bf16][_compiled].json")
    args = parser.parse_args(argv)
    if args.out is None:
        name = "mfu" + ("_bf16" if args.precision == "bf16" else "") + ("_compiled" if args.compile else "")
        args.out = str(RESULTS_DIR / f"{name}.json")
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (the median of fewer says little)")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()

    ours, reference = build_pair()
    if args.compile:
        compile_blocks(ours, reference)
    config = ours.config
    batch = make_batch(config)
    n_video = LATENT[1] * (LATENT[2] // 2) * (LATENT[3] // 2)
    flops = training_step_flops(config, BATCH, n_video, 0, CONDITION_LENGTH)
    bf16 = args.precision == "bf16"
    steps = {"ours": train_step_fn(ours, True, batch, bf16), "diffusers": train_step_fn(reference, False, batch, bf16)}
    gemm_n = args.gemm_n
    gen = torch.Generator().manual_seed(3)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = (torch.randn(gemm_n, gemm_n, generator=gen).to(dtype) for _ in range(2))
    gemm = lambda: torch.mm(a, b)  # noqa: E731

    # Both clocks: wall time, and this process's CPU time (with one thread, immune to preemption
    # by the other processes of a shared machine).
    times = {clock: {"ours": [], "diffusers": [], "gemm": []} for clock in ("wall", "cpu")}
    for _ in range(args.warmup):
        gemm()
        for fn in steps.values():
            fn()
    for rep in range(args.repeats):
        for who in ["gemm"] + (["ours", "diffusers"] if rep % 2 == 0 else ["diffusers", "ours"]) + ["gemm"]:
            wall, cpu = timed_both(steps[who] if who != "gemm" else gemm)
            times["wall"][who].append(wall)
            times["cpu"][who].append(cpu)
        print(f"rep {rep}: " + "  ".join(f"{who} {times['wall'][who][-1]:.3f} s wall / {times['cpu'][who][-1]:.3f} s cpu"
                                         for who in ("gemm", "ours", "diffusers")), flush=True)

    results = {}
    for clock, t in times.items():
        # The peak of each repetition: the matmuls just before and just after its two steps.
        gemm_rate = [2 * gemm_n**3 / median(t["gemm"][2 * i:2 * i + 2]) for i in range(args.repeats)]
        results[clock] = {"gemm_gflop_per_s": median(gemm_rate) / 1e9, "gemm_all_s": t["gemm"]}
        for who in ("ours", "diffusers"):
            per_rep = [flops / s / g for s, g in zip(t[who], gemm_rate)]
            results[clock][who] = {
                "step_s": median(t[who]),
                "achieved_gflop_per_s": flops / median(t[who]) / 1e9,
                "efficiency": flops / median(t[who]) / median(gemm_rate),  # ratio of medians
                "efficiency_median_per_rep": median(per_rep),  # each step against the matmuls beside it
                "all_s": t[who],
            }
        results[clock]["ours_over_diffusers_efficiency"] = (results[clock]["ours"]["efficiency"]
                                                            / results[clock]["diffusers"]["efficiency"])
    payload = {
        "benchmark": "mfu",
        "description": f"training step (forward + MSE + backward + AdamW) FLOP/s over {args.precision} "
                       "square-matmul FLOP/s measured in the same run; ours vs diffusers WanTransformer3DModel",
        "precision": args.precision,
        "compiled_blocks": args.compile,
        "target": "ours >= 0.35 (stretch 0.40); diffusers ~0.28 on the AVX-512 machine that set it",
        "config": {**SMALL, "latent": list(LATENT), "batch": BATCH, "condition_length": CONDITION_LENGTH,
                   "video_tokens": n_video},
        "training_step_flops": flops,
        "forward_flops": forward_flops(config, BATCH, n_video, 0, CONDITION_LENGTH),
        "gemm": {"n": gemm_n, "dtype": str(dtype).removeprefix("torch.")},
        "clocks": {"cpu": ("process CPU time (primary with one thread: immune to preemption)"
                           if torch.get_num_threads() == 1 else
                           f"process CPU time summed over {torch.get_num_threads()} threads"),
                   "wall": "wall clock (inflated by other processes on a loaded machine)"},
        "results": results,
        "repeats": args.repeats, "warmup": args.warmup,
        "machine": machine_info(),
        "load_average_before": load_before,
    }
    if not args.no_bf16_check:
        check = bf16_check()
        check["verdict"] = ("native: worth a bf16 run" if check["bf16_over_fp32"] > 1 else
                            "bf16 matmul slower than fp32 here (no native bf16 units): bf16 efficiency is "
                            "not meaningful on this CPU")
        payload["bf16_check"] = check
    if args.profile:
        payload["profile"] = {who: profile_step(fn) for who, fn in steps.items()}
    payload["load_average_after"] = load_average()
    payload["note"] = ("measured on a shared machine (see the load averages); the efficiencies, step and "
                       "matmul timed side by side, are the valid figures, absolute times are not")
    for clock in ("cpu", "wall"):
        for who in ("ours", "diffusers"):
            r = results[clock][who]
            print(f"[{clock}] {who:9s} step {r['step_s']:.3f} s  {r['achieved_gflop_per_s']:.1f} GFLOP/s  "
                  f"efficiency {r['efficiency']:.3f} (per-rep median {r['efficiency_median_per_rep']:.3f})")
        print(f"[{clock}] matmul {results[clock]['gemm_gflop_per_s']:.1f} GFLOP/s ({args.precision}, n={gemm_n})")
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
