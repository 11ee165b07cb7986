"""Training data in memory: videos as uint8 frames, prompts as cached embeddings, text as canvases.

Small worlds (ShapesWorld, a few thousand clips) fit in memory as uint8 frames; latents are made per
batch by the codec (the default pixel-unshuffle codec costs nothing). Prompt embeddings are computed
once per distinct prompt. The order of samples is a permutation keyed by (seed, epoch), so a run
resumed at step k sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import WorldConfig
from ..data import shapesworld
from ..data.manifest import read_manifest
from ..data.video_io import frames_to_tensor, read_video


@dataclass
class TrainingSet:
    frames: np.ndarray  # uint8 [N, F, H, W, 3]
    prompts: list[str]
    captions: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def videos(self, index: np.ndarray) -> torch.Tensor:
        """Float videos [B, 3, F, H, W] in [-1, 1]."""
        return torch.stack([frames_to_tensor(self.frames[i]) for i in index])


def shapesworld_set(num: int, seed: int, world: WorldConfig, split: str = "train",
                    progress: bool = True) -> TrainingSet:
    """Render `num` ShapesWorld clips in memory (deterministic by seed)."""
    samples = shapesworld.make_samples(num, seed, world, split)
    frames = np.stack([shapesworld.render(s.scene, world)
                       for s in tqdm(samples, desc="rendering ShapesWorld", disable=not progress)])
    return TrainingSet(frames=frames, prompts=[s.prompt for s in samples],
                       captions=[s.caption for s in samples], ids=[s.id for s in samples])


def manifest_set(path: str | Path, world: WorldConfig, progress: bool = True) -> TrainingSet:
    """Decode every clip of a JSONL manifest, sampled and resized to the world's size."""
    records = read_manifest(path, required=("video", "prompt"))
    frames = [read_video(r["video"], num_frames=world.frames, size=(world.width, world.height))
              for r in tqdm(records, desc="decoding videos", disable=not progress)]
    return TrainingSet(frames=np.stack(frames), prompts=[r["prompt"] for r in records],
                       captions=[r.get("caption", r["prompt"]) for r in records],
                       ids=[str(r.get("id", i)) for i, r in enumerate(records)])


def batch_indices(num: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the samples in global batch `step`: epochs are seeded permutations."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num)
        perm = np.random.default_rng([seed, epoch]).permutation(num)
        take = min(batch_size - len(out), num - offset)
        out.extend(perm[offset:offset + take].tolist())
    return np.asarray(out)


def sample_generator(seed: int, step: int, sample_id: int) -> torch.Generator:
    """The RNG of one sample at one step: noise and masking do not depend on how a batch is split."""
    mixed = np.random.SeedSequence([seed, step, sample_id]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))


class PromptBank:
    """Prompt embeddings computed once per distinct prompt."""

    def __init__(self, encoder, prompts: list[str], batch_size: int = 64, progress: bool = True):
        unique = sorted(set(prompts))
        self.index = {p: i for i, p in enumerate(unique)}
        chunks = []
        for start in tqdm(range(0, len(unique), batch_size), desc="encoding prompts", disable=not progress):
            emb, _ = encoder.encode(unique[start:start + batch_size])
            chunks.append(emb.float().cpu())
        self.embeddings = torch.cat(chunks) if chunks else torch.zeros(0)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self.embeddings[[self.index[p] for p in prompts]]
