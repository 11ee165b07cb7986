"""The training loop of every stage: generator, Knowledge Recall, Capability Refinement.

One step draws a global batch (ShapesWorld: a seeded permutation; real data: a bucketed batch from
the latent cache), gives every sample a task (T2V, V2T or joint, DESIGN.md section 4) and noise
from its own RNG keyed by (seed, step, sample id), runs the unified model and the joint loss, and
updates AdamW + EMA. The loss is normalised by the counts of the whole global batch (all
micro-batches, all processes), so neither gradient accumulation nor the number of processes
changes the result. Checkpoints are atomic and carry everything needed to resume exactly; each
stage ends by exporting a model directory (`models/bundle.py`) the pipeline loads.

Under torchrun the trainer gets a `DistributedContext` (`training/distributed.py`): the model is
sharded with FSDP2, each rank trains on its part of every global batch, checkpoints go through DCP,
and rank 0 alone logs, validates and exports (from EMA weights gathered onto it).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import ExperimentConfig, save_config, to_dict
from ..flow.losses import count_loss_terms, joint_loss
from ..flow.paths import MixtureTextPath, NoiseLevelSampler, RectifiedFlowPath
from ..models.bundle import INDEX_NAME, load_bundle, save_bundle
from ..models.text import TextTokenizer, load_text_tokenizer
from ..models.transformer import UniViGUTransformer
from ..models.unify import TEXT_OPTIONS, unify_video_model
from ..models.vae import load_codec
from . import checkpoint as ckpt
from .cache import cached_manifest_latents, cached_prompt_embeddings, default_cache_dir
from .data import PromptBank, sample_generator, shapesworld_set
from .distributed import gather_full_state
from .logging import RunLogger
from .validation import ValidationData, Validator

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


def lower_is_better(metric: str) -> bool:
    return "loss" in metric


@dataclass
class StepBatch:
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


class Trainer:
    """Runs one stage described by an `ExperimentConfig`."""

    def __init__(self, cfg: ExperimentConfig, device: str | torch.device = "cpu", progress: bool = True,
                 distributed=None):
        self.cfg = cfg
        self.train = t = cfg.train
        self.dist = distributed  # training.distributed.DistributedContext or None
        self.rank0 = distributed is None or distributed.is_main
        self.world_size = 1 if distributed is None else distributed.world_size
        self.device = distributed.device if distributed is not None else torch.device(device)
        self.progress = progress and self.rank0
        self.out = Path(t.output_dir)
        self.cache_dir = Path(t.cache_dir) if t.cache_dir else default_cache_dir()
        self.use_bf16 = t.bf16 and bf16_available(self.device)
        if t.batch_size < self.world_size:
            raise TrainingError(f"train.batch_size={t.batch_size} is the global batch; it must be at least "
                                f"the number of processes ({self.world_size})")
        torch.manual_seed(t.seed)

        self.codec = load_codec(cfg.codec)
        self.data = self._load_data()
        self.tokenizer = self._load_tokenizer()
        self.model = self._build_model().to(self.device)
        self.model_config = self.model.config
        self.model.set_trainable(TRAINABLE_GROUPS[t.trainable])
        if not any(p.requires_grad for p in self.model.parameters()):
            raise TrainingError(f"train.trainable={t.trainable!r} leaves nothing to train in a "
                                f"{'video-only' if not self.model.has_text_stream else 'unified'} model")
        if t.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        if t.compile:  # before FSDP2 wraps the blocks, as torchtitan orders it
            self.model.compile_blocks()
        self.val_source = self._load_validation_source()
        self.prompts, self.null_condition = self._load_prompts()
        self.video_path = RectifiedFlowPath()
        self.noise_levels = NoiseLevelSampler.from_config(cfg.flow)
        self.text_path = None
        if self.tokenizer is not None:
            self.text_path = MixtureTextPath.from_config(cfg.flow, self.tokenizer.vocab_size,
                                                         self.tokenizer.special_ids)
        if distributed is not None:  # FSDP2; bf16 parameter all-gathers only on GPUs
            distributed.wrap(self.model, bf16=self.use_bf16 and self.device.type == "cuda")
        self.train_model = self.model
        # A V2T sample's text reads a clean video. When nothing that video's own pass touches is
        # trained (text-only training under clean_isolated), the pass is the cached sampler's
        # prefill: it runs without autograd and only the text stream is differentiated (same
        # outputs, less work). FSDP2 only gathers parameters inside forward, so not under torchrun;
        # nor with compiled blocks, which would specialise on every cache layer and batch split.
        self.reuse_clean_video = (distributed is None and not t.compile and self.model.has_text_stream
                                  and self.model.supports_cache("video") and not any(
                                      p.requires_grad for name, p in self.model.named_parameters()
                                      if self.model.parameter_group(name) != "text"))
        # fused: one kernel over all parameters, where the default runs a dozen small ops per
        # parameter (the small benchmark model, 2 CPU threads: 7.6 against 19 ms per step).
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=t.lr, betas=tuple(t.betas),
                                           weight_decay=t.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        # EMA in fp32, sharded like the model under FSDP2 (DTensors); frozen entries never change.
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        self.validator = self._build_validator() if self.rank0 else None
        self.logger = RunLogger(self.out, enabled=False)
        self.step = 0
        self.best: dict | None = None  # {"metric", "value", "step"}
        self._maybe_resume()

    # ------------------------------------------------------------------ setup
    def _param_groups(self) -> list[dict]:
        """Trainable parameters by group (video, shared, text), each with its learning-rate scale."""
        t = self.train
        for name, value in (("lr_scale_video", t.lr_scale_video), ("lr_scale_shared", t.lr_scale_shared)):
            if not value >= 0:
                raise TrainingError(f"train.{name} must be >= 0, got {value}")
        scales = {"video": t.lr_scale_video, "shared": t.lr_scale_shared, "text": 1.0}
        groups = {name: [] for name in scales}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                groups[self.model.parameter_group(name)].append(param)
        return [{"params": params, "lr_scale": scales[name]} for name, params in groups.items() if params]

    def _rank0_first(self, fill):
        """Run `fill(compute)`: rank 0 computes and writes the cache, the others then only read."""
        if self.dist is None:
            return fill(True)
        if self.dist.is_main:
            result = fill(True)
            self.dist.barrier()
            return result
        self.dist.barrier()
        return fill(False)

    def _load_data(self):
        t, world = self.train, self.cfg.world
        if t.manifest:
            return self._rank0_first(lambda compute: cached_manifest_latents(
                t.manifest, self.codec, self.cfg.codec, world, self.cache_dir, t.buckets,
                device=self.device, compute=compute, progress=self.progress))
        return shapesworld_set(t.num_train_videos, t.seed, world, progress=self.progress)

    def _load_validation_source(self):
        t = self.train
        if t.eval_samples <= 0:
            return None
        if t.manifest:
            if not t.val_manifest:
                return None
            return self._rank0_first(lambda compute: cached_manifest_latents(
                t.val_manifest, self.codec, self.cfg.codec, self.cfg.world, self.cache_dir,
                device=self.device, compute=compute, progress=self.progress))
        return shapesworld_set(t.eval_samples, t.seed, self.cfg.world, split="val", progress=False)

    def _load_prompts(self) -> tuple[PromptBank, torch.Tensor]:
        prompts = list(self.data.prompts)
        if self.val_source is not None:
            prompts += list(self.val_source.prompts)
        embeddings, null = self._rank0_first(lambda compute: cached_prompt_embeddings(
            prompts, self.cfg.prompt_encoder, self.cache_dir, device=self.device, compute=compute,
            progress=self.progress))
        return PromptBank(embeddings), null

    def _load_tokenizer(self) -> TextTokenizer | None:
        if self.train.stage == "generator":
            return None
        if self.train.init_from and (Path(self.train.init_from) / "tokenizer").is_dir():
            return TextTokenizer.load(Path(self.train.init_from) / "tokenizer")
        # A trimmed vocabulary covers the prompts and captions the model will ever write here.
        return load_text_tokenizer(self.cfg.tokenizer, corpus=list(self.data.prompts) + list(self.data.captions))

    def _load_init(self) -> UniViGUTransformer:
        """The transformer of a model directory, or a Wan checkpoint through the conversion."""
        path = Path(self.train.init_from)
        if not path.exists():
            raise TrainingError(f"train.init_from not found: {path}")
        if (path / INDEX_NAME).is_file():
            return load_bundle(path).transformer
        from ..models.convert import load_wan

        return load_wan(path)

    def _build_model(self) -> UniViGUTransformer:
        cfg, t = self.cfg, self.train
        if t.stage == "generator":
            if t.init_from:
                return self._load_init()
            model_cfg = copy.deepcopy(cfg.model)
            model_cfg.vocab_size = 0  # the generator is the video-only backbone
            return UniViGUTransformer(model_cfg)
        if not t.init_from:
            raise TrainingError(f"stage {t.stage!r} starts from a previous stage: set train.init_from "
                                "(a generator or unified model directory, or a Wan checkpoint)")
        base = self._load_init()
        if base.has_text_stream:
            if base.config.vocab_size != self.tokenizer.vocab_size:
                raise TrainingError(f"{t.init_from} has a text vocabulary of {base.config.vocab_size}, the "
                                    f"tokenizer {self.tokenizer.vocab_size}")
            return base
        text_options = {name: getattr(cfg.model, name) for name in TEXT_OPTIONS}  # the rest is the video's
        return unify_video_model(base, vocab_size=self.tokenizer.vocab_size, text_length=cfg.model.text_length,
                                 mask_token=cfg.flow.text_source == "mask", init="copy", seed=t.seed,
                                 **text_options)

    def _build_validator(self) -> Validator | None:
        source = self.val_source
        if source is None:
            return None
        index = np.arange(len(source))
        if hasattr(source, "bucket_of"):  # real data: validate on the clips of the first bucket
            index = index[source.bucket_of == source.bucket_of[0]][: self.train.eval_samples]
        data = ValidationData(latents=source.latents(index, self.codec),
                              condition=self.prompts([source.prompts[i] for i in index]),
                              prompts=[source.prompts[i] for i in index],
                              captions=[source.captions[i] for i in index],
                              truths=None if getattr(source, "truths", None) is None
                              else [source.truths[i] for i in index])
        return Validator(data, stage=self.train.stage, codec=self.codec, null_condition=self.null_condition,
                         tokenizer=self.tokenizer, text_path=self.text_path, flow_config=self.cfg.flow,
                         sampler_config=self.cfg.sampler, world=self.cfg.world,
                         text_length=self.model_config.text_length, seed=self.train.seed, device=self.device,
                         bf16=self.use_bf16)

    def _maybe_resume(self) -> None:
        last = ckpt.latest_checkpoint(self.out / "checkpoints") if self.rank0 else None
        if self.dist is not None:
            last = self.dist.broadcast_object(last)
        if last is None:
            return
        stage = ckpt.read_state(last).get("stage")
        if stage != self.train.stage:
            raise TrainingError(f"{self.out} holds a checkpoint of stage {stage!r}, not {self.train.stage!r}: "
                                "give each stage its own train.output_dir")
        state = ckpt.restore_training_state(last, self.model, self.optimizer, self.ema, ctx=self.dist)
        self.step = state["step"]
        self.best = state.get("best")
        if self.rank0 and self.progress:
            print(f"resumed from {last} at step {self.step}")

    # ------------------------------------------------------------------ batches
    def _draw_tasks(self, gens: list[torch.Generator]) -> list[str]:
        if self.tokenizer is None:
            return ["t2v"] * len(gens)
        mix = self.train.mixture
        probs = torch.tensor([mix.t2v, mix.v2t, mix.joint], dtype=torch.float64)
        probs = probs / probs.sum()
        return [TASKS[int(torch.multinomial(probs, 1, generator=g))] for g in gens]

    def make_batch(self, micro_step: int, step: int | None = None) -> StepBatch:
        """This process's part of global micro-batch `micro_step` of optimizer step `step`.

        Each sample's noise comes from an RNG keyed by (seed, optimizer step, sample id), so
        neither the processes nor the gradient-accumulation micro-batches change it.
        """
        t = self.train
        step = micro_step if step is None else step
        index = self.data.batch(micro_step, t.batch_size, t.seed)
        if self.dist is not None:
            index = self.dist.shard(index)
        gens = [sample_generator(t.seed, step, int(i)) for i in index]
        tasks = self._draw_tasks(gens)
        video = self.data.latents(index, self.codec)
        condition = self.prompts([self.data.prompts[i] for i in index])
        text = None
        if self.tokenizer is not None:
            target = self.data.prompts if t.stage == "knowledge_recall" else self.data.captions
            # A T2V sample's clean text stream holds the prompt in every stage: at inference a user
            # gives a prompt, not a detailed caption. V2T and joint samples learn the stage's target.
            texts = [self.data.prompts[i] if task == "t2v" else target[i] for i, task in zip(index, tasks)]
            text = self.tokenizer.encode(texts, self.model_config.text_length, truncate=True)
        return StepBatch(video=video, condition=condition, text=text, tasks=tasks, generators=gens)

    def noise(self, batch: StepBatch) -> NoisedBatch:
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
        noisy_text = None
        if batch.text is not None:
            noisy_text = torch.cat([self.text_path.sample(batch.text[i:i + 1], s_text[i:i + 1], generator=g).noisy
                                    for i, g in enumerate(batch.generators)])
        return NoisedBatch(video=video_sample.noisy, video_target=video_sample.target, s_video=s_video,
                           text=noisy_text, text_target=batch.text, s_text=s_text, condition=condition,
                           drop_video=drop_video)

    def loss_counts(self, nb: NoisedBatch) -> torch.Tensor:
        """[video count, text count] the joint loss of this batch normalises by."""
        has_text = nb.text is not None
        video, text = count_loss_terms(nb.s_video, nb.s_text if has_text else None,
                                       nb.text.shape[1] if has_text else 0)
        return torch.stack([video, text]).float()

    # ------------------------------------------------------------------ step
    def _forward_loss(self, nb: NoisedBatch, normalizers: torch.Tensor, alone_forward: bool):
        """Joint loss of one (micro-)batch, normalised by the global counts `normalizers`.

        `alone_forward`: run the text-only forward of the video-dropout samples. Under FSDP every
        rank must make the same forward calls, so a rank without such samples runs it on one sample
        and adds it with weight zero.
        """
        dev = self.device
        s_text_model = (nb.s_text * 1000).to(dev)
        text = None if nb.text is None else nb.text.to(dev)
        condition = nb.condition.to(dev)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.use_bf16)
        dummy = None
        with autocast:
            velocity, logits = self._model_outputs(nb, text, None if text is None else s_text_model, condition)
            if alone_forward:  # text guidance branch: the same text with no video at all
                keep = nb.drop_video.to(dev)
                if keep.any():
                    _, alone = self.train_model(None, text[keep], None, s_text_model[keep], condition[keep])
                    logits = logits.clone()
                    logits[keep] = alone
                else:
                    _, dummy = self.train_model(None, text[:1], None, s_text_model[:1], condition[:1])
        kwargs = dict(velocity=velocity, video_target=nb.video_target.to(dev), video_noise_level=nb.s_video.to(dev),
                      video_normalizer=normalizers[0])
        if logits is not None:
            kwargs.update(logits=logits, text_target=nb.text_target.to(dev), text_noisy=text,
                          text_noise_level=nb.s_text.to(dev), path=self.text_path, text_loss=self.cfg.flow.text_loss,
                          text_weight=self.cfg.flow.text_loss_weight, text_normalizer=normalizers[1])
        result = joint_loss(**kwargs)
        loss = result.loss if dummy is None else result.loss + 0.0 * dummy.float().sum()
        return loss, result

    def _model_outputs(self, nb: NoisedBatch, text, s_text, condition):
        """(velocity, logits) of the whole batch; with `reuse_clean_video` the samples whose noisy
        text reads a clean video go through prefill + step_text (velocity zero there: no video loss)."""
        video, s_video = nb.video.to(self.device), (nb.s_video * 1000).to(self.device)
        readers = None
        if self.reuse_clean_video and text is not None:
            readers = ((nb.s_video == 0) & (nb.s_text > 0) & ~nb.drop_video).to(self.device)
        if readers is None or not readers.any():
            return self.train_model(video, text, s_video, s_text, condition)
        with torch.no_grad():
            cache = self.model.prefill("video", video[readers], condition=condition[readers])
        read_logits = self.model.step_text(text[readers], s_text[readers], cache)
        velocity = torch.zeros(video.shape, dtype=torch.float32, device=video.device)
        logits = read_logits.new_zeros((video.shape[0], *read_logits.shape[1:]))
        logits[readers] = read_logits
        rest = ~readers
        if rest.any():
            velocity[rest], logits[rest] = self.train_model(video[rest], text[rest], s_video[rest], s_text[rest],
                                                            condition[rest])
        return velocity, logits

    def train_step(self) -> dict:
        t = self.train
        self.train_model.train()
        factor = lr_factor(self.step, t.warmup_steps, t.steps, t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = t.lr * factor * group["lr_scale"]
        micro = [self.noise(self.make_batch(self.step * t.grad_accum + m, self.step)) for m in range(t.grad_accum)]
        counts = torch.stack([self.loss_counts(nb) for nb in micro]).sum(0)
        alone = [bool(nb.drop_video.any()) and nb.text is not None for nb in micro]
        if self.dist is not None:
            counts = self.dist.all_reduce_sum(counts)
            alone = [self.dist.any(flag) for flag in alone]
        counts = counts.to(self.device)
        totals = torch.zeros(3, dtype=torch.float64)  # loss, video sum, text sum (this process)
        for m, nb in enumerate(micro):
            if self.dist is not None and t.grad_accum > 1:  # reduce-scatter once, after the last micro-batch
                self.train_model.set_requires_gradient_sync(m == t.grad_accum - 1)
            loss, result = self._forward_loss(nb, counts, alone[m])
            # FSDP averages gradients over ranks; the loss is already a global mean, so undo it.
            (loss * self.world_size).backward()
            totals += torch.stack([loss.detach(), result.video_sum.detach(), result.text_sum.detach()]).double().cpu()
        if self.dist is not None:
            totals = self.dist.all_reduce_sum(totals)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema()
        self.step += 1
        counts = counts.double().cpu()
        return {"loss": float(totals[0]), "video_loss": float(totals[1] / counts[0].clamp(min=1)),
                "text_loss": float(totals[2] / counts[1].clamp(min=1)), "grad_norm": float(grad_norm),
                "lr": t.lr * factor}

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = ema_decay(self.step, self.train.ema_decay, self.train.ema_warmup_steps)
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                self.ema[name].mul_(decay).add_(param.detach().float(), alpha=1 - decay)

    # ------------------------------------------------------------------ checkpoints, export
    def save(self) -> Path:
        """Atomic training checkpoint (every rank must call it under torchrun)."""
        state = {"stage": self.train.stage, "best": self.best, "config": to_dict(self.cfg)}
        return ckpt.save_training_state(self.out / "checkpoints", self.step, self.model, self.optimizer, self.ema,
                                        state, keep_last=self.train.keep_last, ctx=self.dist)

    def ema_model(self) -> UniViGUTransformer | None:
        """A plain (unsharded) model with the EMA weights, on rank 0 (None elsewhere; collective)."""
        full = gather_full_state(self.ema, self.dist)
        if full is None:
            return None
        with torch.device("meta"):
            model = UniViGUTransformer(self.model_config)
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(dtypes[k]) for k, v in full.items()}, assign=True)
        return model.eval().requires_grad_(False)

    def _save_bundle(self, directory: Path, model: UniViGUTransformer) -> Path:
        return save_bundle(directory, model, self.codec, self.cfg.prompt_encoder, self.null_condition[None],
                           self.tokenizer, self.cfg.world, self.cfg.sampler, self.cfg.flow)

    def export(self, directory: Path | None = None) -> Path:
        """Write the EMA model as an inference directory (every rank calls it; rank 0 writes)."""
        directory = Path(directory or self.out / "model")
        model = self.ema_model()
        if model is not None:
            self._save_bundle(directory, model)
        return directory

    # ------------------------------------------------------------------ validation, samples
    def evaluate(self) -> dict | None:
        """Validation on rank 0 with the EMA weights; keeps OUT/best (every rank calls it)."""
        if self.val_source is None:  # the same on every rank
            return None
        model = self.ema_model()
        metrics = None
        if model is not None and self.validator is not None:
            model.to(self.device)
            metrics = self.validator.losses(model)
            if self.train.oracle_eval:
                metrics.update(self.validator.oracle(model))
            self.logger.log(self.step, metrics)
            self._keep_best(metrics, model)
        if self.dist is not None:
            self.best = self.dist.broadcast_object(self.best)
        return metrics

    def _keep_best(self, metrics: dict, model: UniViGUTransformer) -> None:
        name = self.train.best_metric
        value = metrics.get(name)
        if not isinstance(value, (int, float)):
            warnings.warn(f"train.best_metric {name!r} is not among the validation metrics "
                          f"({', '.join(sorted(k for k in metrics if not k.endswith('_ci95')))})", stacklevel=2)
            return
        if self.best is not None and self.best.get("metric") == name:
            old = self.best["value"]
            if (value >= old) if lower_is_better(name) else (value <= old):
                return
        self.best = {"metric": name, "value": float(value), "step": self.step}
        tmp, final = self.out / ".best-tmp", self.out / "best"
        if tmp.exists():
            shutil.rmtree(tmp)
        self._save_bundle(tmp, model)
        (tmp / "best.json").write_text(json.dumps(self.best, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)

    def write_samples(self) -> Path | None:
        """GIFs + captions of fixed prompts and videos into OUT/samples/step-N (every rank calls it)."""
        if self.val_source is None:
            return None
        model = self.ema_model()
        if model is None or self.validator is None:
            return None
        return self.validator.samples(model.to(self.device), self.out / "samples" / f"step-{self.step:08d}",
                                      self.train.num_samples, fps=self.cfg.world.fps)

    # ------------------------------------------------------------------ run
    def run(self, on_step=None) -> Path:
        """Train to `train.steps` (resuming where a checkpoint left off), validate, export.

        `on_step(trainer, logs)` is called after every step (after any checkpoint of that step).
        Returns the exported model directory.
        """
        t = self.train
        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
        self.logger = RunLogger(self.out, enabled=self.rank0, tensorboard=t.tensorboard)
        bar = tqdm(total=t.steps, initial=self.step, desc=f"train {t.stage}", disable=not self.progress)
        # The rate is over the training steps since the last log line, their own time only: not
        # evaluation, checkpoints or samples, nor what came before (compiling, a resumed run).
        window_steps, window_seconds = 0, 0.0
        try:
            while self.step < t.steps:
                began = time.perf_counter()
                logs = self.train_step()
                window_steps, window_seconds = window_steps + 1, window_seconds + time.perf_counter() - began
                bar.update(1)
                logs["steps_per_s"] = window_steps / max(1e-9, window_seconds)
                logs["samples_per_s"] = logs["steps_per_s"] * t.batch_size * t.grad_accum
                last = self.step == t.steps
                if self.step % t.log_every == 0 or last:
                    bar.set_postfix(video=f"{logs['video_loss']:.4f}", text=f"{logs['text_loss']:.3f}",
                                    sps=f"{logs['samples_per_s']:.1f}")
                    self.logger.log(self.step, logs)
                    window_steps, window_seconds = 0, 0.0
                if t.eval_every and self.step % t.eval_every == 0 and not last:
                    self.evaluate()
                if t.sample_every and self.step % t.sample_every == 0 and not last:
                    self.write_samples()
                if t.save_every and self.step % t.save_every == 0 and not last:
                    self.save()
                if on_step is not None:
                    on_step(self, logs)
            bar.close()
            latest = ckpt.latest_checkpoint(self.out / "checkpoints") if self.rank0 else None
            if self.dist is not None:
                latest = self.dist.broadcast_object(latest)
            if latest is None or ckpt.read_state(latest)["step"] != self.step:
                self.save()
            self.evaluate()
            if t.sample_every:
                self.write_samples()
            return self.export()
        finally:
            bar.close()
            self.logger.close()

