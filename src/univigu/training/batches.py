"""The batch maker: which samples a step trains on, each sample's task, and its noise.

Every sample's randomness comes from its own RNG keyed by (seed, optimizer step, sample id)
(`data.sample_generator`), so neither the number of processes nor gradient accumulation changes
what a sample sees. From that RNG a sample draws, in this order: its task, four uniforms for the
task's coin flips (`SampleDraws`), its noise level(s), then its video noise and its text noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import TASKS, ExperimentConfig
from ..flow.losses import count_loss_terms
from ..flow.paths import MixtureTextPath, NoiseLevelSampler, RectifiedFlowPath
from .cache import PromptBank
from .data import sample_generator


@dataclass
class StepBatch:
    """Clean inputs of one (micro-)batch and each sample's task and RNG."""

    video: torch.Tensor  # clean latents [B, C, F, H, W]
    condition: torch.Tensor  # prompt embeddings [B, Lc, D]
    text: torch.Tensor | None  # clean canvas [B, L]
    tasks: list[str]
    generators: list[torch.Generator]


@dataclass
class NoisedBatch:
    """What one forward pass sees and what its loss compares against."""

    video: torch.Tensor  # noisy (or clean) latents
    video_target: torch.Tensor
    s_video: torch.Tensor  # [B]; 0 = clean video, no video loss
    text: torch.Tensor | None  # noisy canvas
    text_target: torch.Tensor | None
    s_text: torch.Tensor  # [B]; 0 = clean text, no text loss
    condition: torch.Tensor
    drop_video: torch.Tensor  # [B] bool: V2T samples whose text is predicted without the video


@dataclass
class SampleDraws:
    """One sample's coin flips, uniforms in [0, 1) (0-d tensors), drawn together in this order."""

    condition_dropout: torch.Tensor  # T2V / joint: null prompt (the guidance branch)
    video_dropout: torch.Tensor  # V2T: predict the text without the video
    joint_tied: torch.Tensor  # joint: one noise level for both modalities
    joint_unconditional: torch.Tensor  # joint: null prompt

    @classmethod
    def draw(cls, generator: torch.Generator) -> "SampleDraws":
        return cls(*torch.rand(4, generator=generator))


def _text_noise_level(generator: torch.Generator) -> torch.Tensor:
    """A text noise level of its own: uniform, kept off zero so the sample has a text loss."""
    return torch.rand(1, generator=generator).clamp(min=1e-3)[0]


class StepInputs(torch.utils.data.Dataset):
    """Micro-step -> (this process's sample indices, their clean latents, their prompt embeddings):
    the part of a batch read from the cache, a pure function of the micro-step (the step-indexed
    sampler is the one source of truth), so a loader may read it ahead in worker processes."""

    def __init__(self, data, codec, prompts, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.data, self.codec, self.prompts = data, codec, prompts
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size

    def __getitem__(self, micro_step: int):
        index = self.data.batch(micro_step, self.batch_size, self.seed)
        if self.world_size > 1:  # as DistributedContext.shard (checked there when the run starts)
            index = np.array_split(index, self.world_size)[self.rank]
        return (index, self.data.latents(index, self.codec),
                self.prompts([self.data.prompts[i] for i in index]))


def _as_is(item):
    return item


class BatchMaker:
    """Makes this process's part of every global micro-batch and noises it for its tasks."""

    def __init__(self, cfg: ExperimentConfig, data, codec, prompts: PromptBank, null_condition: torch.Tensor,
                 tokenizer=None, text_path: MixtureTextPath | None = None, text_length: int = 0, dist=None):
        self.train, self.mixture = cfg.train, cfg.train.mixture
        self.data, self.codec, self.prompts = data, codec, prompts
        self.null_condition = null_condition
        self.tokenizer, self.text_path, self.text_length = tokenizer, text_path, text_length
        self.dist = dist
        self.video_path = RectifiedFlowPath()
        self.noise_levels = NoiseLevelSampler.from_config(cfg.flow)
        self.inputs = StepInputs(data, codec, prompts, cfg.train.batch_size, cfg.train.seed,
                                 0 if dist is None else dist.rank, 1 if dist is None else dist.world_size)
        self._stream = None  # (iterator over micro-steps from `_next`, the next micro-step it yields)

    def stream(self, start: int, end: int, workers: int, pin_memory: bool = False) -> None:
        """Read micro-steps start..end-1 ahead with a DataLoader of `workers` processes (each holding
        two micro-batches ready); `make` takes them in order and computes any other step itself."""
        self.stop()
        if workers <= 0 or start >= end:
            return
        loader = torch.utils.data.DataLoader(self.inputs, sampler=range(start, end), batch_size=None,
                                             num_workers=workers, prefetch_factor=2, collate_fn=_as_is,
                                             pin_memory=pin_memory)
        self._stream = [iter(loader), start]

    def stop(self) -> None:
        self._stream = None  # dropping the iterator shuts its workers down

    def _inputs(self, micro_step: int):
        if self._stream is not None and self._stream[1] == micro_step:
            self._stream[1] += 1
            return next(self._stream[0])
        if self.dist is not None:
            self.dist.shard(self.data.batch(micro_step, self.train.batch_size, self.train.seed))  # its checks
        return self.inputs[micro_step]

    def draw_tasks(self, generators: list[torch.Generator]) -> list[str]:
        if self.tokenizer is None:
            return ["t2v"] * len(generators)
        mix = self.mixture
        probs = torch.tensor([mix.t2v, mix.v2t, mix.joint], dtype=torch.float64)
        probs = probs / probs.sum()
        return [TASKS[int(torch.multinomial(probs, 1, generator=g))] for g in generators]

    def make(self, micro_step: int, step: int | None = None) -> StepBatch:
        """This process's part of global micro-batch `micro_step` of optimizer step `step`."""
        t = self.train
        step = micro_step if step is None else step
        index, video, condition = self._inputs(micro_step)
        generators = [sample_generator(t.seed, step, int(i)) for i in index]
        tasks = self.draw_tasks(generators)
        text = None
        if self.tokenizer is not None:
            target = self.data.prompts if t.stage == "knowledge_recall" else self.data.captions
            # A T2V sample's clean text stream holds the prompt in every stage: at inference a user
            # gives a prompt, not a detailed caption. V2T and joint samples learn the stage's target.
            texts = [self.data.prompts[i] if task == "t2v" else target[i] for i, task in zip(index, tasks)]
            text = self.tokenizer.encode(texts, self.text_length, truncate=True)
        return StepBatch(video=video, condition=condition, text=text, tasks=tasks, generators=generators)

    def noise(self, batch: StepBatch) -> NoisedBatch:
        """Per-sample noise levels, inputs and conditions for the batch's tasks (DESIGN.md section 4)."""
        mix = self.mixture
        n = len(batch.tasks)
        s_video, s_text = torch.zeros(n), torch.zeros(n)
        condition = batch.condition.clone()
        drop_video = torch.zeros(n, dtype=torch.bool)
        for i, (task, g) in enumerate(zip(batch.tasks, batch.generators)):
            draws = SampleDraws.draw(g)
            level = self.noise_levels(1, generator=g)[0]
            if task == "t2v":
                s_video[i] = level
                if draws.condition_dropout < mix.condition_dropout:  # unconditional: null prompt, text all noise
                    condition[i] = self.null_condition
                    s_text[i] = 1.0
            elif task == "v2t":
                s_text[i] = _text_noise_level(g)
                condition[i] = self.null_condition
                drop_video[i] = bool(draws.video_dropout < mix.video_dropout)
            else:  # joint
                s_video[i] = level
                s_text[i] = level if draws.joint_tied < mix.joint_tied else _text_noise_level(g)
                if draws.joint_unconditional < mix.joint_unconditional or draws.condition_dropout < mix.condition_dropout:
                    condition[i] = self.null_condition
        video_noise = torch.stack([torch.randn(batch.video.shape[1:], generator=g) for g in batch.generators])
        video_sample = self.video_path.sample(batch.video, s_video, noise=video_noise)
        noisy_text = None
        if batch.text is not None:
            noisy_text = torch.cat([self.text_path.sample(batch.text[i:i + 1], s_text[i:i + 1], generator=g).noisy
                                    for i, g in enumerate(batch.generators)])
        return NoisedBatch(video=video_sample.noisy, video_target=video_sample.target, s_video=s_video,
                           text=noisy_text, text_target=batch.text, s_text=s_text, condition=condition,
                           drop_video=drop_video)


def loss_counts(nb: NoisedBatch) -> torch.Tensor:
    """[video count, text count] the joint loss of this batch normalises by."""
    has_text = nb.text is not None
    video, text = count_loss_terms(nb.s_video, nb.s_text if has_text else None, nb.text.shape[1] if has_text else 0)
    return torch.stack([video, text]).float()
