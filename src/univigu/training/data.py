"""Training data in memory: ShapesWorld videos as uint8 frames, prompt embeddings per distinct prompt.

Small worlds (ShapesWorld, a few thousand clips) fit in memory as uint8 frames; latents are made per
batch by the codec (the default pixel-unshuffle codec costs nothing). Real videos go through the
latent cache instead (`training/cache.py`, `LatentSet`); both data sets offer the same three calls:
`batch(step, batch_size, seed)`, `latents(index, codec)` and the `prompts` / `captions` / `ids` lists.
Prompt embeddings are looked up from the prompt cache (`cache.PromptBank`).
The order of samples is a permutation keyed by (seed, epoch), so a run resumed at step k sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import WorldConfig
from ..data import shapesworld
from ..data.video_io import frames_to_tensor


@dataclass
class TrainingSet:
    frames: np.ndarray  # uint8 [N, F, H, W, 3]
    prompts: list[str]
    captions: list[str]
    ids: list[str]
    truths: list[list[dict]] | None = None  # ShapesWorld: the objects' attributes (oracle ground truth)

    def __len__(self) -> int:
        return len(self.ids)

    def videos(self, index: np.ndarray) -> torch.Tensor:
        """Float videos [B, 3, F, H, W] in [-1, 1]."""
        return torch.stack([frames_to_tensor(self.frames[i]) for i in index])

    def latents(self, index: np.ndarray, codec) -> torch.Tensor:
        """Clean latents [B, C, F', H', W'] of the samples."""
        with torch.no_grad():
            return codec.encode(self.videos(index)).float()

    def batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        return batch_indices(len(self), batch_size, step, seed)


def shapesworld_set(num: int, seed: int, world: WorldConfig, split: str = "train",
                    progress: bool = True) -> TrainingSet:
    """Render `num` ShapesWorld clips in memory (deterministic by seed)."""
    samples = shapesworld.make_samples(num, seed, world, split)
    frames = np.stack([shapesworld.render(s.scene, world)
                       for s in tqdm(samples, desc="rendering ShapesWorld", disable=not progress)])
    return TrainingSet(frames=frames, prompts=[s.prompt for s in samples],
                       captions=[s.caption for s in samples], ids=[s.id for s in samples],
                       truths=[shapesworld.attributes(s.scene) for s in samples])


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
