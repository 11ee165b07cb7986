"""The training loop of every stage (generator, Knowledge Recall, Capability Refinement), wired
from parts that each do one job (torchtitan's separation):

* `sources` — the training and held-out sets and the prompt-embedding bank (through the cache);
* `build` — the model (a fresh generator, a model directory or a Wan checkpoint, unified when the
  stage needs a text stream), its tokenizer, and which parameter groups train;
* `parallelize` — activation checkpointing, compile, FSDP2, in that order;
* `batches` — each sample's task and noise from its own RNG keyed by (seed, step, sample id);
* `step` — the forward and the joint loss;
* `optim` — learning-rate groups and schedule, AdamW, EMA;
* `checkpoint` — the `CheckpointManager`: cadence, keep-last-N, resume, best;
* `validation` — fixed-noise losses, oracle metrics and samples on the EMA weights.

The loss is normalised by the counts of the whole global batch (all micro-batches, all
processes), so neither gradient accumulation nor the number of processes changes the result. Under
torchrun the trainer gets a `DistributedContext` (`training/distributed.py`): the model is sharded
with FSDP2, each rank trains on its part of every global batch, checkpoints go through DCP, and
rank 0 alone logs, validates and exports (from EMA weights gathered onto it).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_directory, kill_point, recover_directory
from ..config import ExperimentConfig, check_values, save_config, to_dict
from ..flow.paths import MixtureTextPath
from ..models.bundle import save_bundle
from ..models.lora import is_lora_parameter, save_adapter, unload
from ..models.transformer import UniViGUTransformer
from ..models.vae import load_codec
from ..precision import bf16_is_fast
from . import sources
from .batches import BatchMaker, NoisedBatch, StepBatch, loss_counts
from .build import TrainingError, build_model, build_tokenizer, freeze
from .cache import default_cache_dir
from .checkpoint import CheckpointManager
from .distributed import gather_full_state
from .lock import acquire_run_lock
from .logging import RunLogger
from .optim import EMA, build_optimizer, ema_decay, lr_factor, plain_model, set_learning_rate
from .parallelize import parallelize
from .step import LossStep, can_reuse_clean_video
from .validation import Validator, validation_data

__all__ = ["Trainer", "TrainingError", "lr_factor", "ema_decay"]


class Trainer:
    """Runs one stage described by an `ExperimentConfig`. `state_dict()` is the loop's own state
    (step, best) beside the model, optimizer and EMA that checkpoints hold."""

    def __init__(self, cfg: ExperimentConfig, device: str | torch.device = "cpu", progress: bool = True,
                 distributed=None, force: bool = False):
        check_values(cfg)
        self.cfg = cfg
        t = cfg.train
        self.dist = distributed  # training.distributed.DistributedContext or None
        self.rank0 = distributed is None or distributed.is_main
        self.world_size = 1 if distributed is None else distributed.world_size
        self.device = distributed.device if distributed is not None else torch.device(device)
        self.progress = progress and self.rank0
        self.out = Path(t.output_dir)
        # One run per output folder, taken before anything is read or written there (`close` or
        # the end of `run` gives it back).
        self.force = force
        self.lock = acquire_run_lock(self.out, distributed, force)  # None on ranks other than 0
        self.locked = True  # the same on every rank, so every rank takes the lock again together
        try:
            self._setup(cfg, distributed)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Give the output folder's run lock back."""
        self.locked = False
        if self.lock is not None:
            self.lock.release()

    def _setup(self, cfg: ExperimentConfig, distributed) -> None:
        t = cfg.train
        if self.rank0:  # folders a killed export left half-renamed come back whole
            for folder in (self.out / "model", self.out / "best"):
                recover_directory(folder)
        self.use_bf16 = t.bf16 and bf16_is_fast(self.device)
        if t.batch_size < self.world_size:
            raise TrainingError(f"train.batch_size={t.batch_size} is the global batch; it must be at least "
                                f"the number of processes ({self.world_size})")
        torch.manual_seed(t.seed)
        cache_dir = Path(t.cache_dir) if t.cache_dir else default_cache_dir()
        where = dict(cache_dir=cache_dir, device=self.device, dist=distributed, progress=self.progress)

        self.codec = load_codec(cfg.codec)
        self.data = sources.training_set(cfg, self.codec, **where)
        self.tokenizer = build_tokenizer(cfg, list(self.data.prompts) + list(self.data.captions))
        self.model = build_model(cfg, self.tokenizer).to(self.device)
        self.model_config = self.model.config
        freeze(self.model, t.trainable, t.lora)
        parallelize(self.model, t, distributed, bf16=self.use_bf16)
        self.val_source = sources.validation_set(cfg, self.codec, **where)
        held_out = [] if self.val_source is None else list(self.val_source.prompts)
        self.prompts, self.null_condition = sources.prompt_bank(cfg, list(self.data.prompts) + held_out, **where)
        self.text_path = None
        if self.tokenizer is not None:
            self.text_path = MixtureTextPath.from_config(cfg.flow, self.tokenizer.vocab_size,
                                                         self.tokenizer.special_ids)
        self.batches = BatchMaker(cfg, self.data, self.codec, self.prompts, self.null_condition, self.tokenizer,
                                  self.text_path, self.model_config.text_length, distributed)
        self.loss_step = LossStep(self.model, self.text_path, cfg.flow, self.device, bf16=self.use_bf16,
                                  reuse_clean_video=can_reuse_clean_video(self.model, distributed is not None,
                                                                          t.compile))
        self.optimizer = build_optimizer(self.model, t, self.device)
        self.ema = EMA(self.model, t.ema_decay, t.ema_warmup_steps)
        self.validator = self._build_validator() if self.rank0 else None
        self.logger = RunLogger(self.out, enabled=False)
        self.checkpoints = CheckpointManager(self.out, t, distributed)
        self.step = self.checkpoints.resume(self.model, self.optimizer, self.ema.state)
        if self.step and self.rank0 and self.progress:
            print(f"resumed from {self.out / 'checkpoints'} at step {self.step}")

    def _build_validator(self) -> Validator | None:
        if self.val_source is None:
            return None
        data = validation_data(self.val_source, self.codec, self.prompts, self.cfg.train.eval_samples)
        return Validator(data, stage=self.cfg.train.stage, codec=self.codec, null_condition=self.null_condition,
                         tokenizer=self.tokenizer, text_path=self.text_path, flow_config=self.cfg.flow,
                         sampler_config=self.cfg.sampler, world=self.cfg.world,
                         text_length=self.model_config.text_length, seed=self.cfg.train.seed, device=self.device,
                         bf16=self.use_bf16, prompt_encoder_config=self.cfg.prompt_encoder)

    # ------------------------------------------------------------------ state
    @property
    def reuse_clean_video(self) -> bool:
        return self.loss_step.reuse_clean_video

    @reuse_clean_video.setter
    def reuse_clean_video(self, value: bool) -> None:
        self.loss_step.reuse_clean_video = value

    @property
    def best(self) -> dict | None:
        return self.checkpoints.best

    def state_dict(self) -> dict:
        return {"step": self.step, "best": self.checkpoints.best}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.checkpoints.best = state["step"], state.get("best")

    # ------------------------------------------------------------------ batches and the step
    def make_batch(self, micro_step: int, step: int | None = None) -> StepBatch:
        return self.batches.make(micro_step, step)

    def noise(self, batch: StepBatch) -> NoisedBatch:
        return self.batches.noise(batch)

    def train_step(self) -> dict:
        t = self.cfg.train
        self.model.train()
        lr = set_learning_rate(self.optimizer, t, self.step)
        micro = [self.noise(self.make_batch(self.step * t.grad_accum + m, self.step)) for m in range(t.grad_accum)]
        counts = torch.stack([loss_counts(nb) for nb in micro]).sum(0)
        alone = [bool(nb.drop_video.any()) and nb.text is not None for nb in micro]
        if self.dist is not None:
            counts = self.dist.all_reduce_sum(counts)
            alone = [self.dist.any(flag) for flag in alone]
        counts = counts.to(self.device)
        totals = torch.zeros(3, dtype=torch.float64)  # loss, video sum, text sum (this process)
        for m, nb in enumerate(micro):
            if self.dist is not None and t.grad_accum > 1:  # reduce-scatter once, after the last micro-batch
                self.model.set_requires_gradient_sync(m == t.grad_accum - 1)
            loss, result = self.loss_step(nb, counts, alone[m])
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
        self.ema.update(self.step)
        self.step += 1
        counts = counts.double().cpu()
        return {"loss": float(totals[0]), "video_loss": float(totals[1] / counts[0].clamp(min=1)),
                "text_loss": float(totals[2] / counts[1].clamp(min=1)), "grad_norm": float(grad_norm), "lr": lr}

    # ------------------------------------------------------------------ checkpoints, export
    def save(self) -> Path:
        """Atomic training checkpoint (every rank must call it under torchrun)."""
        return self.checkpoints.save(self.step, self.model, self.optimizer, self.ema.state,
                                     {"config": to_dict(self.cfg)})

    @property
    def lora(self) -> dict | None:
        """The peft configs of the adapters being trained (None without `train.lora`)."""
        return getattr(self.model, "peft_config", None)

    def ema_model(self, merge_lora: bool = True) -> UniViGUTransformer | None:
        """A plain (unsharded) model with the EMA weights, on rank 0 (None elsewhere; collective);
        trained LoRA adapters merged into it (or kept as adapters: `merge_lora=False`)."""
        full = gather_full_state(self.ema.state, self.dist)
        return None if full is None else plain_model(self.model_config, full, self.lora, merge=merge_lora)

    def _save_bundle(self, directory: Path, model: UniViGUTransformer) -> Path:
        return save_bundle(directory, model, self.codec, self.cfg.prompt_encoder, self.null_condition[None],
                           self.tokenizer, self.cfg.world, self.cfg.sampler, self.cfg.flow)

    def export(self, directory: Path | None = None) -> Path:
        """Write the EMA model as an inference directory (every rank calls it; rank 0 writes it
        whole into a temporary folder, then renames it into place: atomic.py).

        With `train.lora` the directory holds the adapters merged in, and `OUT/adapter` the adapters
        alone in peft's format (EMA weights), referring to `train.init_from` as their base, with
        the weights of the groups that trained fully beside them (`full_weights.safetensors`)."""
        directory = Path(directory or self.out / "model")
        model = self.ema_model(merge_lora=False)
        if model is not None:
            if self.lora:
                self.export_adapter(model)
                unload(model, merge=True)
            with atomic_directory(directory) as tmp:
                self._save_bundle(tmp, model)
                kill_point("export")
        return directory

    def export_adapter(self, model: UniViGUTransformer, directory: Path | None = None) -> Path:
        """Write the adapters of `model` (the EMA model with its adapters) into OUT/adapter."""
        directory = Path(directory or self.out / "adapter")
        trained = {name for name, p in self.model.named_parameters() if p.requires_grad and not is_lora_parameter(name)}
        full = {name: p for name, p in model.named_parameters() if name in trained}
        base = None if self.cfg.train.init_from is None else Path(self.cfg.train.init_from).resolve()
        return save_adapter(directory, model, base=base, full_weights=full)

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
            if self.cfg.train.oracle_eval:
                metrics.update(self.validator.oracle(model))
            self.logger.log(self.step, metrics)
            self.checkpoints.keep_best(metrics, self.step, lambda folder: self._save_bundle(folder, model))
        self.checkpoints.share_best()
        return metrics

    def write_samples(self) -> Path | None:
        """GIFs + captions of fixed prompts and videos into OUT/samples/step-N (every rank calls it)."""
        if self.val_source is None:
            return None
        model = self.ema_model()
        if model is None or self.validator is None:
            return None
        return self.validator.samples(model.to(self.device), self.out / "samples" / f"step-{self.step:08d}",
                                      self.cfg.train.num_samples, fps=self.cfg.world.fps)

    # ------------------------------------------------------------------ run
    def run(self, on_step=None) -> Path:
        """Train to `train.steps` (resuming where a checkpoint left off), validate, export.

        `on_step(trainer, logs)` is called after every step (after any checkpoint of that step).
        Returns the exported model directory.
        """
        t = self.cfg.train
        if not self.locked:  # a second `run` of this trainer
            self.lock = acquire_run_lock(self.out, self.dist, self.force)
            self.locked = True
        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
        self.logger = RunLogger(self.out, enabled=self.rank0, tensorboard=t.tensorboard)
        bar = tqdm(total=t.steps, initial=self.step, desc=f"train {t.stage}", disable=not self.progress)
        # The rate is over the training steps since the last log line, their own time only: not
        # evaluation, checkpoints or samples, nor what came before (compiling, a resumed run).
        window_steps, window_seconds = 0, 0.0
        if t.manifest:  # cached data: read ahead in worker processes, from the step a resume starts at
            self.batches.stream(self.step * t.grad_accum, t.steps * t.grad_accum, t.loader_workers,
                                pin_memory=self.device.type == "cuda")
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
                kill_point("train-step")  # fault tests: a kill between steps, after the step's log line
                if t.eval_every and self.step % t.eval_every == 0 and not last:
                    self.evaluate()
                if t.sample_every and self.step % t.sample_every == 0 and not last:
                    self.write_samples()
                if self.checkpoints.due(self.step):
                    self.save()
                if on_step is not None:
                    on_step(self, logs)
            bar.close()
            self.checkpoints.save_final(self.step, self.model, self.optimizer, self.ema.state,
                                        {"config": to_dict(self.cfg)})
            self.evaluate()
            if t.sample_every:
                self.write_samples()
            return self.export()
        finally:
            self.batches.stop()
            bar.close()
            self.logger.close()
            self.close()
