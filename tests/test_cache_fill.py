"""`univigu data cache`: one process and two (torchrun, gloo's launcher) fill the same cache files; a
killed fill resumes without redoing finished chunks; bad files are listed, skipped and counted; the
trainer then reads the filled cache without encoding anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from univigu.data.video_io import write_video
from univigu.training.cache import cached_manifest_latents, prompt_lookup
from univigu.config import load_config
from univigu.models.vae import load_codec
from training_helpers import TINY

BUCKETS = "train.buckets=[[16, 16, 5], [24, 16, 5]]"


def _clip(seed: int, frames: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, height, width, 3))
    return np.clip(base + np.arange(frames)[:, None, None, None] * 8, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """9 good clips of two shapes, one too short, one that is not a video; a config to fill for."""
    root = tmp_path_factory.mktemp("fill-data")
    lines = []
    for i in range(9):
        height, width = [(32, 32), (32, 48)][i % 2]
        write_video(root / f"c{i}.mp4", _clip(i, 9, height, width), fps=8)
        lines.append({"video": f"c{i}.mp4", "prompt": f"clip number {i}", "caption": f"the clip {i}"})
    write_video(root / "short.mp4", _clip(20, 3, 32, 32), fps=8)
    (root / "broken.mp4").write_bytes(b"not a video at all" * 10)
    lines[3:3] = [{"video": "short.mp4", "prompt": "short"}, {"video": "broken.mp4", "prompt": "broken"}]
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = root / "config.yaml"
    config.write_text("")
    overrides = TINY + [f"train.manifest={root / 'train.jsonl'}", BUCKETS]
    return root, config, overrides


def _fill(config, overrides, out, *args, nproc: int = 1, env: dict | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    launcher = [sys.executable, "-m", "univigu"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "univigu"]
    cmd = [*launcher, "data", "cache", "--config", str(config), "--out", str(out), "--device", "cpu",
           "--no-progress", "--chunk", "2", "--workers", "0", *args, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _files(cache) -> dict[str, bytes]:
    """Every store file of a cache (the per-shard file-hash memos aside), by path."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*"))
            if p.is_file() and not p.name.startswith("file-hashes")}


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):
    """A whole fill by one process (one decoding worker): the reference."""
    _, config, overrides = dataset
    out = tmp_path_factory.mktemp("fill-one")
    return out, _fill(config, overrides, out, "--workers", "1")


def test_one_and_two_processes_fill_the_same_cache_files(dataset, one_process, tmp_path):
    root, config, overrides = dataset
    reference, one = one_process
    assert one.returncode == 1, one.stdout + one.stderr  # the broken file makes the exit status 1
    assert "9 clips (9 encoded, 0 already cached, 1 too short, 1 bad)" in one.stdout, one.stdout
    assert "bad: " in one.stdout and "broken.mp4" in one.stdout
    two = _fill(config, overrides, tmp_path / "two", "--workers", "1", nproc=2)
    assert two.returncode != 0 and two.stdout.count("  bad: ") == 1, two.stdout + two.stderr
    assert _files(reference) == _files(tmp_path / "two")
    assert len(list((reference / "latents").rglob("shard-*.safetensors"))) == 6  # chunks with clips

    # What a training run reads is all there: nothing to encode or decode.
    cfg = load_config(None, overrides)
    data = cached_manifest_latents(cfg.train.manifest, load_codec(cfg.codec), cfg.codec, cfg.world, tmp_path / "two",
                                   cfg.train.buckets, compute=False, progress=False)
    assert len(data) == 9 and data.latents([0]).shape == (1, 48, 5, 4, 4)
    bank, _ = prompt_lookup(data.prompts, cfg.prompt_encoder, tmp_path / "two", compute=False)
    assert bank(data.prompts[:2]).shape == (2, 16, 384)


def test_a_killed_fill_resumes_without_redoing_finished_chunks(dataset, one_process, tmp_path):
    root, config, overrides = dataset
    killed = _fill(config, overrides, tmp_path / "c", env={"UNIVIGU_KILL_AT": "cache-chunk@2"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "c" / "latents").rglob("shard-*.safetensors")}
    assert len(written) == 2
    resumed = _fill(config, overrides, tmp_path / "c")
    # Chunks of 2 lines: [c0 c1] [c2 short] [broken c3] [c4 c5] [c6 c7] [c8]; the first two were done.
    assert "9 clips (6 encoded, 3 already cached" in resumed.stdout, resumed.stdout + resumed.stderr
    assert "chunks 4 written, 2 finished before" in resumed.stdout
    assert "broken.mp4 (unreadable, found by an earlier fill)" in resumed.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())  # not rewritten
    assert _files(tmp_path / "c") == _files(one_process[0])  # what an uninterrupted fill writes
