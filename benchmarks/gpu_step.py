"""One training step of the 1.3B-shaped unified model in bf16 on a GPU at 9 frames, its time and its MFU
(`gpu_check.py`'s `train` section does the same at 81 frames, with the optimizer).

The model is Wan2.1-T2V-1.3B's backbone (30 layers, 12 heads x 128, FFN 8960, UMT5 width 4096)
with the text stream (text FFN experts, vocabulary 32000, canvas 256 tokens). The step is a joint
one -- video and text both noisy -- under bf16 autocast (fp32 weights, as in training): forward,
velocity MSE + token cross-entropy, backward. MFU is the analytic model FLOPs of the step
(`common.training_step_flops`) per second over the GPU's dense bf16 peak (from its name, see
PEAK_BF16; `--peak-tflops` overrides it) and, beside it, over an 8192^3 bf16 matmul measured in
the same run.

    benchmarks/gpu_step.sh                 # on a GPU machine (< 5 minutes)
    benchmarks/gpu_step.sh --dry-run       # tiny sizes, runs on a CPU: checks the script works
    benchmarks/gpu_step.sh --compile blocks   # every block compiled in place (what train.compile does)
    benchmarks/gpu_step.sh --compile model    # the whole model under one torch.compile
    benchmarks/gpu_step.sh --profile       # also the kernels that take the step's time
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # a GPU machine without the package installed
from common import load_average, machine_info, median, training_step_flops, write_json  # noqa: E402

from univigu.config import TransformerConfig  # noqa: E402
from univigu.models.transformer import UniViGUTransformer  # noqa: E402

# Wan2.1-T2V-1.3B + the text stream.
MODEL_1P3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, vocab_size=32000, text_length=256,
                  attention_policy="clean_isolated")
LATENT_1P3B = (16, 3, 60, 104)  # 9 frames at 480x832 -> 3 x 30 x 52 = 4680 video tokens
CONDITION_LENGTH_1P3B = 512  # UMT5 prompt length in Wan
# --dry-run: the same code path at toy sizes.
MODEL_DRY = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, in_channels=16,
                 out_channels=16, text_dim=32, freq_dim=32, vocab_size=100, text_length=8,
                 attention_policy="clean_isolated")
LATENT_DRY = (16, 2, 4, 4)
CONDITION_LENGTH_DRY = 8

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s; first match wins.
PEAK_BF16 = [("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
             ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12)]


def peak_bf16(name: str) -> float | None:
    for key, peak in PEAK_BF16:
        if key.lower() in name.lower():
            return peak
    return None


def make_batch(config: TransformerConfig, latent, batch: int, condition_length: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, *latent, generator=gen)
    video_target = torch.randn(batch, *latent, generator=gen)
    text = torch.randint(0, config.vocab_size + 1, (batch, config.text_length), generator=gen)  # + mask id
    text_target = torch.randint(0, config.vocab_size, (batch, config.text_length), generator=gen)
    t_video = torch.rand(batch, generator=gen) * 998 + 1  # both noisy: a joint step
    t_text = torch.rand(batch, generator=gen) * 998 + 1
    condition = torch.randn(batch, condition_length, config.text_dim, generator=gen)
    return [x.to(device) for x in (video, video_target, text, text_target, t_video, t_text, condition)]


def train_step(model, batch, dtype):
    video, video_target, text, text_target, t_video, t_text, condition = batch
    with torch.autocast(video.device.type, dtype=dtype):
        velocity, logits = model(video, text, t_video, t_text, condition)
    loss = F.mse_loss(velocity, video_target) + F.cross_entropy(logits.flatten(0, 1), text_target.flatten())
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss.detach()


def profile_step(step, device, top: int = 25) -> list[dict]:
    """The operators that take one step's device time (self time, most first)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events)
    rows = [dict(op=e.key, calls=e.count, self_ms=getattr(e, attr) / 1e3, share=getattr(e, attr) / total)
            for e in events[:top]]
    for row in rows:
        print(f"  {row['self_ms']:9.2f} ms {100 * row['share']:5.1f}%  x{row['calls']:<5d} {row['op'][:90]}")
    return rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops_per_s(n: int, dtype, device, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes; runs on a CPU")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, nargs=4, default=None, metavar=("C", "F", "H", "W"))
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (overrides the table)")
    parser.add_argument("--compile", choices=("blocks", "model"), default=None,
                        help="torch.compile every block in place (as train.compile does) or the whole model")
    parser.add_argument("--profile", action="store_true", help="profile one step: where the time goes")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop timing steps after this many seconds")
    parser.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    began = time.perf_counter()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry_run:
        parser.error("no CUDA device: this check needs a GPU (use --dry-run to test the script on a CPU)")
    fields = MODEL_DRY if args.dry_run else MODEL_1P3B
    latent = tuple(args.latent) if args.latent else (LATENT_DRY if args.dry_run else LATENT_1P3B)
    condition_length = CONDITION_LENGTH_DRY if args.dry_run else CONDITION_LENGTH_1P3B
    config = TransformerConfig(**fields)
    dtype = torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    with torch.device(device):  # initialise on the GPU directly (seconds, not minutes)
        torch.manual_seed(0)
        model = UniViGUTransformer(config)
    model.train()
    step_model = torch.compile(model) if args.compile == "model" else model
    if args.compile == "blocks":
        model.compile_blocks()
    n_params = sum(p.numel() for p in model.parameters())
    batch = make_batch(config, latent, args.batch, condition_length, device)
    n_video = (latent[1] // config.patch_size[0]) * (latent[2] // config.patch_size[1]) * (latent[3] // config.patch_size[2])
    n_text = config.text_length
    flops = training_step_flops(config, args.batch, n_video, n_text, condition_length)

    checkpointing = False
    try:
        for _ in range(args.warmup):
            train_step(step_model, batch, dtype)
        sync(device)
    except torch.OutOfMemoryError:  # fall back to recomputing activations (model FLOPs unchanged)
        torch.cuda.empty_cache()
        checkpointing = True
        model.enable_gradient_checkpointing()
        for _ in range(args.warmup):
            train_step(step_model, batch, dtype)
        sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        loss = train_step(step_model, batch, dtype)
        sync(device)
        times.append(time.perf_counter() - start)
        if time.perf_counter() - began > args.budget_s:
            break
    step_s = median(times)
    profile = profile_step(lambda: train_step(step_model, batch, dtype), device) if args.profile else None
    achieved = flops / step_s

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine_info()["cpu"]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_bf16(name) if device.type == "cuda" else None)
    matmul_n = 8192 if device.type == "cuda" and not args.dry_run else 256
    matmul = matmul_flops_per_s(matmul_n, dtype, device, repeats=10 if device.type == "cuda" else 2)
    result = {
        "benchmark": "gpu_step",
        "dry_run": args.dry_run,
        "device": name,
        "machine": machine_info(),
        "model": {**fields, "parameters": n_params, "latent": list(latent), "batch": args.batch,
                  "video_tokens": n_video, "text_tokens": n_text, "condition_length": condition_length},
        "precision": "bf16 autocast, fp32 weights",
        "gradient_checkpointing": checkpointing,
        "compiled": args.compile,
        "training_step_flops": flops,
        "step_s": step_s,
        "all_step_s": times,
        "loss": float(loss),
        "achieved_tflop_per_s": achieved / 1e12,
        "peak_bf16_tflop_per_s": peak / 1e12 if peak else None,
        "peak_source": ("--peak-tflops" if args.peak_tflops else "NVIDIA data sheet, dense bf16") if peak else None,
        "mfu": achieved / peak if peak else None,
        "matmul_bf16_tflop_per_s": matmul / 1e12,
        "matmul_n": matmul_n,
        "fraction_of_measured_matmul": achieved / matmul,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "wall_s": time.perf_counter() - began,
        "load_average": load_average(),
        "profile": profile,
    }
    mfu = f"{100 * result['mfu']:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else "n/a (no known peak)"
    print(f"{name}: step {step_s * 1e3:.1f} ms ({len(times)} timed), {achieved / 1e12:.3g} TFLOP/s, MFU {mfu}, "
          f"{100 * result['fraction_of_measured_matmul']:.1f}% of a measured {matmul_n}^3 bf16 matmul "
          f"({matmul / 1e12:.3g} TFLOP/s)" + (" [dry run: toy sizes]" if args.dry_run else ""))
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
