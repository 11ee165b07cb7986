"""The training loop of every stage: generator, Knowledge Recall, Capability Refinement.

One step draws a global batch (a seeded permutation of the training set), gives every sample a task
(T2V, V2T or joint, DESIGN.md section 4) and noise from its own RNG keyed by (seed, step, sample
id), runs the unified model and the joint loss, and updates AdamW + EMA. Checkpoints are atomic
and carry everything needed to resume exactly; each stage ends by exporting a model directory
(`models/bundle.py`) the pipeline loads.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import ExperimentConfig, save_config, to_dict
from ..flow.losses import count_loss_terms, joint_loss
from ..flow.paths import MixtureTextPath, NoiseLevelSampler, RectifiedFlowPath
from ..models.bundle import load_bundle, save_bundle
from ..models.text import TextTokenizer, load_prompt_encoder, load_text_tokenizer
from ..models.transformer import UniViGUTransformer
from ..models.unify import unify_video_model
from ..models.vae import load_codec
from . import checkpoint as ckpt
from .data import PromptBank, TrainingSet, batch_indices, manifest_set, sample_generator, shapesworld_set

TASKS = ("t2v", "v2t", "joint")
TRAINABLE_GROUPS = {"all": "all", "text": {"text"}, "text_and_shared": {"text", "shared"}}


class TrainingError(ValueError):
    """A training run cannot start: bad stage setup, missing init checkpoint, ..."""


def bf16_available(device: torch.device) -> bool:
    """bf16 autocast only where it is fast: CUDA, or CPUs with AVX-512 (BF16) kernels.
    On AVX2-only CPUs bf16 matmuls are emulated and ~100x slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay(step: int, decay: float, warmup: int) -> float:
    """EMA decay that starts low so short runs do not sample near-initial weights."""
    return min(decay, (1 + step) / (1 + step + max(1, warmup) / 10))


@dataclass
class StepBatch:
    video: torch.Tensor | None  # clean latents [B, C, F, H, W]
    condition: torch.Tensor
    text: torch.Tensor | None  # clean canvas [B, L]
    tasks: list[str]
    generators: list[torch.Generator]


class Trainer:
    """Runs one stage described by an `ExperimentConfig`."""

    def __init__(self, cfg: ExperimentConfig, device: str | torch.device = "cpu", progress: bool = True,
                 distributed=None):
        self.cfg = cfg
        self.train = cfg.train
        self.device = torch.device(device)
        self.progress = progress
        self.dist = distributed  # training.distributed.DistributedContext or None
        self.rank0 = distributed is None or distributed.rank == 0
        self.out = Path(self.train.output_dir)
        self.use_bf16 = self.train.bf16 and bf16_available(self.device)
        torch.manual_seed(self.train.seed)

        self.codec = load_codec(cfg.codec)
        self.data = self._load_data()
        self.tokenizer = self._load_tokenizer()
        self.model = self._build_model().to(self.device)
        self.model.set_trainable(TRAINABLE_GROUPS[self.train.trainable])
        if self.train.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        encoder = load_prompt_encoder(cfg.prompt_encoder)
        self.prompts = PromptBank(encoder, self.data.prompts, progress=progress and self.rank0)
        self.null_condition = encoder.null_condition()[0].float()
        del encoder
        self.video_path = RectifiedFlowPath()
        self.noise_levels = NoiseLevelSampler.from_config(cfg.flow)
        self.text_path = None
        if self.tokenizer is not None:
            self.text_path = MixtureTextPath.from_config(cfg.flow, self.tokenizer.vocab_size,
                                                         self.tokenizer.special_ids)
        self.train_model = self.model if distributed is None else distributed.wrap(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.train.lr, betas=tuple(self.train.betas),
                                           weight_decay=self.train.weight_decay)
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        self.step = 0
        self._maybe_resume()

    # ------------------------------------------------------------------ setup
    def _load_data(self) -> TrainingSet:
        t, world = self.train, self.cfg.world
        if t.manifest:
            return manifest_set(t.manifest, world, progress=self.progress and self.rank0)
        return shapesworld_set(t.num_train_videos, t.seed, world, progress=self.progress and self.rank0)

    def _load_tokenizer(self) -> TextTokenizer | None:
        if self.train.stage == "generator":
            return None
        if self.train.init_from and (Path(self.train.init_from) / "tokenizer").is_dir():
            return TextTokenizer.load(Path(self.train.init_from) / "tokenizer")
        # A trimmed vocabulary covers the prompts and captions the model will ever write here.
        return load_text_tokenizer(self.cfg.tokenizer, corpus=self.data.prompts + self.data.captions)

    def _build_model(self) -> UniViGUTransformer:
        cfg, t = self.cfg, self.train
        if t.stage == "generator":
            if t.init_from:
                return load_bundle(t.init_from).transformer
            model_cfg = copy.deepcopy(cfg.model)
            model_cfg.vocab_size = 0
            return UniViGUTransformer(model_cfg)
        if not t.init_from:
            raise TrainingError(f"stage {t.stage!r} starts from a previous stage: set train.init_from "
                                "(a generator or unified model directory)")
        base = load_bundle(t.init_from).transformer
        if base.has_text_stream:
            return base
        m = cfg.model
        return unify_video_model(base, vocab_size=self.tokenizer.vocab_size, text_length=m.text_length,
                                 mask_token=cfg.flow.text_source == "mask", init="copy",
                                 attention_policy=m.attention_policy, text_rope=m.text_rope,
                                 text_ffn_dim=m.text_ffn_dim)

    def _maybe_resume(self) -> None:
        last = ckpt.latest_checkpoint(self.out / "checkpoints")
        if last is None:
            return
        saved = ckpt.load_checkpoint(last)
        self.model.load_state_dict(saved["model"])
        self.ema = {k: v.float() for k, v in saved["ema"].items()}
        self.optimizer.load_state_dict(saved["optimizer"])
        self.step = saved["state"]["step"]
        if self.rank0:
            print(f"resumed from {last} at step {self.step}")

    # ------------------------------------------------------------------ batches
    def _draw_tasks(self, index: np.ndarray, gens: list[torch.Generator]) -> list[str]:
        if self.tokenizer is None:
            return ["t2v"] * len(index)
        mix = self.train.mixture
        probs = torch.tensor([mix.t2v, mix.v2t, mix.joint], dtype=torch.float64)
        probs = probs / probs.sum()
        return [TASKS[int(torch.multinomial(probs, 1, generator=g))] for g in gens]

    def make_batch(self, step: int) -> StepBatch:
        t = self.train
        index = batch_indices(len(self.data), t.batch_size, step, t.seed)
        if self.dist is not None:
            index = self.dist.shard(index)
        gens = [sample_generator(t.seed, step, int(i)) for i in index]
        tasks = self._draw_tasks(index, gens)
        video = self.codec.encode(self.data.videos(index))
        condition = self.prompts([self.data.prompts[i] for i in index])
        text = None
        if self.tokenizer is not None:
            source = self.data.prompts if t.stage == "knowledge_recall" else self.data.captions
            text = self.tokenizer.encode([source[i] for i in index], self.cfg.model.text_length, truncate=True)
        return StepBatch(video=video, condition=condition, text=text, tasks=tasks, generators=gens)

    def _noise(self, batch: StepBatch):
        """Per-sample noise levels, inputs and conditions for the batch's tasks."""
        mix = self.train.mixture
        n = len(batch.tasks)
        s_video = torch.zeros(n)
        s_text = torch.zeros(n)
        condition = batch.condition.clone()
        drop_video = torch.zeros(n, dtype=torch.bool)
        for i, (task, g) in enumerate(zip(batch.tasks, batch.generators)):
            u = torch.rand(4, generator=g)
            draw = self.noise_levels(1, generator=g)[0]
            if task == "t2v":
                s_video[i] = draw
                if u[0] < mix.condition_dropout:  # unconditional branch: null prompt, text fully noised
                    condition[i] = self.null_condition
                    s_text[i] = 1.0
            elif task == "v2t":
                s_text[i] = torch.rand(1, generator=g).clamp(min=1e-3)[0]
                condition[i] = self.null_condition
                drop_video[i] = bool(u[1] < mix.video_dropout)
            else:  # joint
                s_video[i] = draw
                s_text[i] = draw if u[2] < mix.joint_tied else torch.rand(1, generator=g).clamp(min=1e-3)[0]
                if u[3] < mix.joint_unconditional or u[0] < mix.condition_dropout:
                    condition[i] = self.null_condition
        video_noise = torch.stack([torch.randn(batch.video.shape[1:], generator=g) for g in batch.generators])
        video_sample = self.video_path.sample(batch.video, s_video, noise=video_noise)
        text_sample = None
        if batch.text is not None:
            noisy = [self.text_path.sample(batch.text[i:i + 1], s_text[i:i + 1], generator=g).noisy
                     for i, g in enumerate(batch.generators)]
            text_sample = torch.cat(noisy)
        return video_sample, s_video, s_text, text_sample, condition, drop_video

    # ------------------------------------------------------------------ step
    def _forward_loss(self, batch: StepBatch, global_counts=None):
        video_sample, s_video, s_text, noisy_text, condition, drop_video = self._noise(batch)
        dev = self.device
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.use_bf16)
        with autocast:
            velocity, logits = self.train_model(
                video_sample.noisy.to(dev), None if noisy_text is None else noisy_text.to(dev),
                (s_video * 1000).to(dev), None if noisy_text is None else (s_text * 1000).to(dev),
                condition.to(dev))
            if drop_video.any():  # text guidance branch: the same text with no video at all
                keep = drop_video.to(dev)
                _, alone = self.train_model(None, noisy_text.to(dev)[keep], None, (s_text * 1000).to(dev)[keep],
                                            condition.to(dev)[keep])
                logits = logits.clone()
                logits[keep] = alone
                s_video = torch.where(drop_video, torch.zeros_like(s_video), s_video)  # no video loss there
        kwargs = dict(velocity=velocity, video_target=video_sample.target.to(dev), video_noise_level=s_video.to(dev))
        if logits is not None:
            kwargs.update(logits=logits, text_target=batch.text.to(dev), text_noisy=noisy_text.to(dev),
                          text_noise_level=s_text.to(dev), path=self.text_path, text_loss=self.cfg.flow.text_loss,
                          text_weight=self.cfg.flow.text_loss_weight)
        if global_counts is not None:
            kwargs.update(video_normalizer=global_counts[0], text_normalizer=global_counts[1])
        return joint_loss(**kwargs), s_video, s_text

    def train_step(self) -> dict:
        t = self.train
        self.train_model.train()
        factor = lr_factor(self.step, t.warmup_steps, t.steps, t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = t.lr * factor
        logs = {"video_loss": 0.0, "text_loss": 0.0, "loss": 0.0}
        for micro in range(t.grad_accum):
            batch = self.make_batch(self.step * t.grad_accum + micro)
            result, _, _ = self._forward_loss(batch)
            (result.loss / t.grad_accum).backward()
            logs["loss"] += result.loss.item() / t.grad_accum
            logs["video_loss"] += float(result.video_loss) / t.grad_accum
            logs["text_loss"] += float(result.text_loss) / t.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema()
        self.step += 1
        logs["lr"] = t.lr * factor
        return logs

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = ema_decay(self.step, self.train.ema_decay, self.train.ema_warmup_steps)
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                self.ema[name].mul_(decay).add_(value.detach().float(), alpha=1 - decay)

    # ------------------------------------------------------------------ run
    def save(self) -> Path:
        state = {"stage": self.train.stage, "config": to_dict(self.cfg)}
        return ckpt.save_checkpoint(self.out / "checkpoints", self.step, self.model.state_dict(), self.ema,
                                    self.optimizer.state_dict(), state, keep_last=self.train.keep_last)

    def ema_model(self) -> UniViGUTransformer:
        model = copy.deepcopy(self.model)
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.ema.items()})
        return model.eval()

    def export(self, directory: Path | None = None) -> Path:
        directory = directory or self.out / "model"
        return save_bundle(directory, self.ema_model(), self.codec, self.cfg.prompt_encoder,
                           self.null_condition[None], self.tokenizer, self.cfg.world, self.cfg.sampler, self.cfg.flow)

    def run(self, on_step=None) -> Path:
        t = self.train
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank0:
            save_config(self.cfg, self.out / "config.yaml")
        log_file = (self.out / "metrics.jsonl").open("a") if self.rank0 else None
        bar = tqdm(total=t.steps, initial=self.step, desc=f"train {t.stage}", disable=not (self.progress and self.rank0))
        start, start_step = time.time(), self.step
        while self.step < t.steps:
            logs = self.train_step()
            bar.update(1)
            samples_per_s = (self.step - start_step) * t.batch_size * t.grad_accum / max(1e-9, time.time() - start)
            if self.rank0 and (self.step % t.log_every == 0 or self.step == t.steps):
                bar.set_postfix(video=f"{logs['video_loss']:.4f}", text=f"{logs['text_loss']:.3f}",
                                sps=f"{samples_per_s:.1f}")
                log_file.write(json.dumps({"step": self.step, **logs, "samples_per_s": samples_per_s,
                                           "time": time.time()}) + "\n")
                log_file.flush()
            if on_step is not None:
                on_step(self, logs)
            if self.rank0 and t.save_every and self.step % t.save_every == 0 and self.step < t.steps:
                self.save()
        bar.close()
        if self.rank0:
            self.save()
            log_file.close()
            return self.export()
        return self.out / "model"
