"""Peak memory and time of a training step's joint attention policy: mask-free against the dense masks.

A narrow unified model (2 blocks, 4 heads of 32, a 256-token text canvas, `clean_isolated`, with and
without the learned text-key bias at -8) runs one training forward+backward of one T2V sample (clean
text, noisy video): the text's queries are isolated from the video's keys and the video's queries
carry the bias on the text's keys, so both terms of the offset (and of the dense mask) are in play.
(A V2T sample isolates the video's queries by the same mechanism.) The joint sequence is S = 2k, 4k, 8k, 16k, 32k tokens (a 16x16 token grid per frame, S/256 - 1
frames, plus the text). The mask-free path (attention.py's low-rank logit offsets) runs at every S;
the dense-mask reference (`dense_attention_reference`, [B, H, S, S] masks) up to 8k, beyond which
it does not fit in this machine's memory.

Each point runs in its own process on one torch thread, in fp32: peak memory is the step's rise of
the process's peak resident set (VmHWM reset through /proc/self/clear_refs just before the step, so
model, inputs and imports are left out; glibc's mmap threshold is fixed at 128 KiB so that freed
tensors leave the resident set and the peak follows the live tensors), and time is the step's CPU time (on a shared machine wall
time mostly measures the other processes; wall time is recorded too). One run per point, after a
warm-up step at S = 1k in the same process.

    python benchmarks/bench_attention.py                 # writes benchmarks/results/attention_memory.json
    python benchmarks/bench_attention.py --sizes 2048    # a subset
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(ROOT / "src"))

TEXT = 256
GRID = 16  # tokens per frame side: 16 x 16 = 256 video tokens a frame
SIZES = (2048, 4096, 8192, 16384, 32768)
DENSE_UP_TO = 8192


def build(bias: float | None):
    import torch

    from univigu.config import TransformerConfig
    from univigu.models.transformer import UniViGUTransformer

    config = TransformerConfig(num_attention_heads=4, attention_head_dim=32, num_layers=2, ffn_dim=256,
                               in_channels=4, out_channels=4, text_dim=32, freq_dim=64, vocab_size=100,
                               text_length=TEXT, attention_policy="clean_isolated", text_key_bias=bias,
                               text_query_projection=True, rope_max_seq_len=1024)
    torch.manual_seed(0)
    model = UniViGUTransformer(config).train()
    with torch.no_grad():  # the zero-initialised heads would leave the gradients trivial
        model.proj_out.weight.normal_(std=0.02)
        model.text_stream.proj_out.weight.normal_(std=0.02)
    return model


def step(model, size: int):
    import torch

    frames = size // TEXT - 1
    g = torch.Generator().manual_seed(size)
    video = torch.randn(1, 4, frames, 2 * GRID, 2 * GRID, generator=g)
    text = torch.randint(0, 100, (1, TEXT), generator=g)
    condition = torch.randn(1, 8, 32, generator=g)
    t_video, t_text = torch.tensor([500.0]), torch.tensor([0.0])  # T2V
    return lambda: _loss(model(video, text, t_video, t_text, condition)).backward()


def _loss(outputs):
    velocity, logits = outputs
    return velocity.square().mean() + logits.logsumexp(-1).mean()


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def _cap_address_space(fraction: float = 0.7) -> None:
    """Let allocations beyond `fraction` of the machine's available memory fail in this process
    (torch raises) rather than wake the out-of-memory killer on a shared machine."""
    import resource

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            size = int(line.split()[1]) * 1024
    limit = size + int(fraction * _meminfo("MemAvailable"))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def child(size: int, bias: float | None, dense: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    _cap_address_space()
    model = build(bias)
    model.dense_attention_reference = dense
    step(model, 1024)()  # warm-up
    model.zero_grad(set_to_none=True)
    run = step(model, size)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        run()
    except (RuntimeError, MemoryError) as error:  # the allocator's out-of-memory
        return {"error": str(error).splitlines()[0][:200]}
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = _peak_rss() - before
    return {"peak_bytes": peak, "bytes_per_token": round(peak / size, 1), "cpu_s": round(cpu, 3),
            "wall_s": round(wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/attention_memory.json"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, bias, dense = int(args.child[0]), args.child[1], args.child[2] == "dense"
        print(json.dumps(child(size, None if bias == "none" else float(bias), dense)))
        return

    from common import load_average, machine_info, write_json

    rows = []
    for size in args.sizes:
        for bias in ("none", "-8"):
            row = {"joint_tokens": size, "video_tokens": size - TEXT, "text_key_bias": bias}
            for impl in ("mask_free", "dense"):
                if impl == "dense" and size > DENSE_UP_TO:
                    continue
                proc = subprocess.run([sys.executable, __file__, "--child", str(size), bias, impl],
                                      capture_output=True, text=True,
                                      env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)})
                lines = proc.stdout.strip().splitlines()
                result = (json.loads(lines[-1]) if proc.returncode == 0 and lines
                          else {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"})
                row[impl] = result
                print(size, bias, impl, result, flush=True)
            if "dense" in row and "peak_bytes" in row["dense"] and "peak_bytes" in row["mask_free"]:
                row["memory_ratio_mask_free_over_dense"] = round(
                    row["mask_free"]["peak_bytes"] / row["dense"]["peak_bytes"], 4)
                row["time_ratio_mask_free_over_dense"] = round(row["mask_free"]["cpu_s"] / row["dense"]["cpu_s"], 3)
            rows.append(row)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "benchmarks"],
                                capture_output=True, text=True).stdout.strip())
    payload = {
        "benchmark": "attention_memory",
        "what": "one training forward+backward (one T2V sample) of a 2-block model with "
                "4 heads of 32, clean_isolated, fp32, one thread; peak = rise of the process's peak RSS "
                "during the step; time = the step's CPU time; mask_free = low-rank logit offsets, "
                "dense = the dense-mask reference",
        "command": "python " + " ".join(["benchmarks/bench_attention.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit + ("-dirty" if dirty else ""),
        "machine": machine_info(),
        "child_torch_threads": 1,
        "load_average": load_average(),
        "rows": rows,
    }
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
