"""Memory and throughput of the cached data path against the data set's size (CPU).

For each size N a cache is written directly (no videos): N distinct prompts with embeddings as wide
as UMT5's (4096) and `--tokens` real tokens each, stored trimmed (the condition length, 512, is
rebuilt at lookup), and N tiny latents in one bucket. Then a fresh process builds what a training
process holds for that cache (`LatentSet`, `PromptBank` through `prompt_lookup`, `StepInputs`)
and reads `--steps` micro-batches spread over the whole set; its peak resident memory (VmHWM, reset before) above the
same process before the data path is the number reported (MiB, and MiB per 1k samples between
the smallest and largest N); `index_mib` is the resident growth from building the data path alone
(the key index: what grows with N), before any read. The
loader rate is micro-batches through a `torch.utils.data.DataLoader` with 0, 1 and 2 workers, as
`BatchMaker.stream` runs them, beside the step rate of a tiny trainer for scale.

  PYTHONPATH=src python benchmarks/bench_data.py --sizes 1000 4000 16000 --out benchmarks/results/data.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from univigu.config import PromptEncoderConfig
from univigu.training.cache import NULL_KEY, Bucket, LatentSet, TensorStore, prompt_store, text_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

ENCODER = PromptEncoderConfig(kind="umt5", path="fake-umt5", condition_length=512)
WIDTH = 4096
LATENT = (16, 2, 4, 4)


def prompt_of(i: int) -> str:
    return f"a clip of things moving, number {i}"


def write_cache(root: Path, n: int, tokens: int) -> None:
    store = prompt_store(root, ENCODER)
    gen = torch.Generator().manual_seed(n)
    for start in range(0, n, 256):
        store.put({text_key(prompt_of(i)): torch.randn(tokens, WIDTH, generator=gen)
                   for i in range(start, min(start + 256, n))})
    store.put({NULL_KEY: torch.randn(2, WIDTH, generator=gen)})
    latents = TensorStore(root / "latents")
    for start in range(0, n, 1024):
        latents.put({f"clip-{i}": torch.randn(LATENT, generator=gen) for i in range(start, min(start + 1024, n))})


def data_path(root: Path, n: int, batch: int):
    from univigu.training.batches import StepInputs
    from univigu.training.cache import prompt_lookup

    prompts = [prompt_of(i) for i in range(n)]
    data = LatentSet(TensorStore(root / "latents"), [f"clip-{i}" for i in range(n)], [0] * n,
                     [Bucket(16, 16, 5)], prompts=prompts, captions=prompts, ids=[str(i) for i in range(n)])
    bank, _ = prompt_lookup(prompts, ENCODER, root, compute=False)
    return StepInputs(data, None, bank, batch, seed=0)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(root: Path, n: int, batch: int, steps: int) -> dict:
    """Run in a fresh process: peak RSS of the data path, MiB above the process before it (the
    high-water mark is reset first, so the imports' own peak does not hide it; Linux)."""
    import univigu.training.batches  # noqa: F401  (imported before the baseline)
    import univigu.training.cache  # noqa: F401

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_mib("VmRSS")
    inputs = data_path(root, n, batch)
    built = _status_mib("VmRSS")
    per_epoch = n // batch
    for k in range(steps):  # spread over the whole set: every shard is read
        inputs[(k * 7919) % per_epoch]
    peak = _status_mib("VmHWM")
    return {"samples": n, "rss_before_mib": round(before, 1), "rss_peak_mib": round(peak, 1),
            "index_mib": round(built - before, 2), "data_path_mib": round(peak - before, 1)}


def loader_rate(root: Path, n: int, batch: int, steps: int, workers: int) -> float:
    inputs = data_path(root, n, batch)
    loader = torch.utils.data.DataLoader(inputs, sampler=range(steps), batch_size=None, num_workers=workers,
                                         prefetch_factor=2 if workers else None, collate_fn=lambda x: x)
    it = iter(loader)
    next(it)  # the workers' start-up is not the rate
    began = time.perf_counter()
    for _ in it:
        pass
    return (steps - 1) * batch / (time.perf_counter() - began)


def trainer_rate(root: Path) -> float:
    """Samples/s of a tiny generator trainer (ShapesWorld, the test suite's tiny model), for scale."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from training_helpers import tiny_config
    from univigu.training.trainer import Trainer

    cfg = tiny_config(root / "run", root / "tiny-cache", "train.steps=6", "train.eval_samples=0", "train.batch_size=2")
    trainer = Trainer(cfg, progress=False)
    trainer.train_step()
    began = time.perf_counter()
    for _ in range(5):
        trainer.train_step()
    trainer.close()
    return 5 * 2 / (time.perf_counter() - began)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--tokens", type=int, default=8, help="real tokens per prompt (stored trimmed)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=None)
    p.add_argument("--_measure", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._measure:
        print(json.dumps(measure(Path(args._measure[0]), int(args._measure[1]), args.batch, args.steps)))
        return
    rows, rates = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"n{n}"
            began = time.perf_counter()
            write_cache(root, n, args.tokens)
            # Large buffers (a padded batch is 2 x 8 MiB) straight from mmap and back: glibc's growing
            # heap threshold would otherwise make the peak depend on fragmentation, not on N.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            done = subprocess.run([sys.executable, __file__, "--_measure", str(root), str(n), "--batch",
                                   str(args.batch), "--steps", str(args.steps)], capture_output=True, text=True,
                                  check=True, env=env)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["cache_gib"] = round(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**30, 2)
            row["write_s"] = round(time.perf_counter() - began, 1)
            rows.append(row)
            print(row, flush=True)
            if n == args.sizes[0]:
                rates = {f"workers_{w}": round(loader_rate(root, n, args.batch, args.steps, w), 1) for w in (0, 1, 2)}
                print(rates, flush=True)
        trainer = round(trainer_rate(Path(tmp)), 1)
    first, last = rows[0], rows[-1]
    per_1k = (last["samples"] - first["samples"]) / 1000
    slope = (last["data_path_mib"] - first["data_path_mib"]) / per_1k
    index_slope = (last["index_mib"] - first["index_mib"]) / per_1k
    payload = {"setting": {"prompt_width": WIDTH, "condition_length": ENCODER.condition_length,
                           "real_tokens_per_prompt": args.tokens, "latent_shape": list(LATENT), "batch": args.batch,
                           "steps_read": args.steps},
               "memory": rows, "mib_per_1k_samples": round(slope, 3),
               "index_mib_per_1k_samples": round(index_slope, 3),
               "loader_samples_per_s": rates, "tiny_trainer_samples_per_s": trainer}
    print(json.dumps(payload, indent=2))
    if args.out:
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
