"""Shared pieces of the benchmarks: analytic FLOP counts, timing, GEMM peak, machine info, JSON.

FLOP counts are analytic and count what the model's matrix products do, in the convention of
`torch.utils.flop_counter` (a multiply-add is 2 FLOPs; elementwise work -- norms, RoPE,
modulation, activations, softmax -- is not counted): the linear layers, the patch-embedding
convolution, the attention scores and weighted values, and the heads. `tests/test_bench_flops.py`
checks them against `FlopCounterMode` on our model and on diffusers' `WanTransformer3DModel`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from univigu.config import TransformerConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs
# ---------------------------------------------------------------------------------------------


def per_token_flops(config: TransformerConfig, modality: str, n_keys: int, condition_length: int) -> int:
    """Forward FLOPs of one video or text token in a joint forward pass.

    With D = heads x head_dim, layers l, prompt length Lc, FFN width F (F_text for the text
    expert), K keys in the joint self-attention (the whole sequence the token's query is scored
    against), patch volume p, channels C in / C_out out and vocabulary V::

        f = l * [ 8 D^2          self-attention q, k, v, out projections
                + 4 K D          scores q.k and the weighted sum of values, K keys
                + 4 D^2          cross-attention q and out projections
                + 4 Lc D         cross-attention scores and values over the prompt
                + 4 D F ]        FFN up and down (video: ffn_dim, text: the text expert)
          + video: 2 C p D + 2 D C_out p     patch embedding + velocity head
          + text:  2 D V                     vocabulary head (the token embedding is a lookup)

    Per-sample work that does not grow with the tokens (the prompt projection, the cross-attention
    keys/values of the prompt, the timestep embeddings) is in `per_sample_flops`.
    """
    if modality not in ("video", "text"):
        raise ValueError(f"modality must be 'video' or 'text', got {modality!r}")
    d = config.inner_dim
    f = config.num_layers * layer_flops(config, modality, n_keys, condition_length)
    if modality == "video":
        patch = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
        f += 2 * config.in_channels * patch * d + 2 * d * config.out_channels * patch
    else:
        f += 2 * d * config.vocab_size
    return f


def layer_flops(config: TransformerConfig, modality: str, n_keys: int, condition_length: int) -> int:
    """Forward FLOPs of one token of `modality` in one block (the bracket of `per_token_flops`)."""
    d = config.inner_dim
    ffn = config.ffn_dim if modality == "video" else (config.text_ffn_dim or config.ffn_dim)
    return 8 * d * d + 4 * n_keys * d + 4 * d * d + 4 * condition_length * d + 4 * d * ffn


def per_sample_flops(config: TransformerConfig, condition_length: int, *, context_projection: bool = True,
                     context_kv: bool = True, timestep_embeddings: int = 1) -> int:
    """Forward FLOPs of one sample that do not depend on its token count.

    Cross-attention keys and values of the prompt in every layer (4 Lc D^2 per layer; skipped when
    a cache holds them), the prompt projection Linear(text_dim, D) -> Linear(D, D)
    (2 Lc (text_dim D + D^2); skipped when a cache holds it) and each modality's timestep embedding
    Linear(freq, D) -> Linear(D, D) -> Linear(D, 6D) (2 (freq D + D^2 + 6 D^2) each).
    """
    d = config.inner_dim
    f = config.num_layers * 4 * condition_length * d * d if context_kv else 0
    if context_projection:
        f += 2 * condition_length * (config.text_dim * d + d * d)
    f += timestep_embeddings * 2 * (config.freq_dim * d + d * d + 6 * d * d)
    return f


def forward_flops(config: TransformerConfig, batch: int, n_video: int, n_text: int, condition_length: int) -> int:
    """FLOPs of one joint `forward` (every token scored against all N + L keys, as SDPA computes
    the full score matrix even where the clean_isolated mask blocks it)."""
    keys = n_video + n_text
    tokens = n_video * (per_token_flops(config, "video", keys, condition_length) if n_video else 0)
    tokens += n_text * (per_token_flops(config, "text", keys, condition_length) if n_text else 0)
    streams = int(n_video > 0) + int(n_text > 0)
    return batch * (tokens + per_sample_flops(config, condition_length, timestep_embeddings=streams))


def prefill_flops(config: TransformerConfig, batch: int, n_video: int, condition_length: int) -> int:
    """FLOPs of `prefill(clean='video')`: the video tokens through every block but the last, of
    which only the keys and values are projected (4 D^2 per token; no velocity head), with the
    prompt projection and its cross-attention keys/values, which the cache keeps."""
    d = config.inner_dim
    patch = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
    head = 2 * d * config.out_channels * patch
    last_block_unused = layer_flops(config, "video", n_video, condition_length) - 4 * d * d
    tokens = n_video * (per_token_flops(config, "video", n_video, condition_length) - head - last_block_unused)
    return batch * (tokens + per_sample_flops(config, condition_length))


def step_text_flops(config: TransformerConfig, batch: int, n_text: int, n_video: int, condition_length: int) -> int:
    """FLOPs of one `step_text` against a clean-video cache (the prompt projection and the
    cross-attention keys/values of the prompt in every layer come from the cache)."""
    tokens = n_text * per_token_flops(config, "text", n_video + n_text, condition_length)
    return batch * (tokens + per_sample_flops(config, condition_length, context_projection=False,
                                              context_kv=False))


def training_step_flops(config: TransformerConfig, batch: int, n_video: int, n_text: int,
                        condition_length: int) -> int:
    """Model FLOPs of forward + backward: 3x the forward (each product's backward computes the
    gradients of both its operands), less the input gradients nobody needs -- the first layers fed by
    data (patch embedding, prompt projection's first linear, the sinusoid -> timestep linears).

    Attention's backward counts 2x its forward (no recomputation: model FLOPs, as in MFU)."""
    patch = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
    streams = int(n_video > 0) + int(n_text > 0)
    unneeded = (2 * n_video * config.in_channels * patch * config.inner_dim
                + 2 * condition_length * config.text_dim * config.inner_dim
                + streams * 2 * config.freq_dim * config.inner_dim)
    return 3 * forward_flops(config, batch, n_video, n_text, condition_length) - batch * unneeded


def cache_speedup_bound(steps: int, n_video: int, n_text: int, f_video: float, f_text: float) -> float:
    """The bound on the speed-up of V2T from caching the clean video.

    Recomputing the joint sequence costs S (N f_v + L f_t); the cache costs one prefill of the video
    (N f_v) and S steps of the text alone (S L f_t)::

        bound = S (N f_v + L f_t) / (N f_v + S L f_t)
    """
    return steps * (n_video * f_video + n_text * f_text) / (n_video * f_video + steps * n_text * f_text)


# ---------------------------------------------------------------------------------------------
# Timing and peak
# ---------------------------------------------------------------------------------------------


def compile_blocks(*models: torch.nn.Module) -> None:
    """torch.compile every transformer block of each model in place (ours and diffusers' Wan both
    keep them in `.blocks`), as `train.compile` does: the first calls after it pay the compiles."""
    for model in models:
        for block in model.blocks:
            block.compile()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> float:
    """Wall seconds of one call of `fn` (synchronising the GPU around it)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def timed_both(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call of `fn`.

    On a shared machine the wall clock also counts the time other processes held the core; the
    process CPU time does not, so with one torch thread it is the clock to trust under load.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def median(values) -> float:
    return float(statistics.median(values))


def gemm_flops_per_s(n: int, dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
                     repeats: int = 3, seed: int = 0) -> float:
    """Best-case matrix-multiply throughput: median FLOP/s of an n x n x n matmul (2 n^3 FLOPs)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up (thread pools, kernel selection)
    times = [timed(lambda: torch.mm(a, b), device) for _ in range(repeats)]
    return 2 * n**3 / median(times)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What the numbers were measured on."""
    info = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> str:
    """The checkout's `git rev-parse HEAD` (with "-dirty" when tracked files differ), or "unknown"."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "") if head else "unknown"


def machine_summary() -> str:
    """One line naming the machine: the GPU when there is one, else the CPU, its ISA and cores."""
    cpu = f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} logical CPUs"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (host: {cpu})"
    return cpu


def provenance() -> dict:
    """Where a result comes from: machine, date (UTC), commit and the command line that made it."""
    return {
        "machine": machine_summary(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
    }


def write_json(path: str | Path, payload: dict) -> Path:
    """Write `payload` as indented JSON (atomically: a reader never sees half a file), with a
    top-level "provenance" block (`provenance()`) first unless the payload brings its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(payload, dict) and "provenance" not in payload:
        payload = {"provenance": provenance(), **payload}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path
